"""The README's example phase, exactly as printed there, trained by the real Trainer; and ``data_iterator``, the one
helper every phase builds its batches with: every ``data`` key reaches the loader, packing puts several documents in
a row, and the two ranks of a tensor-parallel group (a real 2-rank gloo run) receive identical batches, read once."""
import hashlib
import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from tests import dist

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


def recipe(shards, out, **data):
    from megannm.config import recipe_from_dict
    return recipe_from_dict({
        "name": "caption_only", "seed": 3, "phase": {"kind": "caption_only"},
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": 256},
        "parallel": {"zero_stage": 1},
        "data": {"train": [{"path": str(shards / "train")}], "seq_len": 96, "micro_batch_size": 4,
                 "global_batch_size": 8, **data},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3},
        "schedule": {"train_steps": 12, "warmup_steps": 1},
        "logging": {"dir": str(out / "run"), "interval": 1, "progress_bar": False, "tensorboard": False}},
        source="example.yaml")


def digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].numpy().tobytes())
    return h.hexdigest()


def take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_readme_example_phase_trains_on_text_targets_only(registered, toy_data, tmp_path):
    from megannm import parallel
    from megannm.data.loader import build_train_iterator
    from megannm.stage import build_trainer
    from megannm.train.logging import read_metrics
    r = recipe(toy_data["shards"], tmp_path)
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


# ---------------------------------------------------------------------------------------------------------------------
# data_iterator


def test_data_iterator_passes_every_data_key_to_the_loader(toy_data, tok, layout, tmp_path):
    """The recipe's whole data section reaches build_train_iterator: the same batches as a call that names every
    argument, and each of pack, caption_dropout, seed and balance changes them."""
    from megannm.data.loader import build_train_iterator
    from megannm.parallel import Layout
    from megannm.train.phase import data_iterator
    shards = toy_data["shards"]
    keys = {"seq_len": 240, "pack": True, "caption_dropout": 0.5, "seed": 9, "balance": True, "prefetch": 2,
            "plan_dir": str(tmp_path / "plans")}
    dp2 = Layout(world_size=2, rank=0, tp=1, pp=1, dp=2, tp_rank=0, pp_rank=0, dp_rank=0)
    r = recipe(shards, tmp_path, **keys)
    got = take(data_iterator(r, dp2, tok.vocab, consumed=16), 6)
    want = take(build_train_iterator([(str(shards / "train"), 1.0)], tok.vocab, 240, 4, 8, 0, 2, 9,
                                     consumed_samples=16, pack=True, caption_dropout=0.5,
                                     plan_dir=tmp_path / "plans", balance=True), 6)
    assert digest(got) == digest(want)
    assert (tmp_path / "plans").is_dir()  # data.plan_dir, not the data set's folder
    for key, other in [("pack", False), ("caption_dropout", 0.0), ("seed", 10), ("balance", False)]:
        changed = take(data_iterator(recipe(shards, tmp_path, **{**keys, key: other}), dp2, tok.vocab,
                                     consumed=16), 6)
        assert digest(changed) != digest(got), key
    # consumed: the iterator starts at that global sample (step 1 of a fresh run is step 0 of consumed=8)
    fresh = take(data_iterator(r, dp2, tok.vocab), 2)
    assert digest(take(data_iterator(r, dp2, tok.vocab, consumed=8), 1)) == digest(fresh[1:])
    # dropped captions: fewer text tokens in the same number of samples
    text = lambda bs: sum(int((~tok.vocab.is_image(b["labels"]) * b["loss_mask"].bool()).sum()) for b in bs)
    no_drop = take(data_iterator(recipe(shards, tmp_path, **{**keys, "caption_dropout": 0.0}), dp2, tok.vocab,
                                 consumed=16), 6)
    assert text(got) < text(no_drop)


def packed_rows(batches) -> tuple[int, int]:
    """(rows holding two or more documents, rows whose positions do not restart at 0 at every document start)."""
    several = bad = 0
    for b in batches:
        seg, pos, mask = b["document_ids"], b["position_ids"], b["loss_mask"]
        for row in range(seg.shape[0]):
            starts = torch.nonzero(seg[row, 1:] != seg[row, :-1]).flatten() + 1
            docs = {int(s) for s in seg[row][mask[row] > 0]}  # segments with targets: documents, not padding
            several += len(docs) >= 2
            bad += int(pos[row, 0] != 0) + int((pos[row, starts] != 0).sum())
    return several, bad


def test_packed_rows_carry_several_documents_with_reset_positions(toy_data, tok, layout, tmp_path):
    from megannm.train.phase import data_iterator
    shards = toy_data["shards"]
    packed = take(data_iterator(recipe(shards, tmp_path, seq_len=240), layout, tok.vocab), 4)
    several, bad = packed_rows(packed)
    assert several == 16 and bad == 0  # 16 rows of 240 tokens; a toy document is ~80
    unpacked = take(data_iterator(recipe(shards, tmp_path, seq_len=240, pack=False), layout, tok.vocab), 4)
    assert packed_rows(unpacked) == (0, 0)


def test_validation_batches_are_capped_and_equal_per_rank(toy_data, tok, layout, tmp_path):
    from megannm.config import recipe_from_dict
    from megannm.train.phase import data_iterator
    r = recipe(toy_data["shards"], tmp_path)
    assert list(data_iterator(r, layout, tok.vocab, split="valid")) == []  # no data.valid: nothing
    d = r.model_dump()
    d["data"]["valid"] = [{"path": str(toy_data["shards"] / "valid_seen")},
                          {"path": str(toy_data["shards"] / "valid_heldout")}]
    d["logging"]["eval_batches"] = 3
    batches = list(data_iterator(recipe_from_dict(d, source="v.yaml"), layout, tok.vocab, split="valid"))
    assert len(batches) == 6 and all(b["input_ids"].shape == (4, 96) for b in batches)  # 3 per data set
    with pytest.raises(ValueError, match="split must be 'train' or 'valid'"):
        data_iterator(r, layout, tok.vocab, split="test")


WORKER = r'''
import hashlib, json, os, sys
from megannm import parallel
from megannm.config import recipe_from_dict
from megannm.data.tokenize import Tokenizers
from megannm.train.phase import data_iterator
layout = parallel.init_parallel(tp=2, pp=1)
spec, out = json.load(open(sys.argv[1])), sys.argv[2]
vocab = Tokenizers.load(spec.pop("tokenizers")).vocab
it = data_iterator(recipe_from_dict(spec, source="tp2.yaml"), layout, vocab, consumed=8)
batches = [next(it) for _ in range(4)]
h = hashlib.sha256()
for b in batches:
    for k in sorted(b):
        h.update(k.encode())
        h.update(b[k].numpy().tobytes())
docs = sum(len({int(s) for s in b["document_ids"][r][b["loss_mask"][r] > 0]}) for b in batches for r in range(4))
json.dump({"tp_rank": layout.tp_rank, "dp": layout.dp, "digest": h.hexdigest(), "reads": it.order is not None,
           "docs": docs}, open(os.path.join(out, f"rank{layout.rank}.json"), "w"))
it.close()
parallel.shutdown()
'''


@pytest.mark.distributed
def test_tp2_ranks_receive_identical_batches_read_once(toy_data, tok, layout, tmp_path):
    """Two processes, one tensor-parallel group of two (gloo): both ranks get the same packed batches, only the
    first reads, and they are the batches one process reads for data-parallel rank 0."""
    from megannm.train.phase import data_iterator
    r = recipe(toy_data["shards"], tmp_path, seq_len=240, caption_dropout=0.3, plan_dir=str(tmp_path / "plans"))
    spec = r.model_dump(mode="json")
    spec["parallel"]["tensor_parallel"] = 2
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "tokenizers": str(toy_data["tokenizers"])}))
    (tmp_path / "script.py").write_text(WORKER)
    (tmp_path / "out").mkdir()
    dist.run([str(tmp_path / "script.py"), str(tmp_path / "spec.json"), str(tmp_path / "out")], nproc=2, timeout=240)
    ranks = [json.loads((tmp_path / "out" / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [x["tp_rank"] for x in ranks] == [0, 1] and [x["dp"] for x in ranks] == [1, 1]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical batches in the TP group
    assert [x["reads"] for x in ranks] == [True, False]  # read by its first rank only
    assert ranks[0]["docs"] >= 32  # 16 packed rows of 240 tokens hold two or more documents each
    one = take(data_iterator(r, layout, tok.vocab, consumed=8), 4)
    assert digest(one) == ranks[0]["digest"]
