"""One run per folder: a lock on a run's logging and checkpoint folders, held for the run's life.

Two runs writing into one folder replace each other's checkpoints and interleave ``metrics.jsonl``. A run therefore
holds ``.megannm-lock`` in each of its folders from before it reads its checkpoint until it exits; a second run into
either folder is refused with one line naming the holder (host, pid, start time, Slurm job) and the folder, before it
writes anything. Global rank 0 takes the locks (the folders are one per run, on a file system every rank shares) and
one all-reduce tells every rank, so no rank is left waiting in a collective.

The lock is two things in one file:

- a kernel lock (``fcntl.flock``, exclusive, non-blocking) on the open file: the kernel drops it when the holder
  exits in any way, SIGKILL included, so on one host a dead holder never blocks anyone. On NFS, Linux emulates flock
  with byte-range locks that the server arbitrates between clients (unless mounted ``nolock``, where they are local);
  on Lustre flock is coherent across clients only when mounted with ``-o flock`` (``localflock``: one client only;
  ``noflock``: refused). Where it is refused the record below decides alone.
- the holder's record (JSON): host, pid, the process's start time and the host's boot id (a reused pid, or a
  reboot, is not the holder), ``SLURM_JOB_ID`` and ``SLURM_RESTART_COUNT``. The holder touches the file's
  modification time every ``HEARTBEAT_S`` seconds (a daemon thread).

A record found when the kernel lock was granted is judged: on this host (same name, same boot) its process is alive if
a process with that pid and start time runs. On another host, or a host of the same name booted since (where the
kernel lock may not see the holder), it is alive unless its Slurm job is over (``squeue``, else ``sacct``; an earlier
incarnation of this very job, requeued, is over) or its heartbeat is older than ``STALE_S`` seconds. A live holder is
refused; a dead one's lock is taken over and the run logs that it did. Releasing removes the lock file while still
holding the kernel lock (a run that opened the old file meanwhile sees that the path no longer names it and starts
again), and removes a folder the run created if nothing else was written to it.

Hand-written because no library here does this: ``filelock`` covers the kernel lock only, with no record of who
holds it, no stale-holder rules across hosts and no heartbeat.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import psutil
import torch

from megannm import parallel

LOCK = ".megannm-lock"
HEARTBEAT_S = 60.0
STALE_S = 600.0  # ten missed heartbeats: a holder on another host whose Slurm job cannot be asked about is gone
_LIVE_SLURM = {"PENDING", "RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "RESIZING", "REQUEUED",
               "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}


class RunLocked(ValueError):
    """Another live run holds the folder: bad input (exit 2), one line naming the holder and the folder."""
    exit_code = 2


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Holder:
    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch)
    boot_id: str = ""
    slurm_job_id: str = ""
    slurm_restart: str = ""

    @classmethod
    def me(cls) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), _boot_id(),
                   os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURM_RESTART_COUNT", ""))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host} pid {self.pid} started {when}{job}"

    def same_process(self, other: "Holder") -> bool:
        return (self.host, self.pid, self.boot_id) == (other.host, other.pid, other.boot_id) \
            and abs(self.started - other.started) < 1.0


def _alive_here(h: Holder) -> bool:
    """A process with the holder's pid and start time runs on this host."""
    try:
        return abs(psutil.Process(h.pid).create_time() - h.started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _slurm_job_over(h: Holder) -> Optional[bool]:
    """True when the holder's Slurm job has ended (or is an earlier incarnation of this requeued job), False when
    Slurm says it is alive, None when Slurm cannot be asked."""
    if not h.slurm_job_id:
        return None
    if h.slurm_job_id == os.environ.get("SLURM_JOB_ID") and h.slurm_restart != os.environ.get("SLURM_RESTART_COUNT",
                                                                                                ""):
        return True  # Slurm runs one incarnation of a job at a time: the one that wrote this record is gone
    for cmd in (["squeue", "-h", "-j", h.slurm_job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", h.slurm_job_id, "-o", "State"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode != 0:
            if cmd[0] == "squeue" and "invalid job id" in out.stderr.lower():
                return True  # finished long enough ago to be purged from the controller
            continue
        states = {s.split()[0].upper() for s in out.stdout.split() if s.strip()}
        if cmd[0] == "squeue" and not states:
            return True
        if states:
            return not (states & _LIVE_SLURM)
    return None


def _here(h: Holder) -> bool:
    """Recorded on this host since its last boot (a host name alone is not enough: containers on several nodes may
    share one, and a reboot reuses pids)."""
    return h.host == socket.gethostname() and (not h.boot_id or h.boot_id == _boot_id())


def _alive(h: Holder, heartbeat: float) -> bool:
    if _here(h):
        return _alive_here(h)
    over = _slurm_job_over(h)
    if over is not None:
        return not over
    return time.time() - heartbeat < STALE_S


def _read(fd: int) -> Optional[Holder]:
    try:
        raw = os.pread(fd, 4096, 0)
        return Holder(**json.loads(raw)) if raw.strip() else None
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """The locks of one run's folders (``acquire`` / ``release``; rank 0 only: see ``held``)."""

    def __init__(self, folders: list[Path]):
        seen, self.folders = set(), []
        for f in folders:
            key = os.path.realpath(f)
            if key not in seen:
                seen.add(key)
                self.folders.append(Path(f))
        self.me = Holder.me()
        self._held: list[tuple[Path, int, bool]] = []  # (lock file, fd, whether this run created the folder)
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None
        self.notes: list[str] = []  # stale locks taken over, for the run's log

    def acquire(self) -> None:
        try:
            for folder in self.folders:
                self._lock(folder)
        except BaseException:
            self.release()
            raise
        self._beat = threading.Thread(target=self._heartbeat, name="megannm-runlock", daemon=True)
        self._beat.start()

    def _lock(self, folder: Path) -> None:
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK
        for _ in range(20):  # the path may be removed under us by a holder releasing it: open it again
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._wait_for_record(fd)
                os.close(fd)
                self._refuse(folder, path, holder)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                pass  # no lock primitive on this file system: the record decides alone
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        else:
            raise RunLocked(f"{folder}: cannot take {path}: it keeps being replaced (another run starting?)")
        holder = _read(fd)
        if holder is not None and not holder.same_process(self.me):
            if _alive(holder, os.fstat(fd).st_mtime):  # (with the kernel lock granted: a holder it cannot see)
                os.close(fd)
                self._refuse(folder, path, holder)
            self.notes.append(f"{path}: took over the lock of a run that is gone ({holder.describe()})")
        data = json.dumps(asdict(self.me)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._held.append((path, fd, created))

    @staticmethod
    def _wait_for_record(fd: int) -> Optional[Holder]:
        for _ in range(10):  # a holder that has just taken the kernel lock writes its record right after
            holder = _read(fd)
            if holder is not None:
                return holder
            time.sleep(0.1)
        return None

    def _refuse(self, folder: Path, path: Path, holder: Optional[Holder]) -> None:
        who = holder.describe() if holder is not None else "a process that has not recorded itself yet"
        if holder is not None and not _here(holder):
            with contextlib.suppress(OSError):
                age = time.time() - path.stat().st_mtime
                who += (f", its lock refreshed {age:.0f} s ago: taken as gone {STALE_S:.0f} s after the last "
                        f"refresh")
        raise RunLocked(f"{folder}: another run is using this folder ({who}; lock {path}): wait for it to end or "
                        f"stop it, or give this run another logging.dir / checkpoint.dir")

    def check(self) -> None:
        """Refuse now if a live run holds one of the folders, taking nothing and writing nothing: what a run does
        before it spends minutes building its model (``acquire`` still decides, at the start of the run)."""
        for folder in self.folders:
            try:
                fd = os.open(folder / LOCK, os.O_RDWR)
            except OSError:  # no folder or no lock: nobody to refuse for
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._refuse(folder, folder / LOCK, self._wait_for_record(fd))
                except OSError:
                    pass
                holder = _read(fd)
                if holder is not None and not holder.same_process(self.me) and _alive(holder, os.fstat(fd).st_mtime):
                    self._refuse(folder, folder / LOCK, holder)
            finally:
                os.close(fd)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path, fd, _ in list(self._held):
                with contextlib.suppress(OSError):
                    os.utime(fd)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        for path, fd, created in reversed(self._held):
            with contextlib.suppress(OSError):
                os.unlink(path)  # still holding the kernel lock: whoever opened the old file retries
            os.close(fd)
            if created:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only if the run left nothing in it
        self._held.clear()


def _agree(error: Optional[BaseException], folders: list[Path]) -> None:
    """Every rank raises when rank 0 met ``error`` (one all-reduce: no rank is left waiting in a collective)."""
    t = torch.tensor([1.0 if error is not None else 0.0], device=parallel.device())
    parallel.all_reduce(t, op="max")
    if error is not None:
        raise error
    if float(t):
        e = RunLocked(f"{folders[0]}: another run is using this folder (rank 0 names it)")
        e.silent = True
        raise e


def check(folders: list[Path], layout) -> None:
    """``RunLock.check`` on rank 0, agreed by every rank."""
    error = None
    if layout.rank == 0:
        try:
            RunLock(folders).check()
        except Exception as e:  # noqa: BLE001
            error = e
    _agree(error, folders)


@contextlib.contextmanager
def held(folders: list[Path], layout) -> Iterator[list[str]]:
    """The run's locks for the duration of the block, on every rank (rank 0 holds them); yields the notes for the
    log. A refusal raises ``RunLocked`` on every rank (rank 0's with the line, the others silent)."""
    lock, error = None, None
    if layout.rank == 0:
        lock = RunLock(folders)
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 (every rank must learn it before anyone goes on)
            error, lock = e, None
    _agree(error, folders)
    try:
        yield lock.notes if lock is not None else []
    finally:
        if lock is not None:
            lock.release()
