"""Resuming at another data-parallel size: the optimizer state (Adam moments and step) and the data position kept.

A ZeRO checkpoint's optimizer partitions are cut for the data-parallel size that saved them; DeepSpeed refuses to
load them at another (``ZeRORuntimeException``). DeepSpeed's own answer is its universal checkpoint: every
parameter's fp32 master weight, Adam moments and step as whole tensors (``deepspeed.checkpoint.ds_to_universal``),
which any ZeRO stage at any data-parallel size loads by cutting its own partitions (the engine's
``checkpoint.load_universal``). This module converts a checkpoint into that form in a hidden temporary folder beside
it (rank 0, one process: it needs free space for the fp32 weights and both moments, 12 bytes a parameter; removed
after the load, and reclaimed by the next run if the process dies on the way) and loads it on every rank. Tested at
tensor and pipeline size 1, ZeRO-1 and ZeRO-3. The data position needs nothing: the loader's global order is cut
from ``consumed_samples`` at any data-parallel size (``megannm.data.loader``), so a fixed global batch sees the same
samples in the same steps.

What is kept: weights, Adam moments and step, the learning-rate schedule, DeepSpeed's step counters, the data
position. What cannot be: a rank that did not exist when the checkpoint was saved has no RNG state of its own (it
keeps the recipe's seed); ``describe`` says so in the one line the Trainer logs. With tensor or pipeline stages
(``keeps_moments``) the weights and schedule load and the Adam moments start afresh, also said in that line.

ds_to_universal unpickles DeepSpeed's files with ``weights_only=False``; every file it reads is first opened here with
``megannm.checkpoint.tensors.load_torch`` (``weights_only=True``, checked against its crc32 record), so a file that
would run code is refused before DeepSpeed's reader sees it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import time
from pathlib import Path

import torch

from megannm import checkpoint as fmt
from megannm import parallel

UNIVERSAL_PREFIX = fmt.TMP_PREFIX + "universal-"  # ckpt_dir/.tmp-universal-<tag>/<tag>/: what ds_to_universal writes


def saved_dp(meta: dict) -> int:
    return int((meta.get("layout") or {}).get("dp") or 1)


def needs_conversion(meta: dict, engine, layout) -> bool:
    """A checkpoint with ZeRO optimizer partitions saved at another data-parallel size than this run's."""
    return (saved_dp(meta) != layout.dp and not meta.get("module_only")
            and bool(engine.zero_optimization()) and int(meta.get("zero_stage") or 0) > 0)


def keeps_moments(layout) -> bool:
    """Whether the optimizer state is re-partitioned at this layout (else the weights load and Adam starts afresh):
    without tensor and pipeline stages. DeepSpeed's converter joins tensor-parallel slices by patterns a model must
    declare and does not cover pipeline layer files; megannm does not rely on either untested."""
    return layout.tp == 1 and layout.pp == 1


def describe(meta: dict, layout, folder: Path, moments_kept: bool) -> str:
    """The one line the Trainer logs: what was kept and what starts afresh."""
    old = saved_dp(meta)
    kept = ("weights, Adam moments and step, schedule and data position kept (DeepSpeed universal checkpoint)"
            if moments_kept else "weights, schedule and data position kept; Adam moments and step reset (the "
                                 "optimizer state is re-partitioned at tensor and pipeline size 1 only)")
    world_then = int((meta.get("layout") or {}).get("world_size") or old)
    new = layout.world_size - world_then
    ranks = f"rank {world_then} had" if new == 1 else f"ranks {world_then}-{layout.world_size - 1} had"
    rng = (f"; {ranks} no saved RNG state and keep{'s' if new == 1 else ''} the recipe's seed" if new > 0 else "")
    return f"{folder}: saved at data-parallel size {old}, resumed at {layout.dp}: {kept}{rng}"


def _check_readable(folder: Path) -> None:
    """Every DeepSpeed file of ``folder`` opened once the safe way (see the module docstring)."""
    from megannm.checkpoint.tensors import load_torch, records_of
    records = records_of(folder)
    for path in sorted(folder.glob("*_states.pt")):
        load_torch(path, records)


def convert(folder: Path) -> Path:
    """``folder`` (a complete megannm checkpoint) -> its universal form in ``<ckpt_dir>/.tmp-universal-<tag>/<tag>``;
    rank 0 only. DeepSpeed's converter prints a progress report: kept out of the run's output."""
    from deepspeed.checkpoint import ds_to_universal
    _check_readable(folder)
    parent = folder.parent / (UNIVERSAL_PREFIX + folder.name)
    shutil.rmtree(parent, ignore_errors=True)
    out = parent / folder.name
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    # (one worker: a process pool forked from a rank that holds process groups is not safe)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    return out


def _any(flag: bool) -> bool:
    """True on every rank when it is true on some rank (one all-reduce, also a barrier)."""
    t = torch.tensor([1.0 if flag else 0.0], device=parallel.device())
    parallel.all_reduce(t, op="max")
    return float(t) > 0


def load(engine, folder: Path, layout) -> tuple[str | None, str]:
    """Load ``folder`` (saved at another data-parallel size) into ``engine`` through its universal form; every rank
    calls this. Returns DeepSpeed's load path and the universal folder's parent (removed by ``cleanup``)."""
    error = None
    parent = folder.parent / (UNIVERSAL_PREFIX + folder.name)
    # The conversion reads and writes the whole optimizer state on rank 0 (minutes for a large model): the other
    # ranks wait for a marker file rather than in a collective, which would time out (parallel.timeout_minutes).
    nonce = torch.tensor([float(random.SystemRandom().randrange(1, 2 ** 31)) if layout.rank == 0 else 0.0],
                         device=parallel.device())
    parallel.all_reduce(nonce, op="max")
    marker = folder.parent / f"{UNIVERSAL_PREFIX}{folder.name}.{int(nonce)}.done"
    if layout.rank == 0:
        try:
            convert(folder)
        except Exception as e:  # noqa: BLE001 (every rank must learn it; rank 0 names it)
            error = e
        marker.touch()
    else:
        while not marker.exists():
            time.sleep(1.0)
    if _any(error is not None):
        if layout.rank == 0:
            shutil.rmtree(parent, ignore_errors=True)
            marker.unlink(missing_ok=True)
        if isinstance(error, fmt.CheckpointError):  # a damaged or refused file: its own line (fallback skips it)
            raise error
        if error is not None:
            why = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise fmt.CheckpointError(f"{folder}: cannot re-partition it for data-parallel size {layout.dp} "
                                      f"({why})") from None
        e = fmt.CheckpointError(f"{folder}: cannot re-partition it (rank 0 says why)")
        e.silent = True
        raise e
    config = engine._config
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the hyperparameters of the first (weight
    # decay on norms too): the recipe's own per-group values go back, as for a same-size resume.
    own = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in inner.param_groups]
    config.load_universal_checkpoint = True
    try:
        load_path, _ = engine.load_checkpoint(str(parent), tag=folder.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    finally:
        config.load_universal_checkpoint = False
    for group, values in zip(inner.param_groups, own):
        group.update(values)
    # ... and hands one step tensor to every partition's state: torch's Adam increments each state's step in place,
    # so a shared one would count once per partition and step.
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return load_path, str(parent)


def cleanup(parent: str, layout) -> None:
    """Remove the universal folder (and its marker) once every rank has loaded it."""
    parallel.barrier()
    if layout.rank == 0:
        shutil.rmtree(parent, ignore_errors=True)
        for marker in Path(parent).parent.glob(Path(parent).name + ".*.done"):
            marker.unlink(missing_ok=True)
