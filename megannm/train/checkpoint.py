"""Saving a live DeepSpeed engine atomically, and resuming one from the newest complete checkpoint.

A save writes DeepSpeed's files and every rank's RNG states into the temporary tag, waits for every rank (barrier),
writes ``megannm.json`` last (rank 0), renames the folder, then replaces ``latest`` (write + fsync + ``os.replace``).
A crash at any moment leaves ``latest`` naming the last complete checkpoint; the next save removes what is left of
the interrupted one. The names on disk are ``megannm.checkpoint``'s.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm import checkpoint as fmt
from megannm import parallel


def _fault(point: str, step: int) -> None:
    """Fault injection for the crash-safety tests: MEGANNM_FAULT=<point>:<step> kills this process with SIGKILL."""
    spec = os.environ.get("MEGANNM_FAULT", "")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: str | Path, step: int, meta: dict, layout, keep_last: int = 2,
         client_state: Optional[dict] = None) -> Path:
    """Atomically save ``engine`` (a DeepSpeed engine) as ``ckpt_dir/step<N>``; every rank calls this."""
    ckpt_dir = Path(ckpt_dir)
    tag = fmt.tag_for(step)
    tmp_tag = fmt.TMP_PREFIX + tag
    tmp = ckpt_dir / tmp_tag
    if layout.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed save of the same step
            shutil.rmtree(tmp)
    parallel.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state or {}, save_latest=False)
    rng = fmt.rng_file(tmp, layout.rank)
    rng.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), rng)
    _fault("save_mid", step)
    parallel.barrier()  # every rank's shards are on disk
    final = ckpt_dir / tag
    if layout.rank == 0:
        fmt.write_meta(tmp, dict(meta, step=step, tag=tag, saved_at=time.time()))
        if final.exists():  # a previous run saved this step and was not resumed from it: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fault("save_before_latest", step)
        fmt.write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last, keep=tag)
    parallel.barrier()
    return final


def prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (and ``keep``); remove interrupted saves."""
    for old in fmt.complete(ckpt_dir)[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in Path(ckpt_dir).glob(fmt.TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def resume(engine, ckpt_dir: str | Path, args, layout, vocab) -> Optional[tuple[Path, dict]]:
    """Load the checkpoint ``ckpt_dir/latest`` names into ``engine``: (its folder, its metadata), or None when there
    is none yet.

    A checkpoint saved by training resumes exactly (weights, optimizer, schedule, this rank's RNG). A module-only one
    (``megannm convert --to deepspeed``) loads its weights and continues the schedule from its step, with fresh Adam
    moments. Either must match this run's vocabulary, model structure and tensor/pipeline layout."""
    found = fmt.latest(ckpt_dir)
    if found is None:
        return None
    meta = fmt.read_meta(found)
    fmt.check_compatible(meta, args, vocab.fingerprint, str(found), layout=layout.to_dict())
    if meta.get("module_only"):
        from megannm.train.load import load_module_only
        load_module_only(engine, found, layout)
        if getattr(engine, "lr_scheduler", None) is not None:  # the schedule goes on from the saved step
            engine.lr_scheduler.last_epoch = int(meta.get("step") or 0) - 1
            engine.lr_scheduler.step()
        return found, meta
    load_path, _ = engine.load_checkpoint(str(found.parent), tag=found.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise fmt.CheckpointError(f"{found}: DeepSpeed found no loadable files for this rank ({layout.rank})")
    rng = fmt.rng_file(found, layout.rank)
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    return found, meta
