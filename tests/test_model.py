"""The model in one process (TP = 1): MoT routing, the dense twin, masks, cache, loss, counts. Numbers asserted."""
import dataclasses
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from megannm.config import ModelConfig
from megannm.vocab import Vocab

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
# megatron-core's RowParallelLinear passes tp_group=None internally and warns on every call
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

VOCAB = Vocab(text_size=200, image_codes=64)  # 273 ids, padded to 384 at TP 1
LAYOUT = None  # the world of one that ``parallel_state`` initialises


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megannm.parallel import init_parallel
    global LAYOUT
    LAYOUT = init_parallel(1, 1)
    # Tiny tensors: one thread is as fast, and does not stall when other processes share the two cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LAYOUT  # no shutdown: other modules of the session may still use the process group
    torch.set_num_threads(threads)


def make(mot=True, seed=0, **cfg):
    from megannm.model import ModelArgs, NMMModel
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, mot=mot,
                max_seq_len=64)
    args = ModelArgs.from_config(ModelConfig(**{**base, **cfg}), VOCAB, tp=1)
    torch.manual_seed(seed)
    return NMMModel(args, LAYOUT)


def weight_set(name):
    """The weight-set index of a per-modality parameter (``....{m}.weight``), None for embedding and head."""
    m = re.search(r"\.(\d+)\.weight$", name)
    return int(m.group(1)) if m and not name.startswith("embedding") else None


def text_ids(*shape, gen):
    return torch.randint(0, VOCAB.text_size, shape, generator=gen)


def image_ids(*shape, gen):
    return torch.randint(VOCAB.image_start, VOCAB.image_end, shape, generator=gen)


def mixed_ids(gen, b=2):
    """<bos> caption <boi> image codes <eoi> ...: both modalities in every row."""
    rows = [torch.cat([torch.tensor([VOCAB.bos_id]), text_ids(5, gen=gen), torch.tensor([VOCAB.boi_id]),
                       image_ids(8, gen=gen), torch.tensor([VOCAB.eoi_id]), text_ids(3, gen=gen)]) for _ in range(b)]
    return torch.stack(rows)


def stage_logits(model, ids, position_ids=None, document_ids=None):
    """Vocab-parallel logits through the chain cut in two stages, as a pipeline runs it: only the carried tensors
    cross the cut, and each stage builds its own context."""
    from megannm.model.transformer import run_chain
    carried = run_chain(model.args, [model.embedding, model.layers[0]], (ids, position_ids, document_ids))
    assert all(isinstance(t, torch.Tensor) for t in carried) and len(carried) == 4
    return run_chain(model.args, [*model.layers[1:], model.head], carried)


# ---------------------------------------------------------------------------------------------------------------------


def test_megatron_linears_take_2d_and_empty_input():
    from megannm.model.layers import column, row
    args = make().args
    col, out = column(args, LAYOUT, 32, 48), row(args, LAYOUT, 48, 32)
    x = torch.randn(5, 32, requires_grad=True)
    y = out(col(x))
    assert y.shape == (5, 32)
    torch.testing.assert_close(y, x @ col.weight.T @ out.weight.T)
    empty = out(col(torch.zeros(0, 32)))
    assert empty.shape == (0, 32)
    empty.sum().backward()
    assert col.weight.grad is not None and float(col.weight.grad.abs().sum()) == 0.0
    assert "_extra_state" not in "".join(col.state_dict())


def test_routing_groups_by_a_stable_permutation_and_its_gradient_is_the_inverse_gather():
    from megannm.model import Routing
    modality = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]])
    r = Routing(modality, 2)
    assert r.counts == [5, 5]
    x = torch.arange(10.0).view(2, 5, 1).requires_grad_()
    grouped = r.group(x)
    text, image = grouped.split(r.counts)
    assert text.flatten().tolist() == [0, 3, 6, 7, 8]  # sequence order kept inside a modality
    assert image.flatten().tolist() == [1, 2, 4, 5, 9]
    assert torch.equal(r.ungroup(grouped), x)
    weights = torch.arange(10.0)[:, None]
    (grouped * weights).sum().backward()
    assert x.grad.flatten().tolist() == [0, 5, 6, 1, 7, 8, 2, 3, 4, 9]  # each row's gradient back in its place
    only_text = Routing(torch.zeros(2, 3, dtype=torch.long), 2)
    assert only_text.counts == [6, 0]
    assert only_text.group(torch.ones(2, 3, 4)).split(only_text.counts)[1].shape == (0, 4)
    dense = Routing(modality, 1)
    assert dense.order is None and dense.counts == [10] and torch.equal(dense.group(x), x.view(10, 1))
    with pytest.raises(ValueError, match="modality ids must be < 2"):
        Routing(torch.tensor([[0, 2]]), 2)


def test_text_only_logits_do_not_depend_on_image_weights():
    model = make(mot=True)
    gen = torch.Generator().manual_seed(1)
    ids = text_ids(2, 12, gen=gen)
    before = model(ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weight_set(name) == 1:
                p.add_(torch.randn_like(p))
    assert torch.equal(model(ids), before)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if weight_set(name) == 0:
                p.add_(0.1 * torch.randn_like(p))
    assert (model(ids) - before).abs().max() > 1e-3


def test_mot_with_equal_sets_is_the_dense_twin():
    dense, mot = make(mot=False, seed=1), make(mot=True, seed=2)
    dense_sd = dense.state_dict()
    with torch.no_grad():
        for name, p in mot.named_parameters():
            m = weight_set(name)
            src = name if m is None else re.sub(r"\.\d+\.weight$", ".0.weight", name)
            p.copy_(dense_sd[src])
    gen = torch.Generator().manual_seed(3)
    ids = mixed_ids(gen)
    torch.testing.assert_close(mot(ids), dense(ids), rtol=0, atol=1e-6)
    loss_m, _ = mot(ids[:, :-1], labels=ids[:, 1:])
    loss_d, _ = dense(ids[:, :-1], labels=ids[:, 1:])
    assert abs(loss_m.item() - loss_d.item()) < 1e-6


def test_flops_equal_and_params_double():
    dense, mot = make(mot=False), make(mot=True)
    assert dense.flops_per_token(64) == mot.flops_per_token(64)
    # by hand: per layer q,o 32x32 each, k,v 32x16 each (GQA 2 of 4 heads), gate/up/down 32x64; head 32 x 273
    n = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64) + 32 * 273
    assert mot.flops_per_token(64) == 6 * n + 12 * 2 * 64 * 32
    body_d, body_m = dense.num_params(embeddings=False), mot.num_params(embeddings=False)
    assert body_m == 2 * body_d  # every non-embedding weight (norms included) exists once per modality
    assert mot.num_params(active_only=True) == dense.num_params()
    pad_rows = 2 * (VOCAB.padded_size(1) - VOCAB.size) * 32  # embedding + head padding rows
    for model in (dense, mot):
        assert sum(p.numel() for p in model.parameters()) == model.num_params() + pad_rows
    assert dense.flops_per_token(64) == type(dense).flops_per_token_of(dense.args, 64)


def test_stage_chain_equals_model_and_padding_rows_never_change_the_loss():
    from megannm.model import lm_loss
    model = make(mot=True)
    args = model.args
    gen = torch.Generator().manual_seed(4)
    ids = mixed_ids(gen, b=3)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    mask = torch.ones_like(labels)
    mask[0, :3] = 0
    logits_p = stage_logits(model, inputs)
    assert logits_p.shape[-1] == VOCAB.padded_size(1)
    torch.testing.assert_close(logits_p[..., :VOCAB.size], model(inputs), rtol=0, atol=1e-6)
    loss, stats = lm_loss(logits_p, labels, mask, args, LAYOUT)
    # reference: plain cross entropy over the real vocabulary
    ce = F.cross_entropy(logits_p[..., :VOCAB.size].reshape(-1, VOCAB.size), labels.reshape(-1), reduction="none")
    ce = ce.view_as(labels)
    torch.testing.assert_close(loss, (ce * mask).sum() / mask.sum(), rtol=0, atol=1e-5)
    is_img = VOCAB.is_image(labels)
    text_sel, img_sel = mask.bool() & ~is_img, mask.bool() & is_img
    assert int(stats["text_tokens"]) == int(text_sel.sum()) and int(stats["image_tokens"]) == int(img_sel.sum())
    torch.testing.assert_close(stats["text_loss"], ce[text_sel].mean(), rtol=0, atol=1e-5)
    torch.testing.assert_close(stats["image_loss"], ce[img_sel].mean(), rtol=0, atol=1e-5)
    # huge padding logits change nothing
    bumped = logits_p.clone()
    bumped[..., VOCAB.size:] = 1e4
    loss2, stats2 = lm_loss(bumped, labels, mask, args, LAYOUT)
    assert loss2.item() == loss.item() and stats2["image_loss"].item() == stats["image_loss"].item()
    # per-modality weights by the modality of the target, normalised by all loss tokens
    for w_text, w_image in ((1.0, 0.0), (0.5, 2.0)):
        weighted = dataclasses.replace(args, loss_weights=(w_text, w_image))
        w_loss, w_stats = lm_loss(logits_p, labels, mask, weighted, LAYOUT)
        expect = (w_text * stats["text_loss"] * stats["text_tokens"] +
                  w_image * stats["image_loss"] * stats["image_tokens"]) / mask.sum()
        torch.testing.assert_close(w_loss, expect, rtol=0, atol=1e-5)
        assert float(w_stats["text_loss"]) == float(stats["text_loss"])  # reported unweighted


def test_z_loss_adds_coefficient_times_mean_squared_log_partition():
    from megannm.model import lm_loss
    model = make(mot=True)
    gen = torch.Generator().manual_seed(5)
    ids = mixed_ids(gen)
    logits_p = stage_logits(model, ids[:, :-1])
    with torch.no_grad():
        logits_p *= 30  # a log partition far from 0, so the term is visible
    labels = ids[:, 1:]
    base, stats0 = lm_loss(logits_p, labels, None, model.args, LAYOUT)
    assert float(stats0["z_loss"]) == 0.0
    coeff = 1e-3
    with_z, stats = lm_loss(logits_p, labels, None, dataclasses.replace(model.args, z_loss=coeff), LAYOUT)
    lse = torch.logsumexp(logits_p[..., :VOCAB.size].double(), dim=-1)
    expected = coeff * lse.pow(2).mean()
    assert expected.item() > 0.01
    assert abs((with_z - base).item() - expected.item()) < 1e-5
    assert abs(stats["z_loss"].item() - expected.item()) < 1e-5


def test_z_loss_has_gradient_towards_a_small_partition():
    from megannm.model import lm_loss
    logits = torch.randn(1, 4, VOCAB.padded_size(1), requires_grad=True)
    args = dataclasses.replace(make().args, z_loss=1.0)
    loss, _ = lm_loss(logits, torch.zeros(1, 4, dtype=torch.long), None, args, LAYOUT)
    loss.backward()
    ref = logits.detach()[..., :VOCAB.size].clone().requires_grad_(True)
    ref_loss = F.cross_entropy(ref.view(4, -1), torch.zeros(4, dtype=torch.long)) + \
        torch.logsumexp(ref, -1).pow(2).mean()
    ref_loss.backward()
    torch.testing.assert_close(logits.grad[..., :VOCAB.size], ref.grad, rtol=0, atol=1e-6)
    assert float(logits.grad[..., VOCAB.size:].abs().max()) == 0.0  # padding rows get no gradient


def test_cross_entropy_and_log_partition_equal_torch_forward_and_backward():
    """``vocab_parallel.cross_entropy``: -log p(label) and log Z in one function, in place on the softmax; a spread
    of 200 nats puts some labels where exp underflows."""
    from megannm.model import vocab_parallel
    gen = torch.Generator().manual_seed(8)
    v = VOCAB.padded_size(1)
    logits = (torch.randn(3, 5, v, generator=gen) * 40).requires_grad_()
    labels = torch.randint(0, VOCAB.size, (3, 5), generator=gen)
    g_ce, g_lse = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    masked = vocab_parallel.mask_padding(logits, VOCAB.size, 0)  # a new tensor: ``logits`` stays intact
    ce, lse = vocab_parallel.cross_entropy(masked, labels, LAYOUT)
    ((ce * g_ce).sum() + (lse * g_lse).sum()).backward()
    ref = logits.detach()[..., :VOCAB.size].double().requires_grad_()
    ref_ce = F.cross_entropy(ref.reshape(15, -1), labels.reshape(15), reduction="none").view(3, 5)
    ref_lse = torch.logsumexp(ref, -1)
    assert float(ref_ce.max()) > 100  # labels whose exp(logit - max) underflows in fp32 are in the draw
    ((ref_ce * g_ce).sum() + (ref_lse * g_lse).sum()).backward()
    torch.testing.assert_close(ce.double(), ref_ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits.grad[..., :VOCAB.size].double(), ref.grad, rtol=1e-4, atol=1e-5)
    assert float(logits.grad[..., VOCAB.size:].abs().max()) == 0.0  # padding rows get no gradient


def test_document_mask_and_position_reset():
    model = make(mot=True)
    gen = torch.Generator().manual_seed(6)
    a, b = mixed_ids(gen, b=1)[:, :7], mixed_ids(gen, b=1)[:, :9]
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    out = model(packed, position_ids=pos, document_ids=docs)
    other_a = mixed_ids(torch.Generator().manual_seed(7), b=1)[:, :7]
    out2 = model(torch.cat([other_a, b], 1), position_ids=pos, document_ids=docs)
    assert (out2[:, :7] - out[:, :7]).abs().max() > 1e-3  # A itself changed
    torch.testing.assert_close(out2[:, 7:], out[:, 7:], rtol=0, atol=1e-6)  # B never sees A
    alone = model(b)  # B as its own sequence: positions 0..8, one document
    torch.testing.assert_close(out[:, 7:], alone, rtol=0, atol=1e-5)
    shuffled = pos.clone()
    shuffled[0, 7:] = torch.arange(9).flip(0)
    assert (model(packed, position_ids=shuffled, document_ids=docs)[:, 7:] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("mot", [True, False])
def test_kv_cached_greedy_generation_equals_uncached(mot):
    model = make(mot=mot, seed=8).eval()
    gen = torch.Generator().manual_seed(9)
    prompt = mixed_ids(gen)[:, :9]  # ends inside the image span: the continuation mixes modalities
    steps = 10
    with torch.no_grad():
        seq = prompt
        for _ in range(steps):  # uncached: recompute the whole sequence every step
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        full_logits = model(seq)
        cache = model.new_cache(2, prompt.shape[1] + steps)
        first, rest = prompt[:, :4], prompt[:, 4:]  # prefill in two chunks: causal within a chunk
        model(first, cache=cache)
        logits = model(rest, cache=cache)
        got = prompt
        cached_logits = [logits]
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            got = torch.cat([got, nxt], 1)
            if got.shape[1] < seq.shape[1]:
                logits = model(nxt, cache=cache)
                cached_logits.append(logits)
    assert torch.equal(got, seq)
    assert cache.length == seq.shape[1] - 1
    torch.testing.assert_close(torch.cat(cached_logits, 1), full_logits[:, 4:-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("only", ["text", "image"])
def test_empty_modality_micro_batch_trains_with_zero_grads(only):
    model = make(mot=True)
    gen = torch.Generator().manual_seed(10)
    ids = text_ids(2, 10, gen=gen) if only == "text" else image_ids(2, 10, gen=gen)
    loss, stats = model(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    absent = 1 if only == "text" else 0
    assert int(stats[f"{only}_tokens"]) == 18 and int(stats[f"{['text', 'image'][absent]}_tokens"]) == 0
    for name, p in model.named_parameters():
        m = weight_set(name)
        assert p.grad is not None, name  # every module ran, on an empty slice if need be
        if m == absent:
            assert float(p.grad.abs().max()) == 0.0, name
        elif m is not None:
            assert float(p.grad.abs().max()) > 0.0, name


def test_switches_norm_reorder_qk_norm_bf16_and_args_round_trip():
    from megannm.model import ModelArgs
    plain = make(qk_norm=False)
    assert not any("q_norm" in n for n in plain.state_dict())
    reordered = make(norm_reorder=True, z_loss=1e-4)
    ids = mixed_ids(torch.Generator().manual_seed(11))
    base = make()
    assert (reordered(ids) - base(ids)).abs().max() > 1e-4  # same weights (same seed), other norm placement
    loss, _ = reordered(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    args = dataclasses.replace(base.args, params_dtype="bfloat16")  # the recipe's precision, not ModelConfig
    from megannm.model import NMMModel
    torch.manual_seed(0)
    low = NMMModel(args, LAYOUT)
    assert next(low.parameters()).dtype == torch.bfloat16
    assert (low(ids).float() - base(ids)).abs().max() < 0.05
    d = json.loads(json.dumps(base.args.to_dict()))
    assert d == base.args.to_dict() and ModelArgs.from_dict(d) == base.args
    with pytest.raises(ValueError, match="unknown key"):
        ModelArgs.from_dict({**d, "hidden_sz": 3})


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """``parallel.activation_checkpointing`` without a pipeline: each block recomputed in the backward
    (torch.utils.checkpoint), the same numbers as keeping its activations."""
    from megannm.model import NMMModel
    args = make().args
    ids = mixed_ids(torch.Generator().manual_seed(12), b=3)
    results = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = NMMModel(args, LAYOUT, checkpoint_activations=recompute).train()
        calls = []
        model.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
        loss, _ = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        assert len(calls) == (2 if recompute else 1)  # recomputed in the backward, or kept
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and sum(float(g.abs().sum()) for g in g0.values()) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7)


def test_compiled_blocks_give_the_eager_model_loss_and_gradients():
    """``model.compile``: each block compiled in place (regional compilation); the loss and every gradient equal
    the eager model's over micro-batches whose tokens per modality differ, with one graph for all of them (the
    blocks are compiled with dynamic shapes), and the parameter names are the eager model's."""
    import torch._dynamo
    eager, compiled = make(), make(compile=True)
    assert compiled.args.compile and not eager.args.compile
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(21)
    batches = [mixed_ids(gen, b=2), torch.cat([mixed_ids(gen, b=1), text_ids(1, 19, gen=gen)]),
               torch.cat([image_ids(1, 19, gen=gen), mixed_ids(gen, b=1)])]
    from torch._dynamo.utils import counters
    counters.clear()
    for ids in batches:
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss, _ = model(ids[:, :-1], labels=ids[:, 1:])
            loss.backward()
            results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (l0, g0), (l1, g1) = results
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
        assert sum(float(g.abs().sum()) for g in g0.values()) > 0
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every block and batch: no recompile
    assert not counters["graph_break"]  # and no graph break (each would split the block into eager pieces)


# ---------------------------------------------------------------------------------------------------------------------
# the model against plain torch


def reference_logits(w: dict, args, ids, position_ids, document_ids):
    """The model written out in plain torch from its canonical weights: every token computed with every weight set
    and its own kept (``torch.where``), no routing."""
    def norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + args.eps))

    def per_set(fn):  # fn(m) for each weight set, each token taking its modality's result
        outs = [fn(m) for m in range(args.n_sets)]
        if args.n_sets == 1:
            return outs[0]
        image = (modality == 1).view(b, s, *[1] * (outs[0].ndim - 2))
        return torch.where(image, outs[1], outs[0])

    def rope(x):  # [B, H, S, hd], Hugging Face's rotate_half
        inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
        f = position_ids[..., None].float() * inv
        cos, sin = torch.cat([f, f], -1).cos()[:, None], torch.cat([f, f], -1).sin()[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    b, s = ids.shape
    hd, hq, hkv = args.head_dim, args.heads, args.kv_heads
    modality = ((ids >= args.image_start) & (ids < args.image_end)).long()
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool)) & (document_ids[:, :, None] == document_ids[:, None])
    h = w["embedding.embed_tokens.weight"][ids]
    for i in range(args.layers):
        p = f"layers.{i}."
        x = per_set(lambda m: norm(h, w[f"{p}attn.norm.{m}.weight"]))
        q = per_set(lambda m: norm((x @ w[f"{p}attn.q_proj.{m}.weight"].T).view(b, s, hq, hd),
                                   w[f"{p}attn.q_norm.{m}.weight"])).transpose(1, 2)
        k = per_set(lambda m: norm((x @ w[f"{p}attn.k_proj.{m}.weight"].T).view(b, s, hkv, hd),
                                   w[f"{p}attn.k_norm.{m}.weight"])).transpose(1, 2)
        v = per_set(lambda m: (x @ w[f"{p}attn.v_proj.{m}.weight"].T).view(b, s, hkv, hd)).transpose(1, 2)
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = (rope(q) @ rope(k).transpose(-1, -2)) / hd ** 0.5
        out = (scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v).transpose(1, 2).flatten(2)
        h = h + per_set(lambda m: out @ w[f"{p}attn.o_proj.{m}.weight"].T)
        x = per_set(lambda m: norm(h, w[f"{p}ffn.norm.{m}.weight"]))
        h = h + per_set(lambda m: (F.silu(x @ w[f"{p}ffn.gate_proj.{m}.weight"].T)
                                   * (x @ w[f"{p}ffn.up_proj.{m}.weight"].T))
                        @ w[f"{p}ffn.down_proj.{m}.weight"].T)
    h = per_set(lambda m: norm(h, w[f"head.norm.{m}.weight"]))
    return (h @ w["head.output.weight"].T)[..., :args.vocab_size]


@pytest.mark.parametrize("mot", [True, False])
def test_model_equals_plain_torch_reference(mot):
    """Logits and every gradient of the model equal plain torch on its weights (no routing: every token through
    every weight set, its own kept), packed documents and both modalities included."""
    model = make(mot=mot, seed=3)
    args = model.args
    assert {n.split(".")[3] for n, _ in model.named_parameters() if n.startswith("layers.0.attn.")} == \
        {"norm", "q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
    with torch.no_grad():  # QK-norm and norm weights away from 1, so that a misplaced one shows
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(13)
    ids = mixed_ids(gen, b=3)
    docs = torch.tensor([[0] * 10 + [1] * 9, [0] * 19, [0] * 4 + [1] * 15])
    pos = torch.cat([torch.arange(10), torch.arange(9)]).repeat(3, 1)
    logits = model(ids, position_ids=pos, document_ids=docs)
    target = torch.randn(logits.shape, generator=gen)
    (logits * target).sum().backward()

    weights = {n: t.detach().clone().requires_grad_() for n, t in model.named_parameters()}
    ref = reference_logits(weights, args, ids, pos, docs)
    (ref * target).sum().backward()
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads.keys() == weights.keys()
    for n, wt in weights.items():
        torch.testing.assert_close(grads[n], wt.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "embed" not in n and "output" not in n)


def test_rms_norm_equals_the_written_out_form():
    """The model's RMSNorm equals Hugging Face Llama's fp32 formula, bf16 bit for bit, in the parameter dtype."""
    from megannm.model.layers import FusedRMSNorm
    gen = torch.Generator().manual_seed(14)
    for dtype in (torch.float32, torch.bfloat16):
        norm = FusedRMSNorm(32, 1e-5, lambda w: w, dtype)
        assert norm.weight.dtype == dtype
        with torch.no_grad():
            norm.weight.copy_(1 + torch.randn(32, generator=gen))
        x = (3 * torch.randn(5, 7, 32, generator=gen)).to(dtype).requires_grad_()
        y = norm(x)
        xf = x.float()
        ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert y.dtype == ref.dtype == dtype
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-6 if dtype == torch.float32 else 0)


def test_a_pipeline_stage_builds_its_context_once_and_passes_it_to_its_blocks(monkeypatch):
    """A stage's blocks and head get the micro-batch's context as an argument, built once per stage from the
    carried tensors (none hangs on a tensor): two stages, two contexts, and the same logits as the whole model."""
    import megannm.model.transformer as transformer
    model = make(mot=True)
    gen = torch.Generator().manual_seed(15)
    ids = mixed_ids(gen)
    expected = model(ids, parallel_logits=True)
    calls = []
    real = transformer.context
    monkeypatch.setattr(transformer, "context", lambda *a, **k: calls.append(1) or real(*a, **k))
    seen = []
    model.layers[1].register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[1]))
    model.head.register_forward_pre_hook(lambda mod, inputs: seen.append(inputs[1]))
    got = stage_logits(model, ids)
    assert len(calls) == 2  # one per stage
    assert len(seen) == 2 and seen[0] is seen[1]  # the second stage's block and head share its context
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
