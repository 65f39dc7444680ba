"""The "train on your own data" path as a user runs it, in one test: real-photo records -> `megannm tokenizers
build` (a learned image tokenizer) -> `megannm preprocess` -> `megannm train` (a few steps) -> `megannm generate` an
image and a caption -> `megannm evaluate --data`; and the bad inputs of that path, each one line naming the file."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from megannm.cli import main as megannm
from tests.photos import write_photo_records

RECIPE = """\
name: own
seed: 0
model: {hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 128}
parallel: {zero_stage: 0}
data: {train: [{path: %(shards)s}], seq_len: %(seq_len)d, micro_batch_size: 4, global_batch_size: 4, pack: true}
optimizer: {lr: 1.0e-2, min_lr: 1.0e-3}
schedule: {train_steps: 4, warmup_steps: 1}
logging: {dir: %(run)s, interval: 1, progress_bar: false, tensorboard: false}
"""


def test_own_data_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = write_photo_records(tmp_path / "raw", 24, seed=0)
    test = write_photo_records(tmp_path / "test", 6, seed=1, split="heldout")
    tok, shards, run = tmp_path / "tok", tmp_path / "shards", tmp_path / "run"

    assert megannm(["tokenizers", "build", "-i", str(train), "-o", str(tok), "--image-kind", "learned",
                    "--codebook-size", "64", "--steps", "8", "--batch-size", "8", "--text-vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "image:  learned, 64 codes, 64 tokens per image (8x8 at 32x32 px, crop)" in out
    assert "fit:    reconstruction on" in out and "PSNR" in out and "data.seq_len must be at least 65" in out
    assert sorted(p.name for p in tok.iterdir()) == ["build.json", "image_tokenizer", "text", "vocab.json"]
    assert not (tok / "image_tokenizer" / "train_state.pt").exists()  # the training state stays out of the bundle
    assert not list(tmp_path.glob(".tok*"))  # no staging folder left behind
    from transformers import JanusVQVAE
    JanusVQVAE.from_pretrained(str(tok / "image_tokenizer"), local_files_only=True)  # loads without megannm

    assert megannm(["preprocess", "-i", str(train), "-o", str(shards), "-t", str(tok), "-w", "1",
                    "--no-progress"]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["image_tokens_per_image"] == 64 and manifest["num_images"] == 24
    per_doc = manifest["tokens_per_doc"]
    assert per_doc["image"] == {"min": 64, "median": 64.0, "max": 64} and per_doc["text"]["min"] >= 4
    assert "tokens per document (min / median / max): text" in out and "image 64 / 64 / 64" in out
    seq_len = per_doc["total"]["max"] - 1
    assert f"data.seq_len >= {seq_len} keeps every document whole" in out

    recipe = tmp_path / "own.yaml"
    recipe.write_text(RECIPE % {"shards": shards, "seq_len": seq_len + 8, "run": run})
    assert megannm(["train", str(recipe)]) == 0
    ckpt = run / "checkpoints"

    picture = tmp_path / "test" / "images" / "000.png"
    assert megannm(["generate", str(ckpt), "--tokenizers", str(tok), "--caption", "a cat", "--out",
                    str(tmp_path / "gen")]) == 0
    drawn = np.asarray(Image.open(tmp_path / "gen" / "image_000.png"))
    assert drawn.shape == (32, 32, 3)  # decoded by the learned tokenizer's own decoder
    assert megannm(["generate", str(ckpt), "--tokenizers", str(tok), "--image", str(picture), "--out",
                    str(tmp_path / "cap")]) == 0  # a 40-160 px photo, fitted as preprocess fits them
    assert json.loads((tmp_path / "cap" / "results.json").read_text())[0]["image"] == str(picture)
    capsys.readouterr()

    assert megannm(["evaluate", str(ckpt), "--tokenizers", str(tok), "--data", f"test={test}", "--out",
                    str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["records"]["test"] == report["captioned"]["test"] == 6
    from megannm.data.tokenize import Tokenizers
    uniform = math.log(Tokenizers.load(tok).vocab.size)  # an untrained model's loss (step 1 logged ~ this)
    for key in ("image_to_text_loss", "text_to_image_loss"):  # measured 5.23 and 4.83 against 5.9
        assert 0 < report[key]["test"] < uniform - 0.25, (key, report[key], uniform)
    assert round(report["caption_exact_match"]["test"] * 6, 9) % 1 == 0  # a count of the 6 captioned records
    assert report["cfg_scale"] == 1.0  # the default shared with generate
    assert Image.open(tmp_path / "eval" / "samples.png").size[1] >= 2 * 150  # captions row + drawn row
    assert "image->text loss" in capsys.readouterr().out


def _error(capsys, argv) -> str:
    assert megannm(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_own_data_bad_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    train = write_photo_records(tmp_path / "raw", 6, seed=0)
    tok = tmp_path / "tok"
    assert megannm(["tokenizers", "build", "-i", str(train), "-o", str(tok), "--codebook-size", "64",
                    "--text-vocab-size", "300"]) == 0
    out = capsys.readouterr().out
    assert "warning: patch_vq is lossy here:" in out
    assert "Try: --patch 2" in out or "Try: --image-kind learned" in out

    err = _error(capsys, ["preprocess", "-i", str(train), "-o", str(tmp_path / "s"), "-t", str(tmp_path / "nope"),
                          "-w", "1"])
    assert "nope: tokenizers folder not found" in err
    err = _error(capsys, ["preprocess", "-i", str(train), "-o", str(tmp_path / "s"), "-t", str(tok / "text"), "-w",
                          "1"])
    assert "text: not a tokenizers folder (no vocab.json); it looks like a text tokenizer" in err

    (tmp_path / "raw" / "images" / "000.png").write_bytes(b"not a picture")
    err = _error(capsys, ["preprocess", "-i", str(train), "-o", str(tmp_path / "s"), "-t", str(tok), "-w", "1"])
    assert "records.jsonl:1: image cannot be read:" in err and "000.png" in err
    err = _error(capsys, ["tokenizers", "build", "-i", str(train), "-o", str(tmp_path / "tok2")])
    assert "records.jsonl:1: image cannot be read:" in err

    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(tmp_path / "raw" / "images" / "000.png")
    err = _error(capsys, ["preprocess", "-i", str(train), "-o", str(tmp_path / "s"), "-t", str(tok), "-w", "1"])
    assert "records.jsonl:1:" in err and "image is 3x3 px, too small" in err

    from megannm.data.shards import check_seq_len
    manifest = {"image_tokens_per_image": 64, "num_images": 6}
    with pytest.raises(ValueError, match=r"^s/manifest.json: an image takes 66 tokens \(<boi> \+ 64 codes \+ "
                                         r"<eoi>\) but data.seq_len is 48: set data.seq_len >= 65"):
        check_seq_len(manifest, 48, "s/manifest.json")
    check_seq_len(manifest, 65, "s/manifest.json")
