"""Continuous images in the one model (TP = 1): image spans, the causal-or-same-image mask against a written-out
reference, latents in and velocities out at the image slots only, the flow objective, KV-cached denoising steps and a
short training run. Numbers asserted."""
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from megannm.config import ModelConfig
from megannm.vocab import Vocab

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# continuous images: the image range holds ONE id, the latent slot
VOCAB = Vocab(text_size=40, image_codes=1)
SLOT, BOI, EOI, BOS = VOCAB.image_start, VOCAB.boi_id, VOCAB.eoi_id, VOCAB.bos_id
C = 6  # numbers per latent slot
LAYOUT = None


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megannm.parallel import init_parallel
    global LAYOUT
    LAYOUT = init_parallel(1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LAYOUT
    torch.set_num_threads(threads)


def make(mot=True, seed=0, channels=C, **cfg):
    from megannm.model import ModelArgs, NMMModel
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=64, mot=mot,
                max_seq_len=64)
    args = ModelArgs.from_config(ModelConfig(**{**base, **cfg}), VOCAB, tp=1)
    args = dataclasses.replace(args, latent_channels=channels)
    torch.manual_seed(seed)
    return NMMModel(args, LAYOUT)


def row(caption, slots, tail=()):
    return [BOS, *caption, BOI, *[SLOT] * slots, EOI, *tail]


def written_out_mask(docs, spans):
    """allowed[b, q, k] by the rule, one pair at a time."""
    b, s = docs.shape
    out = torch.zeros(b, s, s, dtype=torch.bool)
    for r in range(b):
        for q in range(s):
            for k in range(s):
                same_image = spans[r, q] >= 0 and spans[r, q] == spans[r, k]
                out[r, q, k] = bool(docs[r, q] == docs[r, k]) and (k <= q or same_image)
    return out


def example():
    """Two rows: one document with two images; two documents packed, an image in each."""
    ids = torch.tensor([row([1, 2], 3, [4]) + row([5], 2),
                        row([6], 3) + row([7, 8], 4)[:8]])
    docs = torch.tensor([[0] * 15, [0] * 7 + [1] * 8])
    return ids, docs


def test_image_spans_number_each_run_of_slots_per_row():
    from megannm.model.embedding import modality_of_ids
    from megannm.model.latents import image_spans
    ids, docs = example()
    spans = image_spans(modality_of_ids(ids, make().args), docs)
    assert spans.tolist() == [[-1, -1, -1, -1, 0, 0, 0, -1, -1, -1, -1, -1, 1, 1, -1],
                              [-1, -1, -1, 0, 0, 0, -1, -1, -1, -1, -1, 1, 1, 1, 1]]
    # two images touching across a document boundary are two spans
    touching = image_spans(torch.tensor([[1, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1]]))
    assert touching.tolist() == [[0, 0, 1, 1]]


def test_mask_is_causal_or_same_image_within_a_document_and_flex_agrees():
    from megannm.model.attention import attend, attention_mask, document_block_mask
    from megannm.model.embedding import modality_of_ids
    from megannm.model.latents import image_spans
    ids, docs = example()
    spans = image_spans(modality_of_ids(ids, make().args), docs)
    mask = attention_mask(docs, docs, 0, spans, spans)[:, 0]
    ref = written_out_mask(docs, spans)
    assert torch.equal(mask, ref)
    # n (n - 1) / 2 look-ahead pairs per image of n slots
    assert int(ref.sum()) - int(attention_mask(docs, docs, 0)[:, 0].sum()) == 3 + 1 + 3 + 6
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, ids.shape[1], 8, generator=gen) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    got = attend(q, k, v, document_block_mask(docs, spans))  # flex_attention's rule (eager on the CPU)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, ids.shape[1], -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mot", [True, False])
def test_latents_enter_and_velocities_leave_at_the_image_slots_only(mot):
    model = make(mot=mot).eval()
    torch.nn.init.normal_(model.head.velocity.proj.weight, std=0.1)  # zero at init: give it something to show
    ids = torch.tensor([row([1, 2, 3], 4, [5, 6])])  # slots at 5..8
    gen = torch.Generator().manual_seed(1)
    lat, t = torch.randn(1, ids.shape[1], C, generator=gen), torch.full((1, ids.shape[1]), 0.3)
    with torch.no_grad():
        logits, vel = model(ids, latents=lat, timesteps=t)
        moved = lat.clone()
        moved[0, 8] += 1.0  # the LAST slot of the image
        logits2, vel2 = model(ids, latents=moved, timesteps=t)
        text_moved = lat.clone()
        text_moved[0, :5] += 5.0  # latents at text positions are never read
        logits3, vel3 = model(ids, latents=text_moved, timesteps=t)
    assert torch.equal(logits[0, :5], logits2[0, :5])  # tokens before the image cannot see it
    assert (vel2[0, 5] - vel[0, 5]).abs().max() > 1e-4  # the FIRST slot sees the last one (both ways in an image)
    assert (logits2[0, 9:] - logits[0, 9:]).abs().max() > 1e-4  # the text after the image reads it
    assert torch.equal(logits3, logits) and torch.equal(vel3, vel)
    # the timestep enters as well
    with torch.no_grad():
        _, vel4 = model(ids, latents=lat, timesteps=torch.full_like(t, 0.9))
    assert (vel4[0, 5:9] - vel[0, 5:9]).abs().max() > 1e-4


def test_model_loss_is_text_cross_entropy_plus_weighted_flow_mse():
    from megannm.model.latents import interpolate
    model = make(loss_weights={"image": 2.5})
    torch.nn.init.normal_(model.head.velocity.proj.weight, std=0.1)
    ids = torch.tensor([row([1, 2, 3], 4, [5, 6, 7]), row([8], 4, [9, 10, 11, 12, 13])])
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, ids.shape[1], C, generator=gen), torch.randn(2, ids.shape[1], C, generator=gen)
    t = torch.rand(2, ids.shape[1], generator=gen)
    xt, target = interpolate(x0, noise, t)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), VOCAB.pad_id)], dim=1)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, -1] = 0
    flow_mask = (ids == SLOT).long()
    loss, stats = model(ids, labels=labels, loss_mask=loss_mask, latents=xt, timesteps=t, flow_target=target,
                        flow_mask=flow_mask)
    with torch.no_grad():
        logits, vel = model(ids, latents=xt, timesteps=t)
    text = (loss_mask == 1) & (labels != SLOT)  # the slots are no cross-entropy target
    ce = F.cross_entropy(logits[text], labels[text])
    mse = ((vel - target) ** 2).mean(-1)[flow_mask.bool()].mean()
    torch.testing.assert_close(loss, ce + 2.5 * mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["image_loss"], mse, rtol=1e-5, atol=1e-6)
    assert int(stats["image_tokens"]) == 8 and int(stats["text_tokens"]) == int(text.sum()) == 16


def test_denoising_steps_over_a_cached_prefix_equal_the_full_sequence():
    """Generation's step: the caption is cached once; each step runs only the image's slots (bidirectional among
    themselves, causal to the prefix) and gives the velocities the full forward gives."""
    model = make().eval()
    torch.nn.init.normal_(model.head.velocity.proj.weight, std=0.1)
    prefix = torch.tensor([[BOS, 1, 2, 3, BOI]])
    slots = torch.full((1, 4), SLOT)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, C, generator=gen)
    with torch.no_grad():
        full_ids = torch.cat([prefix, slots], dim=1)
        full_lat = torch.cat([torch.zeros(1, 5, C), x], dim=1)
        _, want = model(full_ids, latents=full_lat, timesteps=torch.full((1, 9), 0.5))
        cache = model.new_cache(1, 16)
        model(prefix, cache=cache, latents=torch.zeros(1, 5, C), timesteps=torch.zeros(1, 5))
        for step in range(2):  # the same step twice: nothing of the first stays in the cache
            cache.length = 5
            _, got = model(slots, cache=cache, latents=x, timesteps=torch.full((1, 4), 0.5))
            torch.testing.assert_close(got[0], want[0, 5:], rtol=1e-5, atol=1e-5)


def test_a_tiny_model_learns_the_velocity_of_a_caption_conditioned_latent():
    """Each of four captions names a latent; 150 steps of the flow objective bring the loss well under the
    untrained one, and a 10-step Euler integration from noise lands near the caption's latent."""
    from megannm.model.latents import interpolate, sample_timesteps
    model = make(seed=4)
    gen = torch.Generator().manual_seed(5)
    targets = torch.randn(4, 3, C, generator=gen)  # caption k -> a 3-slot latent
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([row([k + 1], 3) for k in range(4)])
    slot = (ids == SLOT)
    losses = []
    for step in range(150):
        x0 = torch.zeros(4, ids.shape[1], C)
        x0[slot] = targets.reshape(-1, C)
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_timesteps((4, 1), generator=gen).expand(4, ids.shape[1])
        xt, v = interpolate(x0, noise, t)
        labels = torch.cat([ids[:, 1:], torch.full((4, 1), VOCAB.pad_id)], dim=1)
        loss, stats = model(ids, labels=labels, loss_mask=(labels != VOCAB.pad_id).long(), latents=xt, timesteps=t,
                            flow_target=v, flow_mask=slot.long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(stats["image_loss"]))
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    model.eval()
    from megannm.model.draw import draw_latents
    prompts = torch.tensor([[BOS, k + 1, BOI] for k in range(4)])
    x = draw_latents(model, prompts, slots=3, steps=10, generator=torch.Generator().manual_seed(6))
    own, others = (x - targets).pow(2).mean(), (x - targets.roll(1, 0)).pow(2).mean()
    assert own < 0.5 * others  # each caption draws its own latent


def test_the_sampler_steps_over_the_cache_as_the_full_sequence_would_and_guides_by_the_written_rule():
    """Two Euler steps with guidance: ``draw_latents`` (prompt cached once, slots re-run each step) against the
    same steps written out with full, uncached forwards of prompt + slots."""
    from megannm.model.draw import draw_latents
    model = make(seed=8).eval()
    torch.nn.init.normal_(model.head.velocity.proj.weight, std=0.3)
    prompts, uncond = torch.tensor([[BOS, 1, 2, BOI], [BOS, 3, 4, BOI]]), torch.tensor([[BOS, BOI]] * 2)
    got = draw_latents(model, prompts, slots=3, steps=2, cfg_scale=2.5, uncond=uncond,
                       generator=torch.Generator().manual_seed(9))

    def velocity(prefix, x, t):
        ids = torch.cat([prefix, torch.full((2, 3), SLOT)], dim=1)
        lat = torch.cat([torch.zeros(2, prefix.shape[1], C), x], dim=1)
        with torch.no_grad():
            return model(ids, latents=lat, timesteps=torch.full(ids.shape, t))[1][:, -3:]

    x = torch.randn(2, 3, C, generator=torch.Generator().manual_seed(9))
    for t, dt in ((1.0, -0.5), (0.5, -0.5)):
        u = velocity(uncond, x, t)
        x = x + dt * (u + 2.5 * (velocity(prompts, x, t) - u))
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-5)
    assert (got - draw_latents(model, prompts, slots=3, steps=2, generator=torch.Generator().manual_seed(9))
            ).abs().max() > 1e-3  # guidance changed the picture


def test_pipeline_names_of_the_latent_modules_round_trip():
    from megannm.model.pipeline import canonical_to_pipeline, pipeline_to_canonical
    model = make()
    names = [n for n in model.state_dict() if ".latents." in n or ".velocity." in n]
    assert len(names) == 8
    for name in names:
        position, inner = canonical_to_pipeline(name, model.args.layers)
        assert pipeline_to_canonical(f"{position}.{inner}") == name


def test_conversion_round_trips_the_latent_modules_through_every_layout(tmp_path):
    """consolidated -> DeepSpeed at TP 2 x PP 2 -> consolidated keeps every tensor (the latent modules replicated on
    each tensor rank, in the first and last stage's files); the model loaded back gives the same velocities."""
    from megannm.checkpoint import consolidated
    from megannm.checkpoint.consolidated import Consolidated, normalise_args
    from megannm.checkpoint.deepspeed import read_deepspeed
    from megannm.checkpoint.opened import load_model
    from megannm.convert.deepspeed import write_deepspeed
    model = make(seed=7)
    torch.nn.init.normal_(model.head.velocity.proj.weight, std=0.1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in ("embedding.embed_tokens.weight", "head.output.weight"):
        state[k] = state[k][:VOCAB.size].clone()
    src = Consolidated(state, normalise_args(model.args, VOCAB), VOCAB, {"kind": "test"})
    consolidated.write(src, tmp_path / "c")
    write_deepspeed(consolidated.read(tmp_path / "c"), tmp_path / "ds", tp=2, pp=2)
    back = read_deepspeed(tmp_path / "ds")
    assert back.args.latent_channels == C
    names = [k for k in state if ".latents." in k or ".velocity." in k]
    assert len(names) == 8
    for k in state:
        assert torch.equal(back.state[k], state[k]), k
    loaded, _ = load_model(tmp_path / "c", LAYOUT)
    ids = torch.tensor([row([1, 2], 3)])
    lat, t = torch.randn(1, ids.shape[1], C), torch.full((1, ids.shape[1]), 0.4)
    with torch.no_grad():
        want = model.eval()(ids, latents=lat, timesteps=t)[1]
        got = loaded(ids, latents=lat, timesteps=t)[1]
    assert torch.equal(got, want) and want.abs().max() > 1e-3


def test_hugging_face_export_gives_the_logits_velocities_and_drawings_of_the_model(tmp_path):
    """The MoT remote-code class with megannm's latent modules: equal logits and velocities on a sequence with an
    image, and ``draw`` (DynamicCache, cropped each step) equal to ``draw_latents``."""
    from transformers import AutoModelForCausalLM

    from megannm.checkpoint.consolidated import Consolidated, normalise_args
    from megannm.convert.hf import export_hf
    from megannm.model.draw import draw_latents
    model = make(seed=10).eval()
    torch.nn.init.normal_(model.head.velocity.proj.weight, std=0.3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in ("embedding.embed_tokens.weight", "head.output.weight"):
        state[k] = state[k][:VOCAB.size].clone()
    export_hf(Consolidated(state, normalise_args(model.args, VOCAB), VOCAB, {"kind": "test"}), tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.tensor([row([1, 2], 4, [3, 4])])
    lat, t = torch.randn(1, ids.shape[1], C), torch.full((1, ids.shape[1]), 0.7)
    with torch.no_grad():
        logits, vel = model(ids, latents=lat, timesteps=t)
        out = theirs(input_ids=ids, latents=lat, timesteps=t)
    torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.velocity, vel, rtol=1e-4, atol=1e-5)
    assert vel.abs().max() > 1e-2
    prompts, uncond = torch.tensor([[BOS, 1, 2, BOI]]), torch.tensor([[BOS, BOI]])
    ours = draw_latents(model, prompts, slots=4, steps=3, cfg_scale=2.0, uncond=uncond,
                        generator=torch.Generator().manual_seed(11))
    drawn = theirs.draw(prompts, slots=4, steps=3, cfg_scale=2.0, uncond_ids=uncond,
                        generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(drawn, ours, rtol=1e-4, atol=1e-5)
