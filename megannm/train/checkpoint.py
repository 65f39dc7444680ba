"""Saving a live DeepSpeed engine atomically, and resuming one from the newest complete checkpoint.

A save writes DeepSpeed's files and every rank's RNG states into the temporary tag, each rank records the size and
crc32 of its share of the files, and all ranks agree that every write succeeded (one all-reduce, which is also the
barrier). Rank 0 then writes ``megannm.json`` last (with the records), renames the folder, replaces ``latest``
(write + fsync + ``os.replace``) and prunes. A crash at any moment leaves ``latest`` naming the last complete
checkpoint. A write that fails (a full disk) removes the temporary folder and raises ``SaveError``: one line naming
the path and the free space; the previous checkpoint is untouched.

A resume first checks the files against their records (the ranks share the reading): a truncated or corrupt file is
one line naming it, before DeepSpeed reads anything. With ``fallback`` a damaged checkpoint is skipped for the newest
older complete one. The names on disk are ``megannm.checkpoint``'s.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm import checkpoint as fmt
from megannm import parallel
from megannm.checkpoint import integrity
from megannm.checkpoint.tensors import load_torch
from megannm.fileio import atomic_file, atomic_write_json


class SaveError(fmt.CheckpointError):
    """A save that failed (a full disk, an I/O error): a fault of the machine, not of the input, hence exit 1."""
    exit_code = 1


def _fault(point: str, step: int, path: Path | None = None) -> None:
    """Fault injection for the crash-safety tests: ``MEGANNM_FAULT=<point>:<step>`` kills this process with SIGKILL;
    ``<point>:<step>:enospc`` raises a full disk's OSError there instead."""
    parts = os.environ.get("MEGANNM_FAULT", "").split(":")
    if parts[:2] != [point, str(step)]:
        return
    if parts[2:3] == ["enospc"]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    """This process's RNG states in types ``torch.load(weights_only=True)`` reads: tensors, numbers, strings and
    tuples (numpy's key array as an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_ok(ok: bool) -> bool:
    """True on every rank when it is true on every rank: a barrier that carries a verdict."""
    t = torch.tensor([0.0 if ok else 1.0], device=parallel.device())
    parallel.all_reduce(t, op="max")
    return float(t) == 0.0


# saving ---------------------------------------------------------------------------------------------------------------


def save(engine, ckpt_dir: str | Path, step: int, meta: dict, layout, keep_last: int = 2,
         client_state: Optional[dict] = None, spare: Optional[str] = None) -> Path:
    """Atomically save ``engine`` (a DeepSpeed engine) as ``ckpt_dir/step<N>``; every rank calls this. Pruning keeps
    the tag ``spare`` too (the Trainer's newest checkpoint whose weights have passed a good step)."""
    ckpt_dir = Path(ckpt_dir)
    tag = fmt.tag_for(step)
    tmp, final = ckpt_dir / (fmt.TMP_PREFIX + tag), ckpt_dir / tag
    error = None
    try:
        if layout.rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crashed save of the same step
                shutil.rmtree(tmp)
    except OSError as e:
        error = e
    if not _all_ok(error is None):
        _failed(error, tmp, ckpt_dir, step, layout)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state or {}, save_latest=False)
        rng = fmt.rng_file(tmp, layout.rank)
        rng.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(rng) as f:
            torch.save(rng_state(), f)
        _fault("save_mid", step, rng)
        _record_files(tmp, rng, layout)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        error = e
    if not _all_ok(error is None):  # every rank's shards are on disk, or every rank learns that some are not
        _failed(error, tmp, ckpt_dir, step, layout)
    if layout.rank == 0:
        try:
            files = {}
            for part in sorted((tmp / fmt.FILES_DIR).glob("rank*.json")):
                files.update(json.loads(part.read_text()))
            shutil.rmtree(tmp / fmt.FILES_DIR)
            fmt.write_meta(tmp, dict(meta, step=step, tag=tag, saved_at=time.time(), files=files))
            if final.exists():  # a previous run saved this step and was not resumed from it: replace it whole
                _remove(final)
            os.replace(tmp, final)
            _fault("save_before_latest", step)
            fmt.unmark_diverged(ckpt_dir, tag)  # new weights under a tag that once diverged
            fmt.write_latest(ckpt_dir, tag)
        except OSError as e:
            error = e
    if not _all_ok(error is None):
        _failed(error, tmp, ckpt_dir, step, layout)
    if layout.rank == 0:
        prune(ckpt_dir, keep_last, keep={tag, spare} - {None})
    return final


def _record_files(tmp: Path, rng: Path, layout) -> None:
    """This rank's share of DeepSpeed's files (all on disk: ``save_checkpoint`` ends with a barrier) and its own RNG
    file: size and crc32 into ``FILES_DIR/rank<R>.json``, which rank 0 merges into ``megannm.json``."""
    mine = integrity.share(integrity.top_files(tmp), layout.rank, layout.world_size)
    records = integrity.record(tmp, mine + [str(rng.relative_to(tmp))])
    (tmp / fmt.FILES_DIR).mkdir(exist_ok=True)
    atomic_write_json(tmp / fmt.FILES_DIR / f"rank{layout.rank:05d}.json", records)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _failed(error: Optional[BaseException], tmp: Path, ckpt_dir: Path, step: int, layout) -> None:
    """Remove the temporary folder and raise one line: the path, why, the free space, what is still there."""
    if error is not None:  # drop the failed writer's frames now: their open files would pin the deleted space
        error.__traceback__ = None
    try:
        free = shutil.disk_usage(ckpt_dir if ckpt_dir.exists() else ckpt_dir.parent).free  # what the write met
    except OSError:
        free = None
    if layout.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    parallel.barrier()
    try:
        previous = fmt.latest(ckpt_dir)
    except fmt.CheckpointError:
        previous = None
    kept = f"{previous} is untouched" if previous else "no earlier checkpoint exists"
    space = f"{_human(free)} free there" if free is not None else "free space unknown"
    if error is None:  # another rank's write failed: that rank says which file
        e = SaveError(f"{tmp}: checkpoint of step {step} not saved: a write failed on another rank; {space}; "
                      f"{kept}")
        e.silent = True
        raise e
    where = getattr(error, "filename", None) or tmp
    if isinstance(error, OSError) and error.errno:
        why = os.strerror(error.errno)
    elif free is not None and free < 64 * 2 ** 20:  # torch's writer says "unexpected pos ..." for a full disk
        why = "no space left on device"
    else:
        why = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    raise SaveError(f"{where}: cannot save the checkpoint of step {step}: {why} ({space}); removed {tmp}, "
                    f"{kept}") from None


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder so that a kill half-way leaves a hidden temporary folder (removed by the next save),
    never a tag folder without its ``megannm.json`` (which pruning could not see)."""
    trash = folder.with_name(f"{fmt.TMP_PREFIX}del-{folder.name}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int, keep: set[str] = frozenset()) -> None:
    """Keep the newest ``keep_last`` complete checkpoints, the tags ``keep`` and the guard's protected ones; remove
    what interrupted saves and prunes left."""
    spare = fmt.protected(ckpt_dir) | set(keep)
    for old in fmt.complete(ckpt_dir)[:-keep_last]:
        if old.name not in spare:
            _remove(old)
    reclaim(ckpt_dir)


def reclaim(ckpt_dir: Path, run_dir: Optional[Path] = None) -> list[str]:
    """Remove what killed runs and interrupted saves left (rank 0 of the run holding the folders' locks, so nothing
    here belongs to a live writer): temporary checkpoint folders, half-written pointers and files
    (``fmt.is_temporary``), tag folders left by a deletion killed half-way; in ``run_dir``, half-written files.
    Returns the names removed."""
    gone = []
    for orphan in fmt.orphans(ckpt_dir):  # a deletion killed half-way (before deletions renamed first)
        shutil.rmtree(orphan, ignore_errors=True)
        gone.append(orphan.name)
    for folder in {Path(ckpt_dir), Path(run_dir or ckpt_dir)}:
        if not folder.is_dir():
            continue
        for stale in folder.iterdir():
            if not fmt.is_temporary(stale.name):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            gone.append(stale.name)
    return gone


# resuming -------------------------------------------------------------------------------------------------------------


def resume(engine, ckpt_dir: str | Path, args, layout, vocab,
           fallback: bool = False) -> Optional[tuple[Path, dict, list[str]]]:
    """Load the checkpoint ``ckpt_dir/latest`` names into ``engine``: (its folder, its metadata, the damaged
    checkpoints skipped on the way), or None when there is none yet.

    A checkpoint saved by training resumes exactly (weights, optimizer, schedule, this rank's RNG). A module-only one
    (``megannm convert --to deepspeed``) loads its weights and continues the schedule from its step, with fresh Adam
    moments. Either must match this run's vocabulary, model structure and tensor/pipeline layout; at another
    data-parallel size the optimizer state is re-partitioned (``megannm.train.elastic``). Without a pointer (a fresh
    folder, a crash between a save's rename and its pointer, a divergence that left no good checkpoint) the newest
    complete checkpoint not marked ``diverged`` is taken. A damaged one
    (``CorruptCheckpoint``) stops the run with one line naming the file, or with ``fallback`` is skipped for the
    newest older complete checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    skipped: list[str] = []
    try:
        named = fmt.latest(ckpt_dir)
    except fmt.CorruptCheckpoint as e:
        if not fallback:
            raise
        named, skipped = None, [str(e)]
    bad = fmt.diverged(ckpt_dir)  # (``latest`` never names one; an older pointer or a fallback might)
    done = [p for p in fmt.complete(ckpt_dir) if p.name not in bad]
    if named is None and not skipped:  # no pointer: a fresh folder, or a crash between a save's rename and pointer
        order = done[-1:]
    else:
        order = ([named] if named else []) + ([p for p in reversed(done) if p != named] if fallback else [])
    for folder in order:
        try:
            return folder, _load(engine, folder, args, layout, vocab), skipped
        except fmt.CorruptCheckpoint as e:
            if not fallback:
                raise
            skipped.append(str(e))
    if skipped:
        raise fmt.CorruptCheckpoint(f"{ckpt_dir}: no loadable checkpoint ({len(skipped)} damaged, the newest: "
                                    f"{skipped[0]})")
    return None


def _load(engine, folder: Path, args, layout, vocab) -> dict:
    meta = fmt.read_meta(folder)
    fmt.check_compatible(meta, args, vocab.fingerprint, str(folder), layout=layout.to_dict())
    _verify(folder, meta, layout)
    from megannm.train import elastic
    other_dp = elastic.needs_conversion(meta, engine, layout)
    if meta.get("module_only") or (other_dp and not elastic.keeps_moments(layout)):
        from megannm.train.load import load_module_only
        load_module_only(engine, folder, layout)
        if getattr(engine, "lr_scheduler", None) is not None:  # the schedule goes on from the saved step
            engine.lr_scheduler.last_epoch = int(meta.get("step") or 0) - 1
            engine.lr_scheduler.step()
        if other_dp:
            meta = dict(meta, elastic=elastic.describe(meta, layout, folder, moments_kept=False))
        return meta
    universal = None
    try:
        if other_dp:  # ZeRO partitions of another data-parallel size: through DeepSpeed's universal checkpoint
            load_path, universal = elastic.load(engine, folder, layout)
            meta = dict(meta, elastic=elastic.describe(meta, layout, folder, moments_kept=True))
        else:
            load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        rng = fmt.rng_file(folder, layout.rank)
        if rng.exists():
            set_rng_state(load_torch(rng, mmap=False))  # as data: megannm.trust
    except fmt.CheckpointError:
        raise
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a checkpoint without file records: find the file
        raise fmt.CorruptCheckpoint(f"{_unreadable(folder) or folder}: cannot be loaded "
                                    f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})"
                                    ) from None
    finally:
        if universal is not None:
            elastic.cleanup(universal, layout)
    if load_path is None:
        raise fmt.CheckpointError(f"{folder}: DeepSpeed found no loadable files for this rank ({layout.rank})")
    return meta


def _verify(folder: Path, meta: dict, layout) -> None:
    """Every file against its record in ``megannm.json``, the ranks sharing the reading; one all-reduce makes every
    rank raise for the same file (so that all of them fall back together, or stop together)."""
    files = meta.get("files")
    if not files:  # saved before files were recorded, or written by `megannm convert`: nothing to compare with
        return
    names = sorted(files)
    problem, first = None, 0
    for i in range(layout.rank, len(names), layout.world_size):
        problem = integrity.check(folder, files, [names[i]])
        if problem:
            first = len(names) - i  # the max over ranks picks the first bad file in name order
            break
    t = torch.tensor([float(first)], device=parallel.device())
    parallel.all_reduce(t, op="max")
    if float(t) == 0:
        return
    bad = names[len(names) - int(t)]
    if layout.rank == 0:
        raise fmt.CorruptCheckpoint(integrity.check(folder, files, [bad]))
    e = fmt.CorruptCheckpoint(f"{folder / bad}: failed its check (rank 0 says how)")
    e.silent = True
    raise e


def _unreadable(folder: Path) -> Optional[Path]:
    """The first file in ``folder`` that is not an intact zip archive (torch.save's format; each member has a
    crc32): names the culprit when a checkpoint without file records fails to load."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as z:
                if z.testzip() is None:
                    continue
        except (zipfile.BadZipFile, OSError):
            pass
        return path
    return None
