"""Resuming at another data-parallel size keeps the optimizer state and the data position (``megannm.train.elastic``).

DP1 -> DP2 -> DP1 (steps 1-2 on one rank, 3-4 on two, 5-6 on one) gives the losses of an uninterrupted 2-rank run, at
ZeRO-1 and ZeRO-3: the global batch is fixed, so each step sees the same samples whatever the split into
micro-batches per rank. Were the Adam moments or their step reset at a change, the update after it would differ (Adam's
first step moves every weight by ~lr) and so would the next loss. The single-rank parts run in this process; the
2-rank part (both references and both resumes) is one torchrun launch.
"""
import json

import pytest

from megannm import checkpoint as fmt
from megannm.cli import main
from tests import dist

SCRIPT = "tests/scripts/elastic_cases.py"
STEPS = 6


def recipe(tmp_path, toy_data, name: str, zero: int):
    lines = {
        "name": name, "seed": "3",
        "model": "{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}",
        "parallel": f"{{zero_stage: {zero}}}",
        "data": f"{{train: [{{path: {toy_data['shards'] / 'train'}}}], seq_len: 80, micro_batch_size: 2, "
                f"global_batch_size: 4}}",
        "optimizer": "{lr: 0.003, min_lr: 0.0003}",
        "schedule": f"{{train_steps: {STEPS}, warmup_steps: 1}}",
        "checkpoint": "{save_interval: 0, keep_last: 2}",
        "logging": f"{{dir: {tmp_path / name}, interval: 1, progress_bar: false, tensorboard: false}}",
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if m.get("split") == "train"}


@pytest.mark.distributed
def test_dp1_dp2_dp1_matches_an_uninterrupted_dp2_run_at_zero1_and_zero3(toy_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEGANNM_QUIET", "1")
    stages = (1, 3)
    elastic = {z: recipe(tmp_path, toy_data, f"elastic_z{z}", z) for z in stages}
    ref = {z: recipe(tmp_path, toy_data, f"ref_z{z}", z) for z in stages}
    for z in stages:  # steps 1-2 on one rank
        assert main(["train", str(elastic[z]), "schedule.exit_interval=2"]) == 0
    runs = [f"{ref[z]}:0:0" for z in stages] + [f"{elastic[z]}:4:1" for z in stages]
    dist.run([SCRIPT, *runs], nproc=2, launcher="torchrun")  # the references, and steps 3-4 on two ranks
    for z in stages:  # steps 5-6 on one rank
        assert main(["train", str(elastic[z]), "--resume"]) == 0
    capsys.readouterr()
    for z in stages:
        run_dir = tmp_path / f"elastic_z{z}"
        want, got = losses(tmp_path / f"ref_z{z}"), losses(run_dir)
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
        assert [got[s] for s in got] == pytest.approx([want[s] for s in got], rel=2e-5), z
        assert want[STEPS] < want[1] - 0.1  # it learns: the comparison is not between two flat lines
        notes = [m["detail"] for m in metrics(run_dir) if m.get("event") == "elastic"]
        assert [n.split(": ", 1)[1] for n in notes] == [
            "saved at data-parallel size 1, resumed at 2: weights, Adam moments and step, schedule and data "
            "position kept (DeepSpeed universal checkpoint); rank 1 had no saved RNG state and keeps the recipe's "
            "seed",
            "saved at data-parallel size 2, resumed at 1: weights, Adam moments and step, schedule and data "
            "position kept (DeepSpeed universal checkpoint)"], z
        ckpts = run_dir / "checkpoints"
        assert fmt.latest(ckpts).name == "step00000006"
        assert not [p.name for p in ckpts.iterdir() if p.name.startswith(".")]  # the universal folders are gone


def test_the_line_says_what_starts_afresh_where_the_state_cannot_be_kept(tmp_path):
    from types import SimpleNamespace

    from megannm.train import elastic
    meta = {"layout": {"world_size": 4, "tp": 2, "pp": 1, "dp": 2}}
    layout = SimpleNamespace(world_size=8, tp=2, pp=1, dp=4)
    assert not elastic.keeps_moments(layout)
    assert elastic.describe(meta, layout, tmp_path / "step00000004", elastic.keeps_moments(layout)) == (
        f"{tmp_path / 'step00000004'}: saved at data-parallel size 2, resumed at 4: weights, schedule and data "
        f"position kept; Adam moments and step reset (the optimizer state is re-partitioned at tensor and pipeline "
        f"size 1 only); ranks 4-7 had no saved RNG state and keep the recipe's seed")


class _Planted:
    """Unpickling it would create a file (what a hostile checkpoint would do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path
        return (Path.touch, (Path(self.marker),))


def test_a_file_that_would_run_code_is_refused_before_deepspeeds_converter_reads_it(tmp_path):
    """DeepSpeed's converter unpickles with weights_only=False: every file is first opened the safe way."""
    import torch

    from megannm.train import elastic
    folder = tmp_path / "step00000002"
    folder.mkdir()
    planted = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Planted(tmp_path / "ran")}, planted)
    from megannm.trust import UntrustedInput
    with pytest.raises(UntrustedInput, match=f"^{planted}: not loaded: it holds a pickled"):
        elastic.convert(folder)
    assert not (tmp_path / "ran").exists() and not (tmp_path / ".tmp-universal-step00000002").exists()
