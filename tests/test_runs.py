"""One run per folder (``megannm.train.runlock``): a second run into a live run's folder is refused in one line and
the first is unharmed; a lock left by a dead holder is taken over; the lock goes when its run ends.

The concurrent case is real: a single-process run trains while a 2-rank torchrun run is started into its folder. The
stale-holder rules run on the lock alone, in this process (records of other hosts, of dead and of live processes).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict

import pytest

from megannm.train import runlock
from megannm.train.runlock import LOCK, Holder, RunLock, RunLocked
from tests import dist


def write_recipe(tmp_path, toy_data, name="run"):
    lines = {
        "name": name, "seed": "3",
        "model": "{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}",
        "parallel": "{zero_stage: 1}",
        "data": f"{{train: [{{path: {toy_data['shards'] / 'train'}}}], seq_len: 80, micro_batch_size: 2, "
                f"global_batch_size: 4}}",
        "optimizer": "{lr: 0.003, min_lr: 0.0003}",
        # long enough to outlive the test (it is stopped by SIGTERM), short enough that planning its sample order
        # up front (every step's samples) takes no time
        "schedule": "{train_steps: 3000, warmup_steps: 1}",
        "checkpoint": "{save_interval: 0, keep_last: 2}",
        "logging": f"{{dir: {tmp_path / name}, interval: 1, progress_bar: false, tensorboard: false}}",
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


def files(folder):
    """Every file under ``folder`` but the growing metrics.jsonl: (path, size, mtime); the locks by their content
    (their holder touches them: a heartbeat)."""
    return sorted((str(p), p.stat().st_size, p.read_text() if p.name == LOCK else p.stat().st_mtime_ns)
                  for p in folder.rglob("*") if p.is_file() and p.name != "metrics.jsonl")


@pytest.mark.distributed
def test_a_second_run_into_a_live_runs_folder_is_refused_and_the_first_is_unharmed(toy_data, tmp_path):
    recipe = write_recipe(tmp_path, toy_data)
    run_dir = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "megannm", "train", str(recipe)], cwd=dist.REPO,
                             env=dist.base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1500):  # training: its run folder has its files and a logged step
            if (run_dir / "metrics.jsonl").exists() and '"split": "train"' in (run_dir / "metrics.jsonl").read_text():
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        saving = run_dir / "checkpoints" / ".tmp-step00000777"  # as if the first run were in the middle of a save
        saving.mkdir(parents=True)
        (saving / "part").write_text("x")
        before = files(run_dir)
        holder = json.loads((run_dir / LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()

        second = dist.run(["-m", "megannm", "train", str(recipe)], nproc=2, check=False)
        lines = [x for x in second.stderr.splitlines() if x.startswith("megannm train: error:")]
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        assert lines == [f"megannm train: error: {run_dir}: another run is using this folder (host "
                         f"{socket.gethostname()} pid {first.pid} started {started}; lock {run_dir / LOCK}): wait for "
                         f"it to end or stop it, or give this run another logging.dir / checkpoint.dir"], second.stderr
        assert second.returncode != 0 and "exitcode  : 2" in second.stderr  # each rank exits 2, none hangs
        assert files(run_dir) == before and first.poll() is None  # not a file of the first run touched
    finally:
        first.send_signal(signal.SIGTERM)  # the first run saves and exits as preempted, releasing its lock
        out, err = first.communicate(timeout=300)
    assert first.returncode == 124, err
    assert not (run_dir / LOCK).exists() and not (run_dir / "checkpoints" / LOCK).exists()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["start", "preempted", "exit"]  # one run's log only
    steps = [r["step"] for r in records if r.get("split") == "train"]
    assert steps == list(range(1, len(steps) + 1))
    assert not saving.exists()  # the first run's own prune reclaimed it, not the refused run


def _record(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    h = dict(asdict(Holder.me()), **fields)
    (folder / LOCK).write_text(json.dumps(h))
    return h


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _record(tmp_path, pid=int(dead.stdout), started=time.time() - 5)
    lock = RunLock([tmp_path])
    lock.acquire()
    try:
        assert len(lock.notes) == 1 and lock.notes[0].startswith(f"{tmp_path / LOCK}: took over the lock of a run "
                                                                 f"that is gone (host {socket.gethostname()} pid "
                                                                 f"{int(dead.stdout)} started ")
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists() and tmp_path.exists()


def test_a_live_holder_is_refused_even_where_the_file_system_drops_the_kernel_lock(tmp_path):
    """A live process named by the record (pid and start time) holds the folder, whatever flock says."""
    import psutil
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _record(tmp_path, pid=sleeper.pid, started=psutil.Process(sleeper.pid).create_time())
        with pytest.raises(RunLocked, match=f"pid {sleeper.pid} started"):
            RunLock([tmp_path]).acquire()
        _record(tmp_path, pid=sleeper.pid, started=psutil.Process(sleeper.pid).create_time() - 100)  # pid reused
        lock = RunLock([tmp_path])
        lock.acquire()
        lock.release()
        assert lock.notes and "took over" in lock.notes[0]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_holder_on_another_host_is_alive_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _record(tmp_path, host="node-elsewhere", pid=4242, boot_id="x")
    with pytest.raises(RunLocked, match="host node-elsewhere pid 4242 started .*, its lock refreshed [0-9]+ s ago: "
                                        "taken as gone 600 s after the last refresh"):
        RunLock([tmp_path]).acquire()
    old = time.time() - runlock.STALE_S - 60
    os.utime(tmp_path / LOCK, (old, old))
    lock = RunLock([tmp_path])
    lock.acquire()
    lock.release()
    assert "host node-elsewhere pid 4242" in lock.notes[0]
    # a requeued Slurm job finds the record of its own earlier incarnation: gone, whatever the heartbeat says
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _record(tmp_path, host="node-elsewhere", pid=4242, boot_id="x", slurm_job_id="77", slurm_restart="")
    lock = RunLock([tmp_path])
    lock.acquire()
    lock.release()
    assert "Slurm job 77" in lock.notes[0]


def test_two_locks_in_one_process_and_the_folders_they_create(tmp_path):
    run_dir, ckpt_dir = tmp_path / "new" / "run", tmp_path / "elsewhere" / "ckpts"
    first = RunLock([run_dir, ckpt_dir, run_dir])  # duplicates are one folder
    first.acquire()
    assert len(first._held) == 2
    with pytest.raises(RunLocked, match=f"^{ckpt_dir}: another run is using this folder \\(host "):
        RunLock([tmp_path / "other", ckpt_dir]).acquire()
    assert not (tmp_path / "other").exists()  # the refused one created and removed its own folder
    first.release()
    assert not run_dir.exists() and not ckpt_dir.exists()  # created by the run, left empty: removed
    second = RunLock([ckpt_dir])
    second.acquire()
    assert second.notes == []
    second.release()
