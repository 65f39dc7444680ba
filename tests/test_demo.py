"""The embedded default end to end (tiny), generation with and without the KV cache, constrained decoding, and the
evaluation's ground truth scoring >= 0.99."""
import json

import numpy as np
import pytest
import torch

from tests import dist

TINY = ["schedule.train_steps=3", "schedule.warmup_steps=1", "model.hidden_size=32", "model.num_layers=2",
        "model.num_heads=4", "model.ffn_hidden_size=64", "data.micro_batch_size=8", "data.global_batch_size=8"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run = dist.run(["-m", "megannm", "demo", "--out", str(out), "--n-train", "300", "--n-valid", "20",
                    "--eval-n", "6", *TINY], nproc=1, launcher="single", timeout=600)
    return out, run


def test_demo_writes_report_picture_and_event_files(demo):
    out, run = demo
    report = json.loads((out / "report.json").read_text())
    for what in ("caption_accuracy", "image_accuracy"):
        for split in ("seen", "heldout"):
            accs = report[what][split]
            assert set(accs) == {"kind", "colour", "size", "position"}
            assert all(round(v * 6, 9) == int(round(v * 6)) for v in accs.values()), accs  # hits of 6 prompts
    assert report["n_per_split"] == 6 and report["chance"]["colour"] == pytest.approx(1 / 6)
    # both directions scored on the pretrained model, chat on the SFT model (and before it, on the pretrained one)
    assert "/anneal/checkpoints/" in report["checkpoint"] and "/sft/checkpoints/" in report["chat"]["checkpoint"]
    for key in ("chat", "chat_before_sft"):
        assert set(report[key]["answer_accuracy"]["heldout"]) == {"kind", "colour", "size", "position"}
    assert report["wall_seconds"] > 0 and report["demo_wall_seconds"] >= report["wall_seconds"]
    from PIL import Image
    assert Image.open(out / "samples.png").size[0] > 300
    events = sorted((out / "runs").glob("*/tensorboard/events.out.tfevents.*"))
    assert {p.parts[-3] for p in events} >= {"align", "joint", "anneal"}
    assert "report:" in run.stdout and "samples.png" in run.stdout
    # each stage started from the previous stage's checkpoint
    joint = [json.loads(x) for x in (out / "runs" / "joint" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "initialised" and "align" in e["detail"] for e in joint)


@pytest.fixture(scope="module")
def model_and_tok(demo):
    from megannm import parallel
    from megannm.checkpoint.opened import load_model
    from megannm.data.tokenize import Tokenizers
    out, _ = demo
    layout = parallel.init_parallel(1, 1)
    tok = Tokenizers.load(out / "tokenizers")
    model, _ = load_model(out / "runs" / "anneal" / "checkpoints", layout, vocab=tok.vocab)
    return model, tok


def _greedy_without_cache(model, prompt, n, allowed):
    ids = torch.tensor([prompt])
    for _ in range(n):
        pos = torch.arange(ids.shape[1])[None]
        logits = model(ids, position_ids=pos, document_ids=torch.zeros_like(pos))[:, -1]
        logits = logits.masked_fill(~allowed, float("-inf"))
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def test_kv_cache_generation_equals_full_recompute(model_and_tok):
    from megannm.generate import _allowed_mask, generate, image_prompt
    from megannm.toy import world as toy
    model, tok = model_and_tok
    v = tok.vocab
    prompts = [image_prompt(tok, toy.caption(a)) for a, _, _ in toy.make_examples(2, seed=1)]
    cached = generate(model, v, prompts, "image", cfg_scale=1.0)
    allowed = _allowed_mask(v, v.size, "image", "cpu")
    for p, c in zip(prompts, cached):
        assert c == _greedy_without_cache(model, p, v.image_grid, allowed)


def test_constrained_decoding_stays_in_the_image_range(model_and_tok):
    from megannm.generate import SamplingConfig, generate, image_prompt
    from megannm.toy import world as toy
    model, tok = model_and_tok
    v = tok.vocab
    prompts = [image_prompt(tok, toy.caption(a)) for a, _, _ in toy.make_examples(8, seed=2)]
    rows = generate(model, v, prompts, "image", sampling=SamplingConfig(greedy=False, temperature=1.5, seed=3),
                    cfg_scale=2.0)
    for r in rows:
        assert len(r) == v.image_grid
        assert all(v.image_start <= t < v.image_end for t in r)


def test_top_k_and_top_p_restrict_the_support():
    from megannm.generate import SamplingConfig, pick
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(pick(logits, SamplingConfig(greedy=False, top_k=2), g).tolist()) == {3, 4}
    # softmax mass of the top token is 0.64: top_p 0.5 keeps it alone
    assert set(pick(logits, SamplingConfig(greedy=False, top_p=0.5), g).tolist()) == {4}


def test_evaluation_scores_ground_truth_at_099(toy_data):
    from megannm.data.tokenize import Tokenizers
    from megannm.toy import world as toy
    from megannm.toy.evaluate import score_captions, score_images
    tok = Tokenizers.load(toy_data["tokenizers"])
    for split in ("seen", "heldout"):
        ex = toy.make_examples(200, seed=5, split=split)
        truths = [a for a, _, _ in ex]
        images = np.stack([img for _, img, _ in ex])
        # the same path generated output takes: through the image tokenizer, and captions through the text tokenizer
        recon = tok.image.decode(tok.image.encode(images))
        caps = [tok.text.decode(tok.text.encode(c, add_special_tokens=False)) for _, _, c in ex]
        assert min(score_images(recon, truths).values()) >= 0.99
        assert min(score_captions(caps, truths).values()) >= 0.99
        # and a wrong attribute is caught
        wrong = [c.replace("red", "blue") if "red" in c else c.replace("blue", "red") for c in caps]
        assert score_captions(wrong, truths)["colour"] < 0.9
