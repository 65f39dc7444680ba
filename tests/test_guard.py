"""Nothing lost, nothing silent: the divergence guard, faults during save and load, Ctrl-C, orphans, file modes.

Runs in a world of one inside the test process (``megannm.cli.main``), a few tiny steps each; the cross-rank parts
(one rank alone meets the fault, every rank stops at the same step) run on 2 real gloo ranks in test_trainer.py's
shared launch. docs/errors.md's messages are asserted one by one in test_errors.py.
"""
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from megannm import checkpoint as fmt
from megannm.checkpoint import integrity
from megannm.cli import main
from tests import dist


def write_recipe(tmp_path: Path, toy_data, name: str = "run", **sections) -> Path:
    """A tiny pretraining recipe on the toy data; ``sections`` override whole YAML lines (e.g. checkpoint=...)."""
    lines = {
        "name": name, "seed": "3",
        "model": "{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}",
        "parallel": "{zero_stage: 1}",
        "data": f"{{train: [{{path: {toy_data['shards'] / 'train'}}}], seq_len: 80, micro_batch_size: 2, "
                f"global_batch_size: 4}}",
        "optimizer": "{lr: 0.003, min_lr: 0.0003}",
        "schedule": "{train_steps: 6, warmup_steps: 1}",
        "checkpoint": "{save_interval: 2, keep_last: 3}",
        "logging": f"{{dir: {tmp_path / name}, interval: 1, progress_bar: false, tensorboard: false}}",
    }
    lines.update(sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


def train(capsys, *argv) -> tuple[int, list[str]]:
    """``megannm train ...`` in this process: (exit code, the lines it printed as megannm errors)."""
    code = main(["train", *map(str, argv)])
    err = capsys.readouterr().err
    return code, [x for x in err.splitlines() if x.startswith("megannm") and ": error: " in x]


def events(run_dir: Path, what: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == what]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("MEGANNM_QUIET", "1")


# the divergence guard ---------------------------------------------------------------------------------------------


def test_lr_1e9_stops_within_a_few_steps_with_one_line(toy_data, tmp_path, capsys):
    """The issue's reproduction, resumed at step 2 with lr=1e9: step 3 still runs on good weights (and is saved),
    its update blows them up, the gradient norm is inf from step 4 (DeepSpeed skips those updates), and the run stops
    at step 6 with exit 3 and one line. Nothing is saved after step 3; `latest` goes back to step 2, the last
    checkpoint whose weights trained well, and keep_last=1 pruned neither."""
    recipe = write_recipe(tmp_path, toy_data, checkpoint="{save_interval: 1, keep_last: 1}")
    assert train(capsys, recipe, "schedule.train_steps=2") == (0, [])
    code, lines = train(capsys, recipe, "--resume", "optimizer.lr=1e9", "schedule.train_steps=20")
    ckpts = tmp_path / "run" / "checkpoints"
    assert code == 3 and lines == [
        f"megannm train: error: diverged at step 6: 3 bad steps in a row (guard.max_bad_steps=3), the first at step "
        f"4: non-finite gradient norm (inf) on rank 0; last good checkpoint: {ckpts / 'step00000002'} (latest names "
        f"it again; step00000003 after it holds the weights the first bad step ran on)"], lines
    assert [p.name for p in fmt.complete(ckpts)] == ["step00000002", "step00000003"]
    assert fmt.latest(ckpts).name == "step00000002" and fmt.protected(ckpts) == {"step00000003"}
    assert fmt.diverged(ckpts) == {"step00000003"}
    integrity.verify(ckpts / "step00000002", fmt.read_meta(ckpts))
    bad = events(tmp_path / "run", "bad_step")
    assert [e["step"] for e in bad] == [4, 5, 6] and all(e["skipped_by_deepspeed"] == 1 for e in bad)
    logged = [m for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if m.get("split") == "train"]
    assert logged[-1]["skipped_steps"] == 3 and logged[-1]["bad_steps"] == 3
    # a plain --resume with a sane learning rate continues from the good weights
    assert train(capsys, recipe, "--resume", "schedule.train_steps=4") == (0, [])
    assert events(tmp_path / "run", "resumed")[-1]["step"] == 2


def test_a_first_update_that_diverges_leaves_no_good_checkpoint_and_latest_names_none(toy_data, tmp_path, capsys):
    """Step 1 is good and saved, its update blows the weights up: step00000001 holds the weights the first bad step
    ran on. It stays (protected, for a look) but `latest` no longer names it and resuming passes it by, so a
    --resume starts afresh instead of diverging again; the next save of step 1 replaces it and clears the mark. What
    killed runs left in the folders (a pointer half-written, a save's temporary folder) goes at the next start."""
    recipe = write_recipe(tmp_path, toy_data, checkpoint="{save_interval: 1}")
    code, lines = train(capsys, recipe, "optimizer.lr=1e9")
    ckpts = tmp_path / "run" / "checkpoints"
    assert code == 3 and len(lines) == 1 and lines[0].endswith(
        f"last good checkpoint: none ({ckpts / 'step00000001'} holds the weights the first bad step ran on; latest "
        f"removed: --resume starts afresh)"), lines
    assert fmt.latest(ckpts) is None and fmt.diverged(ckpts) == {"step00000001"}
    assert [p.name for p in fmt.complete(ckpts)] == ["step00000001"]
    litter = [ckpts / ".latest.tmp-4242", ckpts / ".tmp-step00000002", tmp_path / "run" / ".recipe.yaml.tmp-4242"]
    litter[0].write_text("step0000")
    litter[1].mkdir()
    (litter[1] / "mp_rank_00_model_states.pt").write_bytes(b"half")
    litter[2].write_text("name: half")
    assert train(capsys, recipe, "--resume", "schedule.train_steps=1") == (0, [])
    assert not events(tmp_path / "run", "resumed") and not any(p.exists() for p in litter)
    assert fmt.latest(ckpts).name == "step00000001" and fmt.diverged(ckpts) == set()


def test_an_isolated_bad_step_is_skipped_unsaved_and_its_last_good_checkpoint_kept(toy_data, tmp_path, capsys,
                                                                                   monkeypatch):
    """A NaN loss at step 3 only: counted, not saved, the run goes on. keep_last=1 would prune step 2, but it is the
    last checkpoint saved before a detected divergence, so it stays (step 5 stays beside step 6 until a step has run
    on step 6's weights)."""
    from megannm.phases.pretrain import PretrainPhase
    calls = {"n": 0}
    loss = PretrainPhase.loss

    def nan_at_step_3(self, model, batch):  # 2 micro-batches per step: calls 5 and 6 are step 3's
        value, stats = loss(self, model, batch)
        calls["n"] += 1
        if calls["n"] in (5, 6):
            value, stats.sums["loss"] = value * math.nan, stats.sums["loss"] * math.nan
        return value, stats

    monkeypatch.setattr(PretrainPhase, "loss", nan_at_step_3)
    recipe = write_recipe(tmp_path, toy_data, checkpoint="{save_interval: 1, keep_last: 1}")
    code, lines = train(capsys, recipe)
    ckpts = tmp_path / "run" / "checkpoints"
    assert code == 0 and not lines
    assert [p.name for p in fmt.complete(ckpts)] == ["step00000002", "step00000005", "step00000006"]
    assert [e["step"] for e in events(tmp_path / "run", "bad_step")] == [3]
    assert "non-finite loss on rank 0" in events(tmp_path / "run", "bad_step")[0]["reason"]
    assert [e["step"] for e in events(tmp_path / "run", "saved")] == [1, 2, 4, 5, 6]


def test_zero0_non_finite_weights_are_never_saved(toy_data, tmp_path, capsys):
    """ZeRO-0 computes no gradient norm and applies the inf update: the save after it refuses the weights."""
    recipe = write_recipe(tmp_path, toy_data, parallel="{zero_stage: 0}", checkpoint="{save_interval: 1}")
    code, lines = train(capsys, recipe, "optimizer.lr=1e9")
    assert code == 3 and len(lines) == 1 and "non-finite weights on rank 0, so nothing was saved" in lines[0]
    assert [p.name for p in fmt.complete(tmp_path / "run" / "checkpoints")] == ["step00000001"]


def _guard(spike_factor=0.0, window=4, max_bad=3, loss_scaled=False):
    from megannm.train.guard import Guard
    cfg = SimpleNamespace(max_bad_steps=max_bad, spike_factor=spike_factor, spike_window=window)
    return Guard(cfg, rank=0, world=2, loss_scaled=loss_scaled)


def test_loss_spike_rule_uses_the_running_median_of_good_steps():
    g = _guard(spike_factor=3.0, window=4)
    fine = [0.0, 0.0, 1.0]
    assert not g.judge(1, fine, 9.0).bad  # the window is not full yet: no rule
    for step, loss in enumerate([2.0, 2.2, 1.8], 2):
        assert not g.judge(step, fine, loss).bad
    v = g.judge(5, fine, 6.7)  # median of 9, 2, 2.2, 1.8 is 2.1: 6.7 > 6.3
    assert v.bad and v.streak == 1 and "above 3 x its running median 2.1" in v.reason
    assert not g.judge(6, fine, 6.0).bad  # the spike did not enter the window
    assert g.bad_steps == 1 and g.streak == 0


def test_guard_evidence_names_the_lowest_bad_rank_and_stops_after_n():
    g = _guard(max_bad=2)
    v = g.judge(7, [1.0, 0.0, 3.5], 2.0)  # max over ranks of (world - rank) = 1: rank 1 of 2
    assert v.bad and "non-finite loss on rank 1" in v.reason and not v.stop and v.grad_norm == 3.5
    assert g.judge(8, [0.0, 2.0, math.inf], 2.0).stop
    assert g.stop_message(8, None) == ("diverged at step 8: 2 bad steps in a row (guard.max_bad_steps=2), the first "
                                       "at step 7: non-finite loss on rank 1; last good checkpoint: none (this run "
                                       "saved no checkpoint)")
    fp16 = _guard(loss_scaled=True)  # DeepSpeed's loss scaler skips overflowing steps by design
    assert not fp16.judge(1, [0.0, 2.0, math.inf], 2.0).bad


# saving and loading -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(toy_data, tmp_path_factory):
    """A finished tiny run: checkpoints at steps 2, 4 and 6 (keep_last 3)."""
    root = tmp_path_factory.mktemp("trained")
    os.environ["MEGANNM_QUIET"] = "1"
    assert main(["train", str(write_recipe(root, toy_data))]) == 0
    return root


def copy_run(trained, tmp_path, toy_data) -> tuple[Path, Path]:
    shutil.copytree(trained / "run", tmp_path / "run")
    return write_recipe(tmp_path, toy_data), tmp_path / "run" / "checkpoints"


def flip_byte(path: Path) -> None:
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def test_fallback_resumes_from_the_newest_complete_checkpoint(trained, tmp_path, toy_data, capsys):
    recipe, ckpts = copy_run(trained, tmp_path, toy_data)
    flip_byte(ckpts / "step00000006" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (ckpts / "latest").write_bytes(b"\xfb\x00garbage")
    code, lines = train(capsys, recipe, "--resume", "checkpoint.fallback=true", "schedule.train_steps=8")
    assert code == 0 and not lines
    skipped = [e["detail"] for e in events(tmp_path / "run", "fallback")]
    assert len(skipped) == 2 and "latest: not a checkpoint tag" in skipped[0]
    assert "step00000006/zero_pp_rank_0_mp_rank_00_optim_states.pt: corrupt (crc32" in skipped[1]
    assert events(tmp_path / "run", "resumed")[-1]["step"] == 4 and fmt.latest(ckpts).name == "step00000008"


def test_a_missing_pointer_resumes_the_newest_complete_checkpoint(trained, tmp_path, toy_data, capsys):
    """A crash between a save's rename and its `latest` leaves a complete folder and the old pointer or none."""
    recipe, ckpts = copy_run(trained, tmp_path, toy_data)
    (ckpts / "latest").unlink()
    code, _ = train(capsys, recipe, "--resume", "schedule.train_steps=7")
    assert code == 0 and events(tmp_path / "run", "resumed")[-1]["step"] == 6


def test_injected_full_disk_removes_the_temporary_folder_and_keeps_the_previous(toy_data, tmp_path, capsys,
                                                                             monkeypatch):
    monkeypatch.setenv("MEGANNM_FAULT", "save_mid:4:enospc")
    code, lines = train(capsys, write_recipe(tmp_path, toy_data))
    ckpts = tmp_path / "run" / "checkpoints"
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"megannm train: error: {ckpts}/.tmp-step00000004/rng/rank00000.pt: cannot save the "
                               f"checkpoint of step 4: No space left on device (")
    assert lines[0].endswith(f"free there); removed {ckpts}/.tmp-step00000004, {ckpts}/step00000002 is untouched")
    assert not list(ckpts.glob(".tmp-*")) and fmt.latest(ckpts).name == "step00000002"
    integrity.verify(ckpts / "step00000002", fmt.read_meta(ckpts))


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_says_so(toy_data, tmp_path, capsys):
    """A 3 MB tmpfs holds one checkpoint of the tiny model (2 MB) and not two: torch's writer then fails with
    "unexpected pos ..." and the line says what it means."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("needs root and mount (the injected full disk above covers the same path)")
    try:
        recipe = write_recipe(tmp_path, toy_data, checkpoint=f"{{dir: {disk / 'ck'}, save_interval: 1}}")
        code, lines = train(capsys, recipe)
        assert code == 1 and len(lines) == 1, lines
        assert "cannot save the checkpoint of step 2: no space left on device (" in lines[0]
        assert lines[0].endswith(f"{disk}/ck/step00000001 is untouched")
        assert not list((disk / "ck").glob(".tmp-*")) and fmt.latest(disk / "ck").name == "step00000001"
    finally:
        gc.collect()  # files the failed writer left open keep the mount busy
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def test_prune_reclaims_orphans_and_never_deletes_protected_tags(tmp_path):
    from megannm.train import checkpoint as saving
    for step in (1, 2, 3, 4):
        folder = tmp_path / fmt.tag_for(step)
        folder.mkdir()
        (folder / "weights.pt").write_bytes(b"x")
        if step != 2:  # step 2: what a prune killed half-way left before deletions renamed first
            fmt.write_meta(folder, {"step": step})
    (tmp_path / ".tmp-del-step00000000").mkdir()
    fmt.protect(tmp_path, "step00000001")
    saving.prune(tmp_path, keep_last=1, keep={"step00000004"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["protected", "step00000001", "step00000004"]


def test_a_deletion_killed_half_way_leaves_no_tag_folder(tmp_path, monkeypatch):
    from megannm.train import checkpoint as saving
    folder = tmp_path / "step00000001"
    folder.mkdir()
    fmt.write_meta(folder, {"step": 1})
    monkeypatch.setattr(saving.shutil, "rmtree", lambda *a, **k: None)  # killed before it deleted anything
    saving._remove(folder)
    assert [p.name for p in tmp_path.iterdir()] == [".tmp-del-step00000001"]  # the next save's prune removes it


# Ctrl-C -----------------------------------------------------------------------------------------------------------


def test_ctrl_c_saves_after_the_step_and_a_second_one_would_end_at_once(toy_data, tmp_path, capsys, monkeypatch):
    from megannm.train.loop import Trainer
    step, seen = Trainer.train_step, {}

    def interrupted(self, batches):
        out = step(self, batches)
        if self.step == 2:  # during step 3
            signal.raise_signal(signal.SIGINT)
            seen["handler"] = signal.getsignal(signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    before = signal.getsignal(signal.SIGINT)
    code, lines = train(capsys, write_recipe(tmp_path, toy_data), "schedule.train_steps=50")
    assert code == 130 and not lines
    assert seen["handler"] == signal.SIG_DFL  # the second Ctrl-C is the default action: the process ends
    assert signal.getsignal(signal.SIGINT) == before  # and the test process has its own handler back
    assert fmt.latest(tmp_path / "run" / "checkpoints").name == "step00000003"
    assert events(tmp_path / "run", "interrupted")[0]["saved"].endswith("step00000003")


def test_ctrl_c_on_a_real_process(toy_data, tmp_path):
    """SIGINT from outside (what a terminal sends): one line, a checkpoint, exit 130, no traceback."""
    recipe = write_recipe(tmp_path, toy_data, checkpoint="{save_interval: 0}")
    proc = subprocess.Popen([sys.executable, "-m", "megannm", "train", str(recipe), "schedule.train_steps=2000"],
                            cwd=dist.REPO, env=dist.base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 2,' in metrics.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "megannm: Ctrl-C: saving after this step" in err and "Traceback" not in err
    saved = fmt.latest(tmp_path / "run" / "checkpoints")
    assert saved is not None and 2 <= fmt.read_meta(saved)["step"] < 2000


# data, modes, stage folders -------------------------------------------------------------------------------------


def test_verification_work_is_split_by_bytes_over_every_rank(tmp_path):
    from megannm.data import verify
    shards = [{"file": f"s{i}", "index": f"i{i}", "bytes": b, "index_bytes": 1, "docs": 1}
              for i, b in enumerate([100, 10, 60, 50, 40])]
    units, mode = verify.work_units([("data.train[0].path", tmp_path, {"shards": shards})], "auto", world=2)
    assert mode == "full" and len(units) == 5
    parts = verify.split(units, mode, 2)
    assert parts == [[0, 4], [1, 2, 3]]  # 100 + 40 against 60 + 50 + 10 (+ 1 index byte each): every unit once
    huge = [dict(s, bytes=verify.FULL_AUTO_BYTES) for s in shards]
    assert verify.work_units([("k", tmp_path, {"shards": huge})], "auto", world=2)[1] == "index"
    assert verify.work_units([("k", tmp_path, {"shards": huge})], "auto", world=8)[1] == "full"
    assert verify.work_units([("k", tmp_path, {"shards": huge})], "none", world=1)[0] == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exports_keep_the_umask_file_mode(tmp_path, umask):
    import torch

    from megannm.checkpoint.tensors import save_safetensors
    old = os.umask(umask)
    try:
        save_safetensors(tmp_path, {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
