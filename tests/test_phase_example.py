"""The README's example phase, exactly as printed there: one file, one registry line, trained by the real Trainer."""
import importlib
import math
import re
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def example_source() -> str:
    text = README.read_text()
    m = re.search(r"<!-- example-phase -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its example phase"
    return m.group(1)


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """The example as a module of its own on sys.path, plus its one registry line."""
    from megannm import phases
    (tmp_path / "caption_only.py").write_text(example_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(phases.PHASES, "caption_only", "caption_only:CaptionOnlyPhase")
    yield importlib.import_module("caption_only")
    sys.modules.pop("caption_only", None)


def test_the_example_phase_is_short():
    lines = [line for line in example_source().splitlines() if line.strip()]
    assert len(lines) <= 26


def test_readme_example_phase_trains_on_text_targets_only(registered, toy_data, tmp_path):
    from megannm import parallel
    from megannm.config import recipe_from_dict
    from megannm.data.loader import build_train_iterator
    from megannm.stage import build_trainer
    from megannm.train.logging import read_metrics
    shards = toy_data["shards"]
    r = recipe_from_dict({
        "name": "caption_only", "seed": 3, "phase": {"kind": "caption_only"},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": 128},
        "parallel": {"zero_stage": 1},
        "data": {"train": [{"path": str(shards / "train")}], "seq_len": 96, "micro_batch_size": 4,
                 "global_batch_size": 8},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"train_steps": 12, "warmup_steps": 1},
        "logging": {"dir": str(tmp_path / "run"), "interval": 1, "progress_bar": False, "tensorboard": False}},
        source="example.yaml")
    layout = parallel.init_parallel(1, 1)
    trainer = build_trainer(r, layout, source="example.yaml")
    assert type(trainer.phase).__name__ == "CaptionOnlyPhase"
    trainer.run()
    metrics = [m for m in read_metrics(tmp_path / "run") if m.get("split") == "train"]
    assert len(metrics) == 12 and all(math.isfinite(m["loss"]) for m in metrics)
    # the first step counted exactly the text targets of its two micro-batches, never an image code
    d = r.data
    it = build_train_iterator([(d.train[0].path, 1.0)], trainer.vocab, d.seq_len, d.micro_batch_size,
                              d.global_batch_size, 0, 1, d.seed)
    first = [next(it) for _ in range(2)]
    text = sum(float((b["loss_mask"] * ~trainer.vocab.is_image(b["labels"])).sum()) for b in first)
    images = sum(float((b["loss_mask"] * trainer.vocab.is_image(b["labels"])).sum()) for b in first)
    assert images > 0 and metrics[0]["text_tokens"] == text
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]  # it learns the captions
    assert isinstance(trainer.phase.loss(trainer.engine, {k: v for k, v in first[0].items()})[0], torch.Tensor)
