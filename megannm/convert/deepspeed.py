"""megannm's DeepSpeed checkpoints <-> the consolidated form, and ``load_model`` for generate / evaluate / demo.

``open_checkpoint`` and ``rank_state`` (one tensor rank's weights under canonical names) are the readers that
``megannm.train.load`` also uses to load a checkpoint module-only into a live engine. File names are
``megannm.checkpoint``'s.

Reading streams: every file is memory-mapped (``torchzip.load``, as ``torch.load(mmap=True)``) and read once, each
canonical tensor is joined from its TP ranks' slices when a writer asks for it (written from where they lie, never
joined in memory), and the module's names become canonical ones through the fused-projection adapter
(``megannm.model.fused``: ``qkv_proj`` -> q/k/v, ``gate_up_proj`` -> gate/up) wherever a rank's module-named
weights are read. Which weights (``choose_weights``, ``--weights``):

- ``module``: the module files (``mp_rank_XX_model_states.pt``; under a pipeline the layer files
  ``layer_{c:02d}-model_{tp:02d}-model_states.pt``, names inside the stage, mapped by
  ``megannm.model.pipeline.pipeline_to_canonical``). Under fp32 ZeRO 0-2 these are the trained fp32 weights
  themselves; under bf16 they are the 16-bit copy the engine computes with (the fp32 master rounded to bf16, so a
  bf16 export from them is exact). The optimizer partitions are never opened.
- ``master``: the fp32 master weights in the optimizer partitions (``zero.py``: ZeRO-1/2 and BF16_Optimizer
  fragments, ZeRO-3 flat groups), memory-mapped so that only the master's bytes are read, never the Adam moments.
  Needed under ZeRO-3 (the module files hold placeholders) and for fp32 weights of a bf16/fp16 run.
- ``auto`` (default): ``master`` only where ``module`` cannot give the requested dtype exactly.

Writing (``write_deepspeed``): a DeepSpeed checkpoint dir (``latest`` + ``step<N>/``) at any TP x PP holding the
module weights only, under the names the model uses (fused where it fuses), in DeepSpeed's own file layout
(``mp_rank_XX_model_states.pt``; under a pipeline the layer files plus one ``mp_rank_XX`` file per stage and TP rank
with ``module: None``), any data-parallel size; each file is written in torch's format by ``torchzip.write``, one
tensor at a time from where it lies in the input (``_write_rank``), its crc32 computed behind the writes. Its
``megannm.json`` marks it ``module_only``: ``init_from`` (``megannm.train.load``) loads the weights at any ZeRO stage
with a fresh optimizer and schedule; ``--resume`` also continues the step count, the data position and the
learning-rate schedule from the source's step, with fresh Adam moments (the optimizer state does not survive the
consolidated form).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, Optional

import torch

from megannm import checkpoint
from megannm.checkpoint import integrity, layer_file, module_state_file
from megannm.convert import filebytes, reshard, torchzip, zero
from megannm.convert.consolidated import Consolidated, Opened, normalise_args
from megannm.convert.files import THREADS, ConvertError, LazyState, Prefetch, specs_of, verify
from megannm.fileio import atomic_output
from megannm.vocab import Vocab

WEIGHTS = ("auto", "module", "master")  # --weights
_PRECISION = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _records(folder: Path) -> dict:
    """The size and crc32 records of a tag's files (``megannm.json``), {} when it has none."""
    try:
        return (json.loads((folder / checkpoint.META).read_text()).get("files") or {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


_VERIFIER: Optional[ThreadPoolExecutor] = None


def _check_file(path: Path, records: dict, mapped: Optional[filebytes.MappedFile] = None) -> None:
    """One file against its record in megannm.json (the messages of ``integrity.check``); its crc32 over the mapping
    the conversion reads too (``mapped``, else a new one): the pages pass through the page cache once, and a checker
    thread allocates nothing."""
    from megannm.checkpoint.folders import CorruptCheckpoint
    want = records[path.name]
    size = path.stat().st_size
    if size != want["bytes"]:
        raise CorruptCheckpoint(f"{path}: truncated or changed ({size} bytes, {checkpoint.META} recorded "
                                f"{want['bytes']})")
    got = filebytes.crc32((mapped or filebytes.MappedFile(path)).bytes)
    if got != want["crc32"]:
        raise CorruptCheckpoint(f"{path}: corrupt (crc32 {got:08x}, {checkpoint.META} recorded {want['crc32']:08x})")


def _torch_load(path: Path, checks: Optional[list] = None, keep: Optional[list] = None):
    """A DeepSpeed file, checked against its crc32 record (a flipped or truncated file is named, never used
    silently), memory-mapped (``torchzip.load``: one mapping per file, whose tensors writers copy file to file):
    its tensors are read from the page cache as they are used, not copied up front, and those never used (the Adam
    moments beside the fp32 master) are never read at all. ``keep`` (a list) receives the file's mapping, for a
    state that should stay traceable to it (see ``filebytes.MappedFile``).

    With ``checks`` (a conversion that renames its output into place only after ``LazyState.verify``), the crc32
    runs in a background thread while the conversion reads the same pages, and its future is appended there;
    without, it runs first."""
    global _VERIFIER
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path}: missing file")
    records = _records(path.parent)
    mapped: list = []
    try:
        try:
            obj = torchzip.load(path, mapped)
        except torchzip.NotTorchZip:  # a legacy or compressed torch file: torch's own reader
            obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # truncated or not a torch file
        if path.name in records:  # a damaged file is named as such, not as unreadable
            _check_file(path, records)
        raise ConvertError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if path.name in records:
        if checks is None:
            _check_file(path, records, *mapped)
        else:
            if _VERIFIER is None:  # one thread keeps up with the copies at libdeflate's speed, and leaves the
                # conversion its core; zlib's crc32 needs more
                _VERIFIER = ThreadPoolExecutor(1 if filebytes.FAST_CRC32 else THREADS,
                                               thread_name_prefix="megannm-verify")
            checks.append(_VERIFIER.submit(_check_file, path, records, *mapped))
    if keep is not None:
        keep.extend(mapped)
    return obj


def read_module_state(ckpt: Path, tp_rank: int, checks: Optional[list] = None, keep: Optional[list] = None) -> dict:
    """One model-parallel rank's module weights as the module names them (memory-mapped, checked against its crc32
    record; nothing else is opened). ``checks``, ``keep``: see ``_torch_load``."""
    path = module_state_file(ckpt, tp_rank)
    if not path.exists():
        raise ConvertError(f"{ckpt}: no module weights for tensor rank {tp_rank} ({path.name} missing)")
    state = _torch_load(path, checks, keep)
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise ConvertError(f"{path}: no module weights in it (key 'module')")
    return state["module"]


# ---------------------------------------------------------------------------------------------------------------------
# reading: which weights


def _optimizer_files(ckpt: Path, tp_rank: int) -> list[Path]:
    """One tensor rank's optimizer partitions (ZeRO or BF16_Optimizer), in data-parallel rank order."""
    files = [p for p in ckpt.glob(f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt")]
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
        raise ConvertError(f"--weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    layout = meta.get("layout") or {}
    pp, zero_stage = int(layout.get("pp") or 1), meta.get("zero_stage")
    precision = (meta.get("recipe") or {}).get("precision", "fp32")
    has_master = not meta.get("module_only") and bool(_optimizer_files(ckpt, 0))
    if pp > 1:
        if weights == "master":
            raise ConvertError(f"{ckpt}: --weights master is not read from pipeline checkpoints (their layer files "
                               f"hold the module weights); use --weights module")
        return "module"
    if zero_stage == 3 and not meta.get("module_only"):
        if weights == "module":
            raise ConvertError(f"{ckpt}: ZeRO-3 module files hold placeholders, the weights are in the optimizer "
                               f"partitions (--weights master, the default)")
        return "master"
    if weights == "master" and not has_master:
        raise ConvertError(f"{ckpt}: no optimizer partitions (*_optim_states.pt) to read master weights from (use "
                           f"--weights module)")
    if weights != "auto":
        return weights
    exact = precision == "fp32" or dtype == _PRECISION.get(precision)
    return "master" if has_master and not exact else "module"


def describe_weights(ckpt: Path, meta: dict, choice: str) -> str:
    """What ``choice`` reads and what it costs, for the one log line of a conversion."""
    layout = meta.get("layout") or {}
    tp, pp = int(layout.get("tp") or 1), int(layout.get("pp") or 1)
    precision = (meta.get("recipe") or {}).get("precision", "fp32")
    optim = sum(p.stat().st_size for r in range(tp) for p in _optimizer_files(ckpt, r)) if pp == 1 else 0
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
# reading: one tensor rank


def _module_rank_state(ckpt: Path, tp_rank: int, args, tp: int, checks: Optional[list],
                       keep: Optional[list]) -> tuple[dict, str]:
    from megannm.model import fused
    path = module_state_file(ckpt, tp_rank)
    state = {k: v for k, v in read_module_state(ckpt, tp_rank, checks, keep).items()
             if not k.endswith("._extra_state")}
    try:
        return fused.to_canonical(state, args, tp), str(path)
    except ValueError as e:
        raise ConvertError(f"{path}: {e}") from None


def _pipeline_rank_state(ckpt: Path, tp_rank: int, args, tp: int, checks: Optional[list],
                         keep: Optional[list]) -> tuple[dict, str]:
    """One TP rank's canonical-named state from the pipeline's per-layer files (``layer_{c:02d}-model_{tp:02d}-
    model_states.pt`` holds chain position c's weights under the names inside that stage)."""
    from megannm.model import fused
    from megannm.model.pipeline import pipeline_to_canonical
    pattern = checkpoint.layer_pattern(tp_rank)
    files = sorted(ckpt.glob(pattern))
    if not files:
        raise ConvertError(f"{ckpt}: no {pattern} files (the pipeline weights of tensor rank {tp_rank})")
    out = {}
    for f in files:
        position = checkpoint.layer_position(f)
        state = _torch_load(f, checks, keep)
        if not isinstance(state, dict):
            raise ConvertError(f"{f}: not a layer state dict")
        named = {}
        for name, t in state.items():
            if name.endswith("._extra_state"):
                continue
            try:
                named[pipeline_to_canonical(name, position)] = t
            except ValueError as e:
                raise ConvertError(f"{f}: unexpected parameter {name} ({e})") from None
        try:
            named = fused.to_canonical(named, args, tp)
        except ValueError as e:
            raise ConvertError(f"{f}: {e}") from None
        for canonical, t in named.items():
            if canonical in out:
                raise ConvertError(f"{f}: parameter {canonical} also came from another layer file")
            out[canonical] = t
    return out, str(ckpt / pattern)


def _master_rank_state(ckpt: Path, tp_rank: int, args, tp: int,
                       checks: Optional[list]) -> tuple[zero.MasterWeights, str]:
    files = _optimizer_files(ckpt, tp_rank)
    if not files:
        raise ConvertError(f"{ckpt}: no *_mp_rank_{tp_rank:02d}_optim_states.pt (the fp32 weights of tensor rank "
                           f"{tp_rank} live in the optimizer partitions)")
    source = str(ckpt / f"*zero_pp_rank_*_mp_rank_{tp_rank:02d}_optim_states.pt")
    zero3 = not files[0].name.startswith("bf16_") and (ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt"
                                                        ).exists()
    model_file = ckpt / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt" if zero3 \
        else module_state_file(ckpt, tp_rank)
    shapes: dict = {}
    load = lambda f: _torch_load(f, checks)  # noqa: E731
    for group in load(model_file).get("param_shapes") or []:
        shapes.update({k: tuple(v) for k, v in group.items()})
    if not shapes:
        raise ConvertError(f"{model_file}: no param_shapes (the parameter layout of the optimizer partitions)")
    pieces = zero.zero3_partitions(files, load, shapes) if zero3 else zero.sliced_partitions(files, load)
    return zero.MasterWeights(pieces, shapes, args, tp, source), source


def rank_state(ckpt: Path, meta: dict, tp_rank: int, weights: str = "auto", dtype: torch.dtype = torch.float32,
               checks: Optional[list] = None, keep: Optional[list] = None) -> tuple[Mapping, str, str]:
    """One tensor-parallel rank's weights (all pipeline stages) under canonical names, TP-sliced and padded as saved:
    (state, source files, how they were read). The state is lazy: memory-mapped module tensors, or master weights
    copied out of the optimizer partitions one tensor at a time as they are asked for. ``weights`` and ``dtype``:
    see ``choose_weights`` (the default gives exact fp32 weights, reading the master where it must); ``checks``: see
    ``_torch_load`` (default: every file is checked before it is used); ``keep``: see ``_torch_load``."""
    from megannm.model.args import ModelArgs
    args = ModelArgs.from_dict(meta["model_args"])
    layout = meta.get("layout") or {}
    tp, pp = int(layout.get("tp") or 1), int(layout.get("pp") or 1)
    choice = choose_weights(ckpt, meta, weights, dtype)
    if pp > 1:
        state, source = _pipeline_rank_state(ckpt, tp_rank, args, tp, checks, keep)
    elif choice == "master":
        state, source = _master_rank_state(ckpt, tp_rank, args, tp, checks)
    else:
        state, source = _module_rank_state(ckpt, tp_rank, args, tp, checks, keep)
    # megatron-core layers may add `_extra_state` entries (for Transformer Engine): not weights
    if not isinstance(state, LazyState):
        state = {k: v for k, v in state.items() if not k.endswith("._extra_state")}
    return state, source, describe_weights(ckpt, meta, choice)


def open_checkpoint(path: str | Path) -> tuple[Path, dict, Vocab, object]:
    """(checkpoint folder, its ``megannm.json``, Vocab, ModelArgs as saved) of a folder or a dir with ``latest``.

    Every recorded file's size is checked now (a truncated file is named before any work); each file's crc32 when
    a reader opens it, so the files a conversion does not need (the optimizer partitions, mostly) are never read."""
    from megannm.checkpoint.folders import CorruptCheckpoint
    from megannm.model.args import ModelArgs
    ckpt = checkpoint.resolve(path)
    meta = checkpoint.read_meta(ckpt)
    for name, want in sorted((meta.get("files") or {}).items()):
        try:
            size = (ckpt / name).stat().st_size
        except FileNotFoundError:
            raise CorruptCheckpoint(f"{ckpt / name}: missing (listed in {ckpt / checkpoint.META})") from None
        if size != want.get("bytes"):
            raise CorruptCheckpoint(f"{ckpt / name}: truncated or changed ({size} bytes, {checkpoint.META} recorded "
                                    f"{want.get('bytes')})")
    where = str(ckpt / checkpoint.META)
    try:
        vocab = Vocab.from_dict(meta["vocab"], source=where)
        args = ModelArgs.from_dict(meta["model_args"])
    except KeyError as e:
        raise ConvertError(f"{where}: required key {e.args[0]} is missing") from None
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{where}: {e}") from None
    return ckpt, meta, vocab, args


def read_deepspeed(path: str | Path, weights: str = "auto", dtype: torch.dtype = torch.float32,
                   threads: int = THREADS) -> Consolidated:
    """A megannm DeepSpeed checkpoint (folder, or a checkpoint dir with ``latest``) at any layout -> canonical form,
    lazily: the ranks' files are opened (memory-mapped, checked against their records, in parallel) now, and each
    canonical tensor is joined from its TP slices and cast to ``dtype`` when it is asked for. The files' crc32
    checks run meanwhile: call ``state.verify()`` before trusting (or publishing) what was read; the writers here
    do."""
    ckpt, meta, vocab, args = open_checkpoint(path)
    layout = meta.get("layout") or {}
    tp = int(layout.get("tp") or 1)
    checks: list = []  # the files' crc32, running while the conversion reads them (see LazyState.verify)
    keep: list = []  # the files' mappings: writers copy the tensors straight from them (filebytes.extent)

    def open_rank(r: int):
        return rank_state(ckpt, meta, r, weights, dtype, checks, keep)

    if tp == 1 or threads <= 1:  # (starting a thread costs more than opening one file: ~5 ms on a loaded core)
        ranks = [open_rank(r) for r in range(tp)]
    else:
        with ThreadPoolExecutor(min(threads, tp)) as pool:
            ranks = list(pool.map(open_rank, range(tp)))
    state = reshard.merge_states([s for s, _, _ in ranks], args, [src for _, src, _ in ranks], dtype)
    state.checks.extend(checks)
    state.keep.extend(keep)
    source = {"kind": "deepspeed", "path": str(ckpt.resolve()), "layout": layout, "zero_stage": meta.get("zero_stage"),
              "precision": (meta.get("recipe") or {}).get("precision", "fp32"), "weights": ranks[0][2],
              "dtype": str(dtype).replace("torch.", ""),
              "step": meta.get("step"), "consumed_samples": meta.get("consumed_samples")}
    return Consolidated(state, normalise_args(args, vocab), vocab, source, meta.get("recipe"))


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _module_file(module: dict, tp: int, dp: int, step: int, consumed: int) -> dict:
    """What DeepSpeed's ``save_checkpoint`` puts in ``mp_rank_XX_model_states.pt``, module weights only."""
    import deepspeed
    return {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
            "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
            "global_steps": step, "global_samples": consumed, "dp_world_size": dp, "mp_world_size": tp,
            "ds_version": deepspeed.__version__, "step": step, "consumed_samples": consumed}


def _rank_groups(names: list[str], fuse: bool) -> list[tuple[str, list[str]]]:
    """The module names of one file in order, each with the canonical names it is made of (itself, or a fused
    weight's parts in stacking order)."""
    from megannm.model import fused
    out, seen = [], set()
    for name in names:
        module = fused.module_name(name) if fuse else name
        if module not in seen:
            seen.add(module)
            out.append((module, fused.canonical_parts(module) if module != name else [name]))
    return out


def _rank_slice(name: str, full: torch.Tensor, tp: int, rank: int, padded: int) -> list[torch.Tensor]:
    """TP rank ``rank``'s slice of a canonical tensor as blocks of rows that, one after the other, make it: views of
    ``full`` (a dim-0 slice is a contiguous row range of it, a dim-1 slice its rows' column ranges), plus zero rows
    where the vocabulary is padded. Nothing is joined in memory: the writer takes each view from where it lies."""
    if name not in reshard.VOCAB_PARAMS:
        return [reshard.shard_tensor(name, full, tp, rank, padded)]
    per, real = padded // tp, full.shape[0]
    rows = full[min(rank * per, real):min((rank + 1) * per, real)]
    pad = per - rows.shape[0]
    return [rows] + ([full.new_zeros(pad, *full.shape[1:])] if pad else [])


def _write_rank(c: Consolidated, path: Path, names: list[str], tp: int, rank: int, padded: int,
                dtype: Optional[torch.dtype], fuse: bool, threads: int, wrap) -> dict:
    """One rank's file of a module-only checkpoint, in torch's format written by ``torchzip.write`` (one record per
    module tensor, as ``torch.save`` of a state dict has): its slice of every canonical name in ``names``, a fused
    weight's parts stacked in its record, each part taken from where it lies in the consolidated input
    (a kernel copy of a contiguous range, a dim-1 slice's rows through a staging buffer) and cast only when ``dtype``
    asks for it (``threads`` tensors prepared ahead). ``wrap(module-named dict)`` is the object the file holds.
    Returns the file's megannm.json record (size and crc32, computed behind the writes)."""
    specs = specs_of(c.state)
    local = reshard.local_shapes(c.args, tp, padded)
    planned: OrderedDict = OrderedDict()
    parts_of: dict[str, tuple[str, list[str]]] = {}
    for i, (module, parts) in enumerate(_rank_groups(names, fuse)):
        dt = specs[parts[0]][1]
        dt = dtype if dtype is not None and dt.is_floating_point else dt
        planned[module] = torchzip.Planned((sum(local[p][0] for p in parts), *local[parts[0]][1:]), dt, str(i))
        parts_of[str(i)] = (module, parts)

    def produce(key: str) -> list[torch.Tensor]:
        module, parts = parts_of[key]
        want = planned[module].dtype
        return [b if b.dtype == want else b.to(want)
                for name in parts for b in _rank_slice(name, c.state[name], tp, rank, padded)]

    with torch.no_grad(), Prefetch(produce, list(parts_of), threads) as ready:
        crc = torchzip.write(path, wrap(planned), lambda p: ready(p.key))
    return {"bytes": path.stat().st_size, "crc32": crc}


def _write_ranks(c: Consolidated, files: list, tp: int, padded: int, dtype: Optional[torch.dtype], fuse: bool,
                 threads: int) -> dict[str, dict]:
    """Every rank file of ``files`` ((path, names, rank, wrap) each: see ``_write_rank``), up to ``threads`` files
    at once: each file's writes are serialised by its own inode lock, so files in parallel use the cores that one
    file's copy leaves idle. Returns file name -> megannm.json record."""
    parallel = max(1, min(threads, len(files)))
    per_file = max(1, threads // parallel)

    def one(job) -> dict:
        path, names, rank, wrap = job
        return _write_rank(c, path, names, tp, rank, padded, dtype, fuse, per_file, wrap)

    if parallel == 1:
        return {job[0].name: one(job) for job in files}
    with ThreadPoolExecutor(parallel, thread_name_prefix="megannm-rank-file") as pool:
        return {job[0].name: rec for job, rec in zip(files, pool.map(one, files))}


def write_deepspeed(c: Consolidated, dst: str | Path, tp: int = 1, pp: int = 1, overwrite: bool = False,
                    dtype: Optional[torch.dtype] = None, threads: int = THREADS,
                    fuse: bool = True) -> Path:
    """A module-only DeepSpeed checkpoint dir (``latest`` + ``step<N>/``) at TP x PP from the canonical form, one
    tensor at a time. ``dtype`` casts the weights (default: as they come); ``fuse`` writes fused q/k/v and gate/up
    names, the names the model's modules (and DeepSpeed's own ``load_checkpoint``) expect; ``fuse=False`` writes
    the separate canonical names (checkpoints saved before the fusion)."""
    padded = c.vocab.padded_size(tp)
    reshard.check_divisible(c.args, tp, pp, padded, where=f"{dst}")
    specs = specs_of(c.state)
    reshard.check_shape_map({k: s for k, (s, _) in specs.items()}, reshard.canonical_shapes(c.args),
                            "consolidated state")
    args = normalise_args(c.args, c.vocab, tp)
    step, consumed = c.step, c.consumed_samples
    tag = checkpoint.tag_for(step)
    dst = Path(dst)
    names = list(reshard.canonical_shapes(c.args))
    with atomic_output(dst, overwrite) as tmp:
        folder = tmp / tag
        folder.mkdir()
        files = []  # (path, canonical names, tp rank, what the file holds): one _write_rank each
        if pp > 1:
            from megannm.model.pipeline import canonical_to_pipeline
            positions: dict[int, list[str]] = {}
            for name in names:
                positions.setdefault(canonical_to_pipeline(name, args.layers)[0], []).append(name)
            inner = lambda sd: OrderedDict(  # noqa: E731 (names inside the stage)
                (canonical_to_pipeline(k, args.layers)[1], v) for k, v in sd.items())
            files = [(layer_file(folder, position, r), group, r, inner)
                     for r in range(tp) for position, group in sorted(positions.items())]
            for mp_rank in range(tp * pp):
                torch.save(_module_file(None, tp * pp, 1, step, consumed), module_state_file(folder, mp_rank))
        else:
            files = [(module_state_file(folder, r), names, r, lambda sd: _module_file(sd, tp, 1, step, consumed))
                     for r in range(tp)]
        records = _write_ranks(c, files, tp, padded, dtype, fuse, threads)
        records.update(integrity.record(folder, [n for n in integrity.top_files(folder) if n not in records]))
        meta = {"recipe": c.recipe, "recipe_source": None, "model_args": args.to_dict(), "vocab": c.vocab.to_dict(),
                "layout": {"world_size": None, "tp": tp, "pp": pp, "dp": None}, "zero_stage": None,
                "module_only": True, "consumed_samples": consumed, "step": step, "tag": tag,
                "converted_from": c.source, "files": dict(sorted(records.items()))}
        checkpoint.write_meta(folder, meta)
        checkpoint.write_latest(tmp, tag)
        verify(c.state)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# a model for generate / evaluate / demo


def load_model(path: str | Path, layout, vocab: Vocab | None = None):
    """Model (eval mode) + metadata from a DeepSpeed checkpoint of ANY layout, or from a consolidated folder, at
    this process's tensor-parallel size (pipeline size 1).

    A checkpoint saved at this TP size with exact fp32 module weights (ZeRO 0-2, pipeline 1) reads its own rank's
    module file; every other layout is joined tensor by tensor from the canonical form. Weights are copied into the
    model one parameter at a time (fused parameters from their canonical parts)."""
    from megannm.model import fused
    from megannm.model.transformer import NMMModel
    path, c = Path(path), None
    if layout.pp != 1:
        raise ConvertError(f"load_model: runs at pipeline size 1 (got pp={layout.pp})")
    if checkpoint.kind_of(path) == "consolidated":
        opened = Opened(path)
        meta = dict(opened.meta)
        fingerprint, where = opened.vocab.fingerprint, str(path / checkpoint.CONSOLIDATED_META)
        args = normalise_args(opened.args, opened.vocab, layout.tp)
        get = lambda name: opened.local(name, layout.tp, layout.tp_rank, args.padded_vocab_size)  # noqa: E731
    else:
        ckpt = checkpoint.resolve(path)
        meta = checkpoint.read_meta(ckpt)
        fingerprint, where = meta["vocab"]["fingerprint"], str(ckpt / checkpoint.META)
        saved = meta.get("layout", {})
        precision = (meta.get("recipe") or {}).get("precision", "fp32")
        direct = (saved.get("tp") == layout.tp and saved.get("pp", 1) == 1 and precision == "fp32"
                  and (meta.get("zero_stage") in (0, 1, 2) or meta.get("module_only")))
        if direct:
            from megannm.model.args import ModelArgs
            args = ModelArgs.from_dict(meta["model_args"])
            state, _, _ = rank_state(ckpt, meta, layout.tp_rank, weights="module")
            get = state.__getitem__
        else:
            c = read_deepspeed(ckpt)
            args = normalise_args(c.args, c.vocab, layout.tp)
            get = lambda name: reshard.shard_tensor(name, c.state[name], layout.tp, layout.tp_rank,  # noqa: E731
                                                    args.padded_vocab_size)
    if vocab is not None:
        vocab.check_same(fingerprint, "the tokenizers", where)
    reshard.check_divisible(args, layout.tp, 1, args.padded_vocab_size, where=where)
    model = NMMModel(args, layout)
    expected = reshard.local_shapes(args, layout.tp, args.padded_vocab_size)
    own = model.state_dict(keep_vars=True)
    wanted = {p for m in own for p in (fused.canonical_parts(m) or [m])}
    if wanted != set(expected):
        extra = sorted(wanted - set(expected)) or sorted(set(expected) - wanted)
        raise ConvertError(f"{where}: the model's parameters and the checkpoint's differ ({extra[0]})")
    with torch.no_grad():
        for module, target in own.items():
            pieces = []
            for name in fused.canonical_parts(module) or [module]:
                try:
                    t = get(name)
                except KeyError:
                    raise ConvertError(f"{where}: missing parameter {name}") from None
                if tuple(t.shape) != tuple(expected[name]):
                    raise ConvertError(f"{where}: parameter {name} has shape {list(t.shape)}, expected "
                                       f"{list(expected[name])}")
                pieces.append(t)
            target.copy_(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
    if c is not None:
        verify(c.state)
    model.eval()
    return model, meta
