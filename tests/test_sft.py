"""SFT: chat layout and loss masks, bad records, per-token normalisation over the global batch, packing with document
masks, and a short run through the real Trainer (one process, then the same recipe on 2 data-parallel ranks).

Engines and models are tiny and shared; there is one multi-process launch (``megannm train`` under torchrun).
"""
import json
import math
import warnings

import numpy as np
import pytest
import torch

from tests import dist

warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SEQ = 176  # two short conversations (77-100 tokens each) fit one packed sequence of SEQ + 1


@pytest.fixture(scope="module", autouse=True)
def parallel_state():
    from megannm.parallel import init_parallel
    layout = init_parallel(1, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield layout  # no shutdown: other modules of the session may still use the process group
    torch.set_num_threads(threads)


def recipe(toy_data, out, name="sft", **over):
    from megannm.config import recipe_from_dict
    shards = toy_data["shards"]
    d = {"name": name, "seed": 5, "phase": {"kind": "sft"},
         "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": 256,
                   "z_loss": 1e-4},
         "parallel": {"zero_stage": 1},
         "data": {"train": [{"path": str(shards / "sft_train")}], "valid": [{"path": str(shards / "sft_valid")}],
                  "seq_len": SEQ, "micro_batch_size": 2, "global_batch_size": 4, "pack": True},
         "optimizer": {"lr": 3e-3, "min_lr": 3e-4},
         "schedule": {"train_steps": 3, "warmup_steps": 1},
         "logging": {"dir": str(out / name), "interval": 1, "eval_batches": 2, "progress_bar": False,
                     "tensorboard": False}}
    for k, v in over.items():
        a, b = k.split("__")
        d[a][b] = v
    return recipe_from_dict(d, source=name)


# ---------------------------------------------------------------------------------------------------------------------
# the chat layout


def test_hand_written_conversation_masks_exactly_the_assistant_turns(tok, tmp_path):
    """system + user(image, text) -> assistant text -> user text -> assistant image: the mask is 1 exactly on the
    assistant's content (image span included) and its <|end|>; the generation prompt is the same layout."""
    from PIL import Image

    from megannm.data.tokenize import encode_record
    from megannm.generate import chat_prompt
    from megannm.toy import world as toy
    a = toy.Attrs("triangle", "blue", "small", "top left")
    img = toy.render(a, np.random.default_rng(0))
    Image.fromarray(img).save(tmp_path / "a.png")
    record = {"messages": [
        {"role": "system", "content": "you draw shapes"},
        {"role": "user", "content": [{"type": "image", "image": "a.png"},
                                     {"type": "text", "text": "what colour is it?"}]},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": [{"type": "text", "text": "now make it red"}]},
        {"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}]}
    tokens, mask = encode_record(record, tok, tmp_path, "hand.jsonl:1")
    v = tok.vocab
    sp = v.special
    codes = v.image_ids(tok.image.encode(img[None])[0]).tolist()
    t = tok.text_ids
    expected = [(v.bos_id, 0), (sp("<|system|>"), 0), *[(i, 0) for i in t("you draw shapes")], (sp("<|end|>"), 0),
                (sp("<|user|>"), 0), (v.boi_id, 0), *[(c, 0) for c in codes], (v.eoi_id, 0),
                *[(i, 0) for i in t("what colour is it?")], (sp("<|end|>"), 0),
                (sp("<|assistant|>"), 0), *[(i, 1) for i in t("blue")], (sp("<|end|>"), 1),
                (sp("<|user|>"), 0), *[(i, 0) for i in t("now make it red")], (sp("<|end|>"), 0),
                (sp("<|assistant|>"), 0), (v.boi_id, 1), *[(c, 1) for c in codes], (v.eoi_id, 1), (sp("<|end|>"), 1),
                (v.eos_id, 0)]
    assert tokens.tolist() == [i for i, _ in expected]
    assert mask.tolist() == [m for _, m in expected]
    assert int(mask.sum()) == len(t("blue")) + 1 + len(codes) + 3
    # what generation feeds the model is this same layout, up to the turn it answers
    msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else [{"type": "image", "image": img} if p["type"] == "image" else p for p in m["content"]]}
            for m in record["messages"]]
    prompt = chat_prompt(tok, msgs[:4], answer="image")
    assert prompt == tokens[:len(prompt)].tolist() and prompt[-1] == v.boi_id


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "messages[0]: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "images/nope.png"}]},
                   {"role": "assistant", "content": "red"}]}, "image file not found"),
    ({"messages": [{"role": "user", "content": "what colour is it?"}, {"role": "assistant", "content": ""}]},
     "messages[1]: empty assistant turn"),
], ids=["unknown-role", "missing-image", "empty-assistant"])
def test_malformed_record_is_one_line_naming_file_and_line(toy_data, tmp_path, capsys, bad, message):
    from megannm.cli import main
    good = json.loads((toy_data["chat"] / "train.jsonl").read_text().splitlines()[0])
    src = toy_data["chat"] / f"bad-{tmp_path.name}.jsonl"  # beside the good record's images
    src.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")  # the bad record is on line 3
    try:
        code = main(["preprocess", "-i", str(src), "-o", str(tmp_path / "out"), "-t", str(toy_data["tokenizers"]),
                     "--workers", "1", "--no-progress"])
    finally:
        src.unlink()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{src.name}:3: " in err[0] and message in err[0], err[0]
    assert not (tmp_path / "out").exists()  # nothing half-written


# ---------------------------------------------------------------------------------------------------------------------
# packing and normalisation on a real DeepSpeed engine


@pytest.fixture(scope="module")
def convs(toy_data):
    """Four short conversations of the chat shards (two fit one sequence) and their stream for ``collate``: the two
    with the most loss tokens (drawings) then the two with the fewest (answers), so that the two micro-batches hold
    different numbers of loss tokens (what tells the per-token normalisation from the per-micro-batch mean)."""
    from megannm.data.loader import SampleStream
    from megannm.data.shards import ShardDataset
    ds = ShardDataset(toy_data["shards"] / "sft_train")
    stream = SampleStream(ds, 0, SEQ, seed=0)
    short = [i for i in range(min(len(ds), 200)) if ds.doc_lengths[i] <= (SEQ + 1) // 2]
    loss_tokens = sorted((int(batch_of(stream, [[i]])["loss_mask"].sum()), i) for i in short)
    docs = [i for _, i in loss_tokens[-2:] + loss_tokens[:2]]
    assert len(set(docs)) == 4 and loss_tokens[-2][0] > 4 * loss_tokens[1][0]
    return stream, docs


def batch_of(stream, rows):
    """One micro-batch: each row packs the given documents in order."""
    from megannm.data.loader import collate
    samples = [(stream, [(d, False, 0, int(stream.ds.doc_lengths[d])) for d in row]) for row in rows]
    return collate(samples, SEQ, stream.ds.vocab.pad_id)


@pytest.fixture(scope="module")
def engines(toy_data, tmp_path_factory, parallel_state):
    """ZeRO-0 engines with identical initial weights: one per gradient-accumulation count."""
    from megannm.train.engine import build_engine
    from megannm.model.build import build_model
    from megannm.train.loop import load_vocab
    out = tmp_path_factory.mktemp("engines")
    made = {}
    for accum in (1, 2):
        r = recipe(toy_data, out, parallel__zero_stage=0, data__micro_batch_size=2, data__global_batch_size=2 * accum)
        _, module = build_model(r, load_vocab(r), parallel_state)
        made[accum] = build_engine(r, parallel_state, module)
    return made


def step_grads(engine, phase, batches):
    """The Trainer's step without the optimizer: loss of the step (mean over micro-batches, as logged) and the
    gradient DeepSpeed would apply."""
    batches = phase.prepare(batches) if phase is not None else batches
    total = 0.0
    for b in batches:
        if phase is not None:
            loss, _ = phase.loss(engine, b)
        else:  # the pretraining normalisation: mean over each micro-batch
            loss, _ = engine(input_ids=b["input_ids"], position_ids=b["position_ids"],
                             document_ids=b["document_ids"], labels=b["labels"], loss_mask=b["loss_mask"])
        engine.backward(loss)  # divides by gradient_accumulation_steps; ZeRO 0 at dp 1 accumulates in .grad
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
    for p in engine.module.parameters():
        p.grad = None
    return total / len(batches), grads


def test_packed_and_unpacked_give_the_same_loss_and_gradients(engines, convs, toy_data, tmp_path, parallel_state):
    """The same 4 conversations as 2 micro-batches x 2 sequences (one each) and as 1 micro-batch x 2 sequences
    (two each): per-token normalisation over the step makes loss and gradients equal; the per-micro-batch mean
    does not."""
    from megannm.phases.sft import SFTPhase
    from megannm.vocab import Vocab
    stream, (a, b, c, d) = convs
    phase = SFTPhase(recipe(toy_data, tmp_path), parallel_state, Vocab.load(toy_data["shards"] / "sft_train" /
                                                                           "vocab.json"))
    unpacked = lambda: [batch_of(stream, [[a], [b]]), batch_of(stream, [[c], [d]])]
    packed = lambda: [batch_of(stream, [[a, b], [c, d]])]
    assert sum(float(x["loss_mask"].sum()) for x in unpacked()) == float(packed()[0]["loss_mask"].sum())
    loss_u, grad_u = step_grads(engines[2], phase, unpacked())
    loss_p, grad_p = step_grads(engines[1], phase, packed())
    assert loss_p == pytest.approx(loss_u, rel=2e-6)
    for name in grad_u:
        torch.testing.assert_close(grad_p[name], grad_u[name], rtol=1e-4, atol=1e-8, msg=name)
    # the per-micro-batch mean (the pretraining path) differs on the same data: the test can tell
    loss_u0, grad_u0 = step_grads(engines[2], None, unpacked())
    loss_p0, grad_p0 = step_grads(engines[1], None, packed())
    assert loss_p0 == pytest.approx(loss_p, rel=2e-6)  # one micro-batch: the two normalisations agree
    assert abs(loss_u0 - loss_u) > 1e-3
    assert max(float((grad_u0[n] - grad_p0[n]).abs().max()) for n in grad_u0) > 1e-4


@torch.no_grad()
def test_no_attention_crosses_a_conversation(engines, convs):
    """Changing one packed conversation leaves the logits of the other unchanged (and equal to it alone)."""
    stream, (a, b, _, _) = convs
    model = engines[1].module
    model.eval()
    packed = batch_of(stream, [[a, b]])
    la, lb = int(stream.ds.doc_lengths[a]), int(stream.ds.doc_lengths[b])
    assert packed["position_ids"][0, la].item() == 0 and packed["document_ids"][0, la].item() == 1
    logits = lambda x: model(x["input_ids"], position_ids=x["position_ids"], document_ids=x["document_ids"])
    base = logits(packed)
    v = stream.ds.vocab
    ids = packed["input_ids"].clone()  # perturb a: other ids of the same modality (the MoT routing keeps its sizes)
    first = ids[0, 1:la]
    image = v.is_image(first)
    first[image] = v.image_start + (first[image] - v.image_start + 7) % v.image_codes
    first[~image] = torch.where(first[~image] < v.text_size, (first[~image] + 11) % v.text_size, first[~image])
    changed = logits({**packed, "input_ids": ids})
    span = slice(la, la + lb - 1)
    assert (changed[0, :la] - base[0, :la]).abs().max() > 1e-3  # a's logits did change
    torch.testing.assert_close(changed[0, span], base[0, span], rtol=0, atol=1e-6)
    alone = logits(batch_of(stream, [[b]]))
    torch.testing.assert_close(alone[0, :lb - 1], base[0, span], rtol=1e-5, atol=1e-5)
    model.train()


# ---------------------------------------------------------------------------------------------------------------------
# the real Trainer: one process, then 2 data-parallel ranks under torchrun


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory, parallel_state):
    from megannm.train.logging import read_metrics
    from megannm.stage import build_trainer
    out = tmp_path_factory.mktemp("sft_run")
    r = recipe(toy_data, out)
    trainer = build_trainer(r, parallel_state, source="test")
    assert type(trainer.phase).__name__ == "SFTPhase"
    trainer.run()
    return r, [m for m in read_metrics(out / r.name) if m.get("split") == "train"], out


def test_sft_run_loss_counts_only_assistant_tokens(trained, toy_data, parallel_state):
    """Step 1's logged loss is the per-token mean over exactly the assistant tokens of the step's micro-batches,
    computed here from the initial weights (same seed) and the shards' masks."""
    from megannm.data.loader import build_train_iterator
    from megannm.model.build import build_model
    from megannm.train.loop import load_vocab
    r, metrics, _ = trained
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    d = r.data
    it = build_train_iterator([(d.train[0].path, 1.0)], None, d.seq_len, d.micro_batch_size, d.global_batch_size,
                              0, 1, d.seed, pack=True)
    batches = [next(it) for _ in range(d.global_batch_size // d.micro_batch_size)]
    vocab = load_vocab(r)
    roles = torch.tensor([vocab.special(f"<|{x}|>") for x in ("system", "user", "assistant")] + [vocab.bos_id])
    n = 0.0
    for b in batches:
        trained_labels = b["labels"][b["loss_mask"] > 0]
        assert not torch.isin(trained_labels, roles).any()  # never a role marker, never a prompt start
        assert 0 < b["loss_mask"].sum() < (b["labels"] != vocab.pad_id).sum()  # prompts are real tokens, not trained
        n += float(b["loss_mask"].sum())
    assert metrics[0]["text_tokens"] + metrics[0]["image_tokens"] == n
    _, model = build_model(r, vocab, parallel_state)
    with torch.no_grad():
        total = 0.0
        for b in batches:
            logits = model(b["input_ids"], position_ids=b["position_ids"], document_ids=b["document_ids"]).double()
            lse = torch.logsumexp(logits, -1)
            ce = lse - logits.gather(-1, b["labels"][..., None])[..., 0]
            total += float(((ce + r.model.z_loss * lse ** 2) * b["loss_mask"]).sum())
    assert metrics[0]["loss"] == pytest.approx(total / n, rel=1e-5)


@pytest.mark.distributed
def test_two_data_parallel_ranks_match_one(trained, toy_data):
    """`megannm train` on 2 ranks (dp 2 x accum 1) logs the same losses and gradient norms as 1 rank (dp 1 x accum
    2): the scale accum * dp / N undoes DeepSpeed's averaging in both."""
    r, ref, out = trained
    path = out / "dp2.yaml"
    d = r.model_dump(mode="json")
    d["name"], d["logging"]["dir"] = "dp2", str(out / "dp2")
    path.write_text(json.dumps(d))
    dist.run(["-m", "megannm", "train", str(path)], nproc=2, launcher="torchrun")
    from megannm.train.logging import read_metrics
    got = [m for m in read_metrics(out / "dp2") if m.get("split") == "train"]
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in ref], rel=0, abs=1e-5)
    assert [m["grad_norm"] for m in got] == pytest.approx([m["grad_norm"] for m in ref], rel=1e-4)
    assert [m["text_tokens"] + m["image_tokens"] for m in got] == [m["text_tokens"] + m["image_tokens"] for m in ref]
