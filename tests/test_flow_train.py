"""Continuous images through the whole training path: records -> a ``pixels`` tokenizer bundle -> shards holding the
latents -> the loader's timesteps and noise -> the Trainer on real DeepSpeed engines. TP 2, PP 2 and ZeRO-3 over
two ranks give the one-rank run's losses; a resume continues bitwise. Numbers asserted."""
import json
import shutil

import numpy as np
import pytest
import torch

from tests import dist

STEPS = 6


@pytest.fixture(scope="module")
def data(toy_data, tmp_path_factory):
    """The toy world's training records, its text tokenizer, pixel patches as latents (4 x 4 x RGB = 48 numbers a
    slot, 64 slots a picture)."""
    from megannm.data.image_tokenizer.pixels import PixelPatches
    from megannm.data.preprocess import preprocess
    from megannm.data.tokenize import Tokenizers
    out = tmp_path_factory.mktemp("flow")
    PixelPatches((32, 32), 4).save(out / "pixels.npz")
    Tokenizers.build(toy_data["tokenizers"] / "text", out / "pixels.npz").save(out / "tok")
    preprocess([toy_data["raw"] / "train.jsonl"], out / "shards", out / "tok", progress=False)
    return out


def recipe(data, name, **parallel):
    par = {"zero_stage": 1, **parallel}
    text = f"""
name: {name}
seed: 3
model: {{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96,
         loss_weights: {{image: 2.0}}}}
parallel: {json.dumps(par)}
data: {{train: [{{path: {data / 'shards'}}}], seq_len: 80, micro_batch_size: 2, global_batch_size: 4}}
optimizer: {{lr: 3.0e-3}}
schedule: {{train_steps: {STEPS}, warmup_steps: 1}}
checkpoint: {{save_interval: 3, keep_last: 2}}
logging: {{dir: {data / name}, interval: 1, progress_bar: false}}
"""
    p = data / f"{name}.yaml"
    p.write_text(text)
    return p


def losses(data, name):
    rows = [json.loads(line) for line in (data / name / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") == "train"]
    return [r["text_loss"] for r in train], [r["image_loss"] for r in train], [r["step"] for r in train]


@pytest.fixture(scope="module")
def runs(data):
    train = ["-m", "megannm", "train"]
    dist.run(train + [str(recipe(data, "ref"))], nproc=1, launcher="single")
    # the reference's step-3 checkpoint, resumed in a folder of its own
    ckpt = data / "resumed" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copytree(data / "ref" / "checkpoints" / "step00000003", ckpt / "step00000003")
    (ckpt / "latest").write_text("step00000003")
    dist.run(train + [str(recipe(data, "resumed")), "--resume"], nproc=1, launcher="single")
    dist.run(train + [str(recipe(data, "tp2", tensor_parallel=2))], nproc=2, launcher="torchrun")
    dist.run(train + [str(recipe(data, "pp2", pipeline_parallel=2))], nproc=2, launcher="deepspeed")
    dist.run(train + [str(recipe(data, "zero3", zero_stage=3))], nproc=2, launcher="torchrun")
    return data


def test_shards_hold_the_latents_and_give_the_pictures_back(data, toy_data):
    """Pixel patches in float16 are exact for 8-bit pictures: the shard's latents decode to the record's image."""
    from PIL import Image

    from megannm.data.shards import ShardDataset
    from megannm.data.tokenize import Tokenizers, decode_tokens
    tok = Tokenizers.load(data / "tok")
    assert (tok.vocab.image_codes, tok.vocab.latent_channels) == (1, 48)
    ds = ShardDataset(data / "shards")
    records = [json.loads(line) for line in (toy_data["raw"] / "train.jsonl").read_text().splitlines()]
    for i in (0, 1, 7):
        tokens, _ = ds.get(i)
        parts = decode_tokens(tokens, tok, ds.latents(i))
        image = next(p["image"] for p in parts if "image" in p)
        path = next(p["image"] for p in records[i]["parts"] if "image" in p)
        assert np.array_equal(image, np.asarray(Image.open(toy_data["raw"] / path).convert("RGB")))
        assert int((tokens == tok.vocab.slot_id).sum()) == 64 == len(ds.latents(i))


def test_loader_noises_the_images_a_sample_generates_and_keeps_the_ones_it_reads_clean(data):
    from megannm.data.loader import build_train_iterator
    from megannm.data.tokenize import Tokenizers
    vocab = Tokenizers.load(data / "tok").vocab

    def batch(plan_dir):
        it = build_train_iterator([(data / "shards", 1.0)], vocab, seq_len=80, micro_batch_size=8,
                                  global_batch_size=8, dp_rank=0, dp_size=1, seed=0, plan_dir=plan_dir)
        return next(it)

    b = batch(data / "plans_a")
    slot = b["input_ids"] == vocab.slot_id
    gen = b["flow_mask"].bool()
    assert gen.sum() > 0 and (slot & ~gen).sum() > 0  # both kinds in 8 samples (a third of the records caption)
    for r in range(8):
        ids = b["input_ids"][r]
        first = int(torch.nonzero(slot[r])[0]) if slot[r].any() else None
        if first is None:
            continue
        text_after = bool(((ids[first:] < vocab.text_size) & (b["loss_mask"][r, first - 1:-1] > 0)).any())
        assert bool(gen[r, first]) == (not text_after)  # generated iff no trained text follows the picture
        t = b["timesteps"][r][slot[r]]
        assert (t == t[0]).all() and ((0 < t[0] < 1) if gen[r, first] else t[0] == 0)
    assert torch.equal(b["noise"][~gen], torch.zeros_like(b["noise"][~gen]))
    assert 0.9 < float(b["noise"][gen].std()) < 1.1
    again = batch(data / "plans_b")  # the same seed, another plan cache: the same draws
    assert torch.equal(again["noise"], b["noise"]) and torch.equal(again["timesteps"], b["timesteps"])


def test_every_layout_trains_continuous_images_to_the_same_losses(runs):
    ref_text, ref_image, steps = losses(runs, "ref")
    assert steps == list(range(1, STEPS + 1))
    assert all(x > 0.1 for x in ref_image) and ref_image[-1] < ref_image[0]  # the flow loss falls
    for name in ("tp2", "pp2", "zero3"):
        text, image, _ = losses(runs, name)
        assert text == pytest.approx(ref_text, rel=0, abs=2e-4), name
        assert image == pytest.approx(ref_image, rel=0, abs=2e-4), name


def test_resume_continues_bitwise(runs):
    ref_text, ref_image, _ = losses(runs, "ref")
    text, image, steps = losses(runs, "resumed")
    assert steps == [4, 5, 6]
    assert text == ref_text[3:] and image == ref_image[3:]


def test_generate_draws_for_captions_and_captions_pictures_from_the_trained_run(runs, toy_data, tmp_path):
    """``megannm generate`` on the continuous run: a caption -> the flow sampler -> a PNG of the tokenizer's size;
    a picture -> its latents at the prompt's slots -> the batched decoder's caption."""
    from PIL import Image

    from megannm.cli import main
    records = [json.loads(line) for line in (toy_data["raw"] / "train.jsonl").read_text().splitlines()]
    picture = toy_data["raw"] / next(p["image"] for p in records[0]["parts"] if "image" in p)
    code = main(["generate", str(runs / "ref" / "checkpoints"), "--tokenizers", str(runs / "tok"), "--caption",
                 "a small red circle", "--image", str(picture), "--out", str(tmp_path / "gen"),
                 "--max-new-tokens", "6"])
    assert code == 0
    results = json.loads((tmp_path / "gen" / "results.json").read_text())
    assert len(results) == 2 and results[0]["caption"] == "a small red circle"
    drawn = np.asarray(Image.open(results[0]["image"]))
    assert drawn.shape == (32, 32, 3) and drawn.std() > 0  # a picture, not a blank
    assert isinstance(results[1]["caption"], str) and results[1]["image"] == str(picture)


def test_the_continuous_demo_runs_its_chain_and_reports_both_directions(tmp_path):
    """``megannm demo --images continuous`` at a tiny size: both stages train, the report has the discrete demo's
    shape (captions read from clean latents, drawings from the flow sampler, judged by the same checker)."""
    from megannm.cli import main
    out = tmp_path / "demo"
    code = main(["demo", "--images", "continuous", "--out", str(out), "--n-train", "200", "--n-valid", "20",
                 "--eval-n", "4", "--workers", "1", "schedule.train_steps=3", "schedule.warmup_steps=1"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["checkpoint"].endswith("anneal/checkpoints/step00000003")
    for key in ("caption_accuracy", "image_accuracy"):
        assert set(report[key]) == {"seen", "heldout"}
        assert set(report[key]["seen"]) == {"kind", "colour", "size", "position"}
    assert 0 < report["loss"]["seen"]["text_loss"] < 7.0  # the captions' loss, read from the clean pictures
    assert (out / "samples.png").stat().st_size > 0
