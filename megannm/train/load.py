"""Weights into a live engine from elsewhere (``checkpoint.init_from``): the chain between stages.

A megannm DeepSpeed checkpoint at the same tensor/pipeline layout loads module-only; a consolidated safetensors folder
(``megannm convert ... --to consolidated``) loads at any layout. Either way the optimizer and schedule start fresh,
and the weights load at any ZeRO stage. Reading the files is ``megannm.checkpoint``'s; this module copies what it
reads into the engine's parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from megannm import checkpoint as fmt
from megannm.checkpoint import canonical


def init_from(engine, args, layout, vocab, source: str | Path) -> str:
    """Load ``source`` (a consolidated folder, a DeepSpeed checkpoint folder or dir) into ``engine``; returns a note
    for the log ("initialised from ...")."""
    path = Path(source)
    if fmt.kind_of(path) == "consolidated":
        load_consolidated(engine, args, layout, vocab, path)
        return f"initialised from {path} (consolidated)"
    found = fmt.resolve(path)
    meta = fmt.read_meta(found)
    fmt.check_compatible(meta, args, vocab.fingerprint, str(found), layout=layout.to_dict())
    load_module_only(engine, found, layout)
    return f"initialised from {found}"


def load_consolidated(engine, args, layout, vocab, path: str | Path) -> None:
    """This rank's TP slice (and pipeline stage) of a consolidated folder, at whatever layout and ZeRO stage the
    engine runs; only those rows and columns are read from disk."""
    from megannm.checkpoint.consolidated import Folder
    c = Folder(path)
    where = str(c.folder / fmt.CONSOLIDATED_META)
    vocab.check_same(c.vocab.fingerprint, "the recipe's data", where)
    fmt.check_structure(c.args, args, where)
    canonical.check_divisible(c.args, layout.tp, layout.pp, args.padded_vocab_size, where=where)
    load_local(engine, args, layout, lambda name: c.local(name, layout.tp, layout.tp_rank, args.padded_vocab_size),
               where)


def load_module_only(engine, path: str | Path, layout) -> dict:
    """The weights of a DeepSpeed checkpoint saved (or written by ``megannm convert --to deepspeed``) at this run's
    TP x PP, into the engine at ANY ZeRO stage; returns its metadata. This rank reads only its own TP rank's files.

    (DeepSpeed's own ``load_checkpoint(load_module_only=True)`` cannot cross ZeRO-3: it looks for the module files
    of the engine's own stage, and under ZeRO-3 gathers with ``zero_to_fp32`` over every TP rank's files at once,
    from the ``latest`` tag rather than the requested one.)"""
    from megannm.checkpoint.deepspeed import open_deepspeed, rank_state
    ckpt, meta, _, args = open_deepspeed(path)
    saved = meta.get("layout") or {}
    if (saved.get("tp"), saved.get("pp") or 1) != (layout.tp, layout.pp):
        raise fmt.CheckpointError(f"{ckpt}: saved at tp={saved.get('tp')} pp={saved.get('pp')}, this run has "
                                  f"tp={layout.tp} pp={layout.pp} (convert it: megannm convert {ckpt} OUT --to "
                                  f"consolidated)")
    state, source, _ = rank_state(ckpt, meta, layout.tp_rank)

    def get(name):
        if name not in state:
            raise fmt.CheckpointError(f"{source}: missing parameter {name}")
        return state[name]

    load_local(engine, args, layout, get, source)
    return meta


def engine_parameters(engine, layout) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(canonical name, module name, parameter) for every parameter this rank's engine module holds: the canonical
    name is ``NMMModel``'s (the pipeline's chain positions mapped back)."""
    names = list(engine.module.named_parameters())
    if layout.pp > 1:
        from megannm.model.pipeline import pipeline_to_canonical  # "<chain position>.<name inside the stage>"
        try:
            names = [(pipeline_to_canonical(n), n, p) for n, p in names]
        except ValueError as e:
            raise fmt.CheckpointError(f"pipeline module: {e}") from None
        return names
    return [(n, n, p) for n, p in names]


@torch.no_grad()
def load_local(engine, args, layout, get_local: Callable[[str], torch.Tensor], source: str) -> int:
    """Copy this rank's slices (``get_local(canonical_name)``) into the engine's module at any ZeRO stage; returns
    the number of elements copied.

    ZeRO-3: each parameter is gathered, written on data-parallel rank 0 and re-partitioned on exit
    (``deepspeed.zero.GatheredParameters(modifier_rank=0)``). ZeRO-1/2/3 and bf16 keep an fp32 master copy in the
    optimizer: it is refreshed from the module afterwards, so the first step starts from the loaded weights."""
    import deepspeed
    params = engine_parameters(engine, layout)
    if layout.pp == 1:
        canonical.check_names((c for c, _, _ in params), canonical.canonical_shapes(args),
                              f"{source} -> the recipe's model")
    count = 0
    for name_c, name, p in params:
        t = get_local(name_c)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(t.shape) != shape:
            raise fmt.CheckpointError(f"{source}: parameter {name_c} gives shape {list(t.shape)} for tensor rank "
                                      f"{layout.tp_rank}, the engine's {name} has {list(shape)}")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            p.data.copy_(t)
        count += t.numel()
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        # The refresh copied the 16-bit module weights into the optimizer's fp32 master: give the master the
        # checkpoint's full precision instead, so a stage boundary rounds nothing (Adam's moments still start fresh:
        # a warm start, not a resume).
        from deepspeed.utils import safe_set_full_fp32_param
        for name_c, _, p in params:
            safe_set_full_fp32_param(p, get_local(name_c).float())
    return count
