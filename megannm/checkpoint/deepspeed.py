"""Reading megannm's DeepSpeed checkpoints of any TP x PP x ZeRO layout under canonical names, offline (no engine).

``open_deepspeed`` and ``rank_state`` (one tensor rank's weights under canonical names) are what
``megannm.train.load`` loads module-only into a live engine and ``megannm.checkpoint.opened`` into a model for
sampling; ``read_deepspeed`` joins the ranks into the consolidated form that conversions write. File names are
``megannm.checkpoint.names``'. Every file is read with ``torch.load(mmap=True, weights_only=True)`` after its crc32 is
checked against ``megannm.json`` (``tensors.load_torch``); the module's names are the canonical ones. Which
weights (``choose_weights``, ``--weights``):

- ``module``: the module files (``mp_rank_XX_model_states.pt``; under a pipeline the layer files
  ``layer_{c:02d}-model_{tp:02d}-model_states.pt``, names inside the stage, mapped by
  ``megannm.model.pipeline.pipeline_to_canonical``). Under fp32 ZeRO 0-2 these are the trained fp32 weights
  themselves; under bf16 they are the 16-bit copy the engine computes with (the fp32 master rounded to bf16, so a
  bf16 export from them is exact). The optimizer partitions are never opened.
- ``master``: the fp32 master weights in the optimizer partitions, memory-mapped so that only the master's bytes are
  used, never the Adam moments. Needed under ZeRO-3 (the module files hold placeholders) and for fp32 weights of a
  bf16/fp16 run. The layouts (DeepSpeed 0.19, those ``deepspeed.utils.zero_to_fp32`` reads, plus BF16_Optimizer's):
  ZeRO-1/2 and BF16_Optimizer files hold, per parameter group, a flat fp32 partition
  (``single_partition_of_fp32_groups``) and where each parameter's fragment lies in it (``param_slice_mappings``);
  a parameter's fragments joined in data-parallel rank order are the parameter. Under ZeRO-3 each rank holds
  ``ceil(numel / world)`` values of EVERY parameter, in ``param_shapes`` order, in its ``fp32_flat_groups``.
- ``auto`` (default): ``master`` only where ``module`` cannot give the requested dtype exactly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch

from megannm.checkpoint import canonical
from megannm.checkpoint.consolidated import Consolidated, normalise_args
from megannm.checkpoint.folders import CheckpointError, CorruptCheckpoint, read_meta, resolve
from megannm.checkpoint.names import META, layer_pattern, layer_position, module_state_file
from megannm.checkpoint.tensors import LazyState, load_torch, records_of
from megannm.vocab import Vocab

WEIGHTS = ("auto", "module", "master")  # --weights
_PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def open_deepspeed(path: str | Path) -> tuple[Path, dict, Vocab, object]:
    """(checkpoint folder, its ``megannm.json``, Vocab, ModelArgs as saved) of a folder or a dir with ``latest``.

    Every recorded file's size is checked now (a truncated file is named before any work); each file's crc32 when
    a reader opens it, so the files a conversion does not need (the optimizer partitions, mostly) are never read."""
    from megannm.model.args import ModelArgs
    ckpt = resolve(path)
    meta = read_meta(ckpt)
    for name, want in sorted((meta.get("files") or {}).items()):
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{ckpt / name}: missing (listed in {ckpt / META})") from None
        if size != want.get("bytes"):
            raise CorruptCheckpoint(f"{ckpt / name}: truncated or changed ({size} bytes, {META} recorded "
                                    f"{want.get('bytes')})")
    where = str(ckpt / META)
    try:
        vocab = Vocab.from_dict(meta["vocab"], source=where)
        args = ModelArgs.from_dict(meta["model_args"])
    except KeyError as e:
        raise CheckpointError(f"{where}: required key {e.args[0]} is missing") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    return ckpt, meta, vocab, args


def _load(path: Path):
    return load_torch(path, records_of(Path(path).parent))


def read_module_state(ckpt: Path, tp_rank: int) -> dict:
    """One model-parallel rank's module weights as the module names them (memory-mapped, checked against its crc32
    record; nothing else is opened)."""
    path = module_state_file(ckpt, tp_rank)
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no module weights for tensor rank {tp_rank} ({path.name} missing)")
    state = _load(path)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{path}: no module weights in it (key 'module')")
    return state["module"]


def _canonical(state: Mapping, args, tp: int, where) -> dict:
    """One rank's module weights under their canonical names (the module's own; ``_extra_state`` entries of files
    written by earlier megatron-core layers dropped)."""
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


# ---------------------------------------------------------------------------------------------------------------------
# which weights


def optimizer_files(ckpt: Path, tp_rank: int) -> list[Path]:
    """One tensor rank's optimizer partitions (ZeRO or BF16_Optimizer), in data-parallel rank order."""
    files = list(ckpt.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt"))
    return sorted(files, key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def choose_weights(ckpt: Path, meta: dict, weights: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """``module`` (the module files: what the engine computes with) or ``master`` (the fp32 master weights in the
    optimizer partitions), for ``--weights`` and the output ``dtype``; one line naming the checkpoint when the
    choice cannot be read from it.

    ``auto`` reads the optimizer partitions only when the module files cannot give ``dtype`` exactly: under ZeRO-3
    (placeholders), and under bf16/fp16 ZeRO-1/2 when ``dtype`` is not the run's precision (the module's 16-bit
    copy is the master rounded to it, so ``--dtype bf16`` of a bf16 run is exact from the module files)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    layout = meta.get("layout") or {}
    pp, zero_stage = int(layout.get("pp") or 1), meta.get("zero_stage")
    precision = (meta.get("recipe") or {}).get("precision", "fp32")
    has_master = not meta.get("module_only") and bool(optimizer_files(ckpt, 0))
    if pp > 1:
        if weights == "master":
            raise CheckpointError(f"{ckpt}: --weights master is not read from pipeline checkpoints (their layer "
                                  f"files hold the module weights); use --weights module")
        return "module"
    if zero_stage == 3 and not meta.get("module_only"):
        if weights == "module":
            raise CheckpointError(f"{ckpt}: ZeRO-3 module files hold placeholders, the weights are in the optimizer "
                                  f"partitions (--weights master, the default)")
        return "master"
    if weights == "master" and not has_master:
        raise CheckpointError(f"{ckpt}: no optimizer partitions (*_optim_states.pt) to read master weights from "
                              f"(use --weights module)")
    if weights != "auto":
        return weights
    exact = precision == "fp32" or dtype == _PRECISION.get(precision)
    return "master" if has_master and not exact else "module"


def describe_weights(ckpt: Path, meta: dict, choice: str) -> str:
    """What ``choice`` reads and what it costs, for the one log line of a conversion."""
    layout = meta.get("layout") or {}
    tp, pp = int(layout.get("tp") or 1), int(layout.get("pp") or 1)
    precision = (meta.get("recipe") or {}).get("precision", "fp32")
    optim = sum(p.stat().st_size for r in range(tp) for p in optimizer_files(ckpt, r)) if pp == 1 else 0
    if choice == "master":
        return (f"fp32 master from the optimizer partitions ({_gb(optim)} of *_optim_states.pt, memory-mapped: the "
                f"master's bytes are used, the Adam moments only pass through the files' crc32 check)")
    where = "pipeline layer files" if pp > 1 else "module files"
    note = f"{precision} module weights" if precision != "fp32" else "module weights (the fp32 weights themselves)"
    if pp > 1 and precision != "fp32":
        note += " (a pipeline's fp32 master is not read: upcast, its extra bits are lost)"
    skip = f"; optimizer partitions not opened ({_gb(optim)}: --weights master reads the fp32 master)" if optim \
        else ""
    return f"{note} of the {where}{skip}"


# ---------------------------------------------------------------------------------------------------------------------
# one tensor rank


def _pipeline_rank_state(ckpt: Path, tp_rank: int, args, tp: int) -> tuple[dict, str]:
    """One TP rank's canonical-named state from the pipeline's per-layer files (``layer_{c:02d}-model_{tp:02d}-
    model_states.pt`` holds chain position c's weights under the names inside that stage)."""
    from megannm.model.pipeline import pipeline_to_canonical
    pattern = layer_pattern(tp_rank)
    files = sorted(ckpt.glob(pattern))
    if not files:
        raise CheckpointError(f"{ckpt}: no {pattern} files (the pipeline weights of tensor rank {tp_rank})")
    out = {}
    for f in files:
        position = layer_position(f)
        state = _load(f)
        if not isinstance(state, dict):
            raise CheckpointError(f"{f}: not a layer state dict")
        named = {}
        for name, t in state.items():
            try:
                named[name if name.endswith("._extra_state") else pipeline_to_canonical(name, position)] = t
            except ValueError as e:
                raise CheckpointError(f"{f}: unexpected parameter {name} ({e})") from None
        for name, t in _canonical(named, args, tp, f).items():
            if name in out:
                raise CheckpointError(f"{f}: parameter {name} also came from another layer file")
            out[name] = t
    return out, str(ckpt / pattern)


def _span(flats: list[torch.Tensor], start: int, n: int) -> list[torch.Tensor]:
    """Views of the elements [start, start + n) of the concatenation of the 1-D tensors ``flats`` (nothing read)."""
    out, pos, stop = [], 0, start + n
    for f in flats:
        lo, hi = max(start, pos), min(stop, pos + f.numel())
        if lo < hi:
            out.append(f.narrow(0, lo - pos, hi - lo))
        pos += f.numel()
        if pos >= stop:
            break
    return out


def _sliced_partitions(files: list[Path]) -> dict[str, list[torch.Tensor]]:
    """ZeRO-1/2 or BF16_Optimizer partitions (data-parallel rank order) -> module name -> its fragments in order."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        opt = _load(f).get("optimizer_state_dict") or {}
        if "single_partition_of_fp32_groups" not in opt or "param_slice_mappings" not in opt:
            raise CheckpointError(f"{f}: not a ZeRO-1/2 or BF16_Optimizer partition (no "
                                  f"single_partition_of_fp32_groups or param_slice_mappings)")
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    return pieces


def _zero3_partitions(files: list[Path], shapes: dict[str, tuple[int, ...]]) -> dict[str, list[torch.Tensor]]:
    """ZeRO-3 partitions (data-parallel rank order) and the parameters' shapes in ``param_shapes`` order -> module
    name -> its pieces in order (the last rank's may end in padding)."""
    world, flats = len(files), []
    for f in files:
        opt = _load(f).get("optimizer_state_dict") or {}
        if opt.get("zero_stage") != 3 or "fp32_flat_groups" not in opt:
            raise CheckpointError(f"{f}: not a ZeRO-3 partition (zero_stage {opt.get('zero_stage')!r}, expected 3 "
                                  f"with fp32_flat_groups)")
        count = opt.get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count != world:
            raise CheckpointError(f"{f}: partitioned over {count} data-parallel ranks, {world} partition files found")
        flats.append(list(opt["fp32_flat_groups"]))
    pieces, offset = {}, 0
    for name, shape in shapes.items():
        per = math.ceil(math.prod(shape) / world)
        pieces[name] = [v for rank in flats for v in _span(rank, offset, per)]
        offset += per
    held = sum(t.numel() for t in flats[0])
    if offset != held:
        raise CheckpointError(f"{files[0]}: holds {held} values per rank, the parameters need {offset} "
                              f"(param_shapes of another checkpoint?)")
    return pieces


def _master_rank_state(ckpt: Path, tp_rank: int, args, tp: int) -> tuple[LazyState, str]:
    """One tensor rank's fp32 master under canonical names: each tensor copied out of the memory-mapped partitions
    when it is asked for."""
    files = optimizer_files(ckpt, tp_rank)
    if not files:
        raise CheckpointError(f"{ckpt}: no *_mp_rank_{tp_rank:02d}_optim_states.pt (the fp32 weights of tensor rank "
                              f"{tp_rank} live in the optimizer partitions)")
    source = str(ckpt / f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt")
    zero3_file = ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
    zero3 = not files[0].name.startswith("bf16_") and zero3_file.exists()
    model_file = zero3_file if zero3 else module_state_file(ckpt, tp_rank)
    shapes: dict = {}
    for group in _load(model_file).get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    if not shapes:
        raise CheckpointError(f"{model_file}: no param_shapes (the parameter layout of the optimizer partitions)")
    pieces = _zero3_partitions(files, shapes) if zero3 else _sliced_partitions(files)
    owner, specs = {}, {}
    for module, shape in shapes.items():
        if module not in pieces:
            raise CheckpointError(f"{source}: the optimizer partitions do not hold parameter {module}")
        held = sum(p.numel() for p in pieces[module])
        if held < math.prod(shape):
            raise CheckpointError(f"{source}: the optimizer partitions hold {held} values of {module}, expected "
                                  f"{math.prod(shape)}")
        for name, t in _canonical({module: torch.empty(shape, device="meta")}, args, tp, source).items():
            owner[name], specs[name] = module, (tuple(t.shape), torch.float32)

    def get(name: str) -> torch.Tensor:
        module = owner[name]
        views = _span(pieces[module], 0, math.prod(shapes[module]))
        whole = (torch.cat(views) if len(views) > 1 else views[0]).view(shapes[module])
        return whole

    return LazyState(specs, get), source


def rank_state(ckpt: Path, meta: dict, tp_rank: int, weights: str = "auto",
               dtype: torch.dtype = torch.float32) -> tuple[Mapping, str, str]:
    """One tensor-parallel rank's weights (all pipeline stages) under canonical names, TP-sliced and padded as saved:
    (state, source files, how they were read). Module tensors are memory-mapped; master weights are copied out of
    the optimizer partitions one tensor at a time as they are asked for. ``weights`` and ``dtype``: see
    ``choose_weights`` (the default gives exact fp32 weights, reading the master where it must)."""
    from megannm.model.args import ModelArgs
    args = ModelArgs.from_dict(meta["model_args"])
    layout = meta.get("layout") or {}
    tp, pp = int(layout.get("tp") or 1), int(layout.get("pp") or 1)
    choice = choose_weights(ckpt, meta, weights, dtype)
    if pp > 1:
        state, source = _pipeline_rank_state(ckpt, tp_rank, args, tp)
    elif choice == "master":
        state, source = _master_rank_state(ckpt, tp_rank, args, tp)
    else:
        path = module_state_file(ckpt, tp_rank)
        state, source = _canonical(read_module_state(ckpt, tp_rank), args, tp, path), str(path)
    if not isinstance(state, LazyState):
        state = {k: v for k, v in state.items() if not k.endswith("._extra_state")}
    return state, source, describe_weights(ckpt, meta, choice)


def read_deepspeed(path: str | Path, weights: str = "auto", dtype: torch.dtype = torch.float32) -> Consolidated:
    """A megannm DeepSpeed checkpoint (folder, or a checkpoint dir with ``latest``) at any layout -> canonical form,
    lazily: each rank's files are opened now (memory-mapped, checked against their records), and each canonical
    tensor is joined from its TP slices and cast to ``dtype`` when it is asked for."""
    ckpt, meta, vocab, args = open_deepspeed(path)
    layout = meta.get("layout") or {}
    ranks = [rank_state(ckpt, meta, r, weights, dtype) for r in range(int(layout.get("tp") or 1))]
    state = canonical.merge_states([s for s, _, _ in ranks], args, [src for _, src, _ in ranks], dtype)
    source = {"kind": "deepspeed", "path": str(ckpt.resolve()), "layout": layout, "zero_stage": meta.get("zero_stage"),
              "precision": (meta.get("recipe") or {}).get("precision", "fp32"), "weights": ranks[0][2],
              "dtype": str(dtype).replace("torch.", ""),
              "step": meta.get("step"), "consumed_samples": meta.get("consumed_samples")}
    return Consolidated(state, normalise_args(args, vocab), vocab, source, meta.get("recipe"))
