"""Checkpoints: DeepSpeed's own save/load, made atomic, with megannm's metadata beside the weights.

Layout of ``checkpoint.dir``::

    latest                 the tag of the newest complete checkpoint (written with write + fsync + os.replace)
    step00000100/          DeepSpeed's files (model/optimizer/ZeRO shards, pipeline layers) + megannm.json + rng/
    .tmp-step00000200/     a save in progress: invisible to loaders, removed by the next save

A save writes everything into the temporary tag, waits for every rank (barrier), renames the folder (rank 0), then
replaces ``latest``. A crash at any moment leaves ``latest`` naming the last complete checkpoint. ``megannm.json`` is
written last inside the temporary folder, so a folder without it is never complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm import parallel

META = "megannm.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


# What a checkpoint's weights are shaped by or mean: these must match to load it. Loss weights, z-loss, RoPE base,
# sequence length, precision and the TP-dependent vocabulary padding may change between stages.
ARCHITECTURE_KEYS = ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab_size", "image_start", "image_end", "mot",
                     "n_modalities", "qk_norm")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; one line naming the file and parameter."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


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
    tag = tag_for(step)
    tmp_tag = TMP_PREFIX + tag
    tmp = ckpt_dir / tmp_tag
    if layout.rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed save of the same step
            shutil.rmtree(tmp)
    parallel.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state or {}, save_latest=False)
    (tmp / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank{layout.rank:05d}.pt")
    _fault("save_mid", step)
    parallel.barrier()  # every rank's shards are on disk
    final = ckpt_dir / tag
    if layout.rank == 0:
        full_meta = dict(meta, step=step, tag=tag, saved_at=time.time())
        _fsync_write(tmp / META, json.dumps(full_meta, indent=2, default=str) + "\n")
        if final.exists():  # a previous run saved this step and was not resumed from it: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fault("save_before_latest", step)
        _fsync_write(ckpt_dir / LATEST, tag + "\n")
        _prune(ckpt_dir, keep_last, keep=tag)
    parallel.barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int, keep: str) -> None:
    done = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and (p / META).exists())
    for old in done[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest(ckpt_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_dir / tag
    if not (path / META).exists():
        raise CheckpointError(f"{pointer}: names {tag!r}, but {path / META} does not exist (incomplete checkpoint)")
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint dir holding ``latest`` -> the complete checkpoint folder."""
    path = Path(path)
    if (path / META).exists():
        return path
    found = latest(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: not a megannm checkpoint (no {META} and no {LATEST} pointer)")
    return found


def read_meta(path: str | Path) -> dict:
    path = resolve(path)
    try:
        return json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META}: not valid JSON ({e})") from None


def check_compatible(meta: dict, model_args: dict, vocab_fingerprint: str, source: str,
                     layout: Optional[dict] = None) -> None:
    """Refuse a checkpoint of another model shape, vocabulary or (for DeepSpeed resumes) parallel layout."""
    theirs = meta.get("vocab", {}).get("fingerprint")
    if theirs != vocab_fingerprint:
        raise CheckpointError(f"{source}: vocabulary fingerprint {theirs} differs from the recipe's data "
                              f"({vocab_fingerprint}): the token ids mean different things")
    if layout is not None:
        ckpt_layout = meta.get("layout", {})
        for key in ("tp", "pp"):
            if ckpt_layout.get(key) != layout.get(key):
                raise CheckpointError(
                    f"{source}: saved at {key}={ckpt_layout.get(key)}, this run has {key}={layout.get(key)}: convert "
                    f"it first (megannm convert {source} OUT --to deepspeed --tp {layout.get('tp')} --pp "
                    f"{layout.get('pp')})")
    ckpt_args = meta.get("model_args", {})
    for key in ARCHITECTURE_KEYS:
        if ckpt_args.get(key) != model_args.get(key):
            raise CheckpointError(f"{source}: model parameter {key} is {ckpt_args.get(key)!r} in the checkpoint, "
                                  f"{model_args.get(key)!r} in the recipe")


def load(engine, path: str | Path, layout, module_only: bool = False) -> dict:
    """Load a complete checkpoint into ``engine``; returns its metadata (and restores this rank's RNG on resume)."""
    path = resolve(path)
    meta = read_meta(path)
    if module_only or meta.get("module_only"):
        # weights only (init_from, or a folder written by `megannm convert --to deepspeed`): megannm's loader works at
        # every ZeRO stage (DeepSpeed's own module-only load fails on ZeRO-3 at TP > 1)
        from megannm.convert.deepspeed import load_module_only
        load_module_only(engine, path, layout)
        if not module_only and getattr(engine, "lr_scheduler", None) is not None:  # a resume: the schedule goes on
            engine.lr_scheduler.last_epoch = int(meta.get("step") or 0) - 1  # from the saved step (Adam restarts)
            engine.lr_scheduler.step()
        return meta
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name,
                                               load_module_only=module_only,
                                               load_optimizer_states=not module_only,
                                               load_lr_scheduler_states=not module_only)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no loadable files for this rank ({layout.rank})")
    if not module_only:
        rng = path / "rng" / f"rank{layout.rank:05d}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))
    return meta
