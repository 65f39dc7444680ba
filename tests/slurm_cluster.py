"""Session fixtures for the launcher tests: a real single-node Slurm cluster on localhost, and a tiny recipe.

The cluster (munged + slurmctld + slurmd, Debian's Slurm 22.05) lives in one temporary folder with its own munge
key, munge socket, ports, state and spool, so it touches nothing of the machine's own Slurm or munge set-up; it is
stopped (jobs cancelled, daemons killed by their pid files) and removed after the session. Tests are skipped only
when the binaries are missing; a cluster that fails to start is an error with the daemons' log tails.

Test modules load this file with ``pytest_plugins = ["tests.slurm_cluster"]``, so its fixtures exist once per
session.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)  # left by an in-process world of one in this pytest session
        self._pids: dict[str, Path] = {"slurmd": root / "slurmd.pid", "slurmctld": root / "slurmctld.pid",
                                       "munged": root / "munge" / "munged.pid"}

    # set-up ---------------------------------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        m = self.root / "munge"
        m.mkdir(mode=0o755)  # munged: the socket's folder must be executable by all
        key = m / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
        args = [f"--key-file={key}", f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"]
        if os.geteuid() == 0:
            try:  # munged refuses to run as root; run it as its own user
                pw = pwd.getpwnam("munge")
                for p in (m, key):
                    os.chown(p, pw.pw_uid, pw.pw_gid)
                cmd = ["runuser", "-u", "munge", "--", "munged", *args]
            except KeyError:
                cmd = ["munged", "--force", *args]
        else:
            cmd = ["munged", *args]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)

    def _write_conf(self) -> None:
        r = self.root
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName=megannm-test
            SlurmctldHost=localhost
            SlurmctldPort={_free_port()}
            SlurmdPort={_free_port()}
            SlurmUser={user}
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            # cred_expire: a requeued job waits cred_expire + 1 s before it may start again (default 120 s)
            AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=5
            StateSaveLocation={r / 'state'}
            SlurmdSpoolDir={r / 'spool'}
            SlurmctldPidFile={r / 'slurmctld.pid'}
            SlurmdPidFile={r / 'slurmd.pid'}
            SlurmctldLogFile={r / 'slurmctld.log'}
            SlurmdLogFile={r / 'slurmd.log'}
            MailProg=/bin/true
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            SchedulerParameters=sched_interval=1,bf_interval=1
            # finished jobs stay visible to squeue / scontrol for the whole session (there is no slurmdbd)
            MinJobAge=900
            KillWait=5
            ReturnToService=2
            MpiDefault=none
            JobAcctGatherType=jobacct_gather/none
            AccountingStorageType=accounting_storage/none
            JobCompType=jobcomp/none
            # the configured 2 CPUs hold even on a machine with fewer
            SlurmdParameters=config_overrides
            NodeName=localhost NodeHostname={socket.gethostname()} CPUs=2 State=UNKNOWN
            PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
            """))

    def start(self, timeout: float = 60) -> None:
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        self._start_munge()
        self._write_conf()
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        subprocess.run(["slurmd", "-N", "localhost", "-f", str(self.conf)], check=True, env=self.env, timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%T"], check=False)
            if out.returncode == 0 and out.stdout.strip() == "idle":
                return
            time.sleep(0.3)
        raise RuntimeError(f"the test Slurm cluster did not become idle in {timeout} s\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            p = self.root / f
            if p.exists():
                out.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel every job of this cluster, wait for them to end, then stop the daemons by their pid files."""
        if self._pid("slurmctld"):
            ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if ids:
                self.run(["scancel", *ids], check=False)
                deadline = time.time() + 30
                while time.time() < deadline and self.run(["squeue", "-h", "-t", "running,completing", "-o", "%i"],
                                                          check=False).stdout.strip():
                    time.sleep(0.5)
        _terminate([pid for pid in map(self._pid, ("slurmd", "slurmctld", "munged")) if pid])

    def _pid(self, name: str) -> int | None:
        try:
            pid = int(self._pids[name].read_text().strip())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None

    # helpers for tests ------------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, tries: int = 3) -> subprocess.CompletedProcess:
        """A Slurm command; retried (slurmctld can time out on a loaded machine), then AssertionError if check."""
        for attempt in range(tries):
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            if out.returncode == 0 or not check:
                return out
            time.sleep(1 + attempt)
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, Reason, Restarts, StartTime, EndTime, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def wait(self, job_id: str, until, timeout: float = 300, what: str = "") -> dict:
        """Poll the job until ``until(info)``; a timeout fails with the job's log. A failing scontrol (slurmctld
        busy on a loaded machine) is retried until then."""
        deadline = time.time() + timeout
        info: dict = {}
        error = ""
        while time.time() < deadline:
            try:
                info = self.job(job_id)
            except AssertionError as e:
                error = f" (scontrol: {e})"
            else:
                if until(info):
                    return info
            time.sleep(0.25)
        raise AssertionError(f"job {job_id}: not {what or 'done'} after {timeout} s (last: JobState="
                             f"{info.get('JobState')} Reason={info.get('Reason')}){error}\n{self.job_log(info)}")

    def wait_finished(self, job_id: str, timeout: float = 300) -> dict:
        """Until the job has ended, or can never start (a dependency failed)."""
        return self.wait(job_id, lambda i: i.get("JobState") in TERMINAL or i.get("Reason") ==
                         "DependencyNeverSatisfied", timeout, "finished")

    @staticmethod
    def job_log(info: dict, chars: int = 4000) -> str:
        p = Path(info.get("StdOut", ""))
        return f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" if p.is_file() else ""


def _terminate(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``timeout`` seconds."""
    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    for pid in filter(alive, pids):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while any(map(alive, pids)) and time.time() < deadline:
        time.sleep(0.1)
    for pid in filter(alive, pids):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def slurm_cluster():
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm/munge binaries missing: {', '.join(missing)}")
    # Not under pytest's tmp: munged wants every folder on its socket's path searchable by all (pytest's is 0700).
    root = Path(tempfile.mkdtemp(prefix="megannm-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # `megannm stage` (run in-process by the tests) talks to it
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# a tiny recipe for every launcher test, on the session's toy data set (tests/conftest.py)


TINY_STEPS = 30


@pytest.fixture(scope="session")
def tiny_recipe(toy_data, tmp_path_factory) -> Path:
    """A tiny MoT model (hidden 32, 2 layers, seq 32) at ZeRO 1 on conftest's toy shards, loss logged every step;
    logging.dir is set per run."""
    toy_shards = toy_data["shards"] / "train"
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: tiny
        seed: 7
        model: {{hidden_size: 32, num_layers: 2, num_heads: 4, ffn_hidden_size: 64, max_seq_len: 96}}
        parallel: {{tensor_parallel: 1, pipeline_parallel: 1, zero_stage: 1}}
        data: {{train: [{{path: {toy_shards}}}], seq_len: 80, micro_batch_size: 2, global_batch_size: 4}}
        optimizer: {{lr: 3.0e-3, min_lr: 3.0e-4}}
        schedule: {{train_steps: {TINY_STEPS}, warmup_steps: 2}}
        checkpoint: {{keep_last: 1}}
        logging: {{interval: 1, tensorboard: false, progress_bar: false}}
        """))
    return path


@pytest.fixture(scope="session")
def reference_run(tiny_recipe, tmp_path_factory) -> Path:
    """The tiny recipe trained uninterrupted by torchrun on 2 ranks: the losses every other launch must match."""
    from tests.dist import run
    out = tmp_path_factory.mktemp("reference")
    run(["-m", "megannm", "train", str(tiny_recipe), f"logging.dir={out}"], nproc=2, launcher="torchrun")
    return out


def metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def losses(records: list[dict]) -> dict[int, float]:
    """step -> loss of the train records."""
    return {r["step"]: r["loss"] for r in records if r.get("split") == "train"}


def events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


PYTHON = sys.executable
