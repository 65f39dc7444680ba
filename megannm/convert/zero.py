"""The fp32 master weights of one tensor rank from DeepSpeed's optimizer partitions, read lazily.

Only needed when the module files do not hold them: under ZeRO-3 (the module files hold placeholders) and under
bf16/fp16 (the module files hold 16-bit copies). The partitions are memory-mapped (``torchzip.load``, as
``torch.load(mmap=True)``), and a parameter's values are copied out only when it is asked for; the Adam moments
beside them are never used (only the files' crc32 check reads them).

The layouts (DeepSpeed 0.19, the ones ``deepspeed.utils.zero_to_fp32`` reads, plus BF16_Optimizer's):

- ZeRO-1/2 and BF16_Optimizer: each data-parallel rank's file holds, per parameter group, its flat fp32 partition
  (``single_partition_of_fp32_groups``) and where each parameter's fragment lies in it (``param_slice_mappings``:
  name -> start, numel); a parameter's fragments joined in rank order are the parameter.
- ZeRO-3: each rank holds ``ceil(numel / world)`` values of EVERY parameter, in ``param_shapes`` order, in its flat
  groups (``fp32_flat_groups``); a parameter is its ranks' pieces joined in rank order, cut to ``numel``.

Names are the module's (``param_shapes``); ``MasterWeights`` maps them to canonical names through the fused-projection
adapter (``megannm.model.fused``), reading only the rows of a fused weight that a canonical name asks for.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from megannm.convert.files import ConvertError, LazyState


def _span(flats: list[torch.Tensor], start: int, n: int) -> list[torch.Tensor]:
    """Views of the elements [start, start + n) of the concatenation of the 1-D tensors ``flats`` (nothing read)."""
    out, pos, stop = [], 0, start + n
    for f in flats:
        size = f.numel()
        lo, hi = max(start, pos), min(stop, pos + size)
        if lo < hi:
            out.append(f.narrow(0, lo - pos, hi - lo))
        pos += size
        if pos >= stop:
            break
    return out


def sliced_partitions(files: list[Path], load: Callable[[Path], dict]) -> dict[str, list[torch.Tensor]]:
    """ZeRO-1/2 or BF16_Optimizer partitions (data-parallel rank order) -> module name -> its fragments in order."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for f in files:
        opt = load(f).get("optimizer_state_dict") or {}
        if "single_partition_of_fp32_groups" not in opt or "param_slice_mappings" not in opt:
            raise ConvertError(f"{f}: not a ZeRO-1/2 or BF16_Optimizer partition (no single_partition_of_fp32_groups "
                               f"or param_slice_mappings)")
        for flat, mapping in zip(opt["single_partition_of_fp32_groups"], opt["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(name, []).append(flat.narrow(0, frag.start, frag.numel))
    return pieces


def zero3_partitions(files: list[Path], load: Callable[[Path], dict],
                     shapes: dict[str, tuple[int, ...]]) -> dict[str, list[torch.Tensor]]:
    """ZeRO-3 partitions (data-parallel rank order) and the parameters' shapes in ``param_shapes`` order -> module
    name -> its pieces in order (the last rank's may end in padding)."""
    world = len(files)
    flats = []
    for f in files:
        opt = load(f).get("optimizer_state_dict") or {}
        if opt.get("zero_stage") != 3 or "fp32_flat_groups" not in opt:
            raise ConvertError(f"{f}: not a ZeRO-3 partition (zero_stage {opt.get('zero_stage')!r}, expected 3 with "
                               f"fp32_flat_groups)")
        count = opt.get("partition_count")
        count = max(count) if isinstance(count, list) else count
        if count != world:
            raise ConvertError(f"{f}: partitioned over {count} data-parallel ranks, {world} partition files found")
        flats.append(list(opt["fp32_flat_groups"]))
    pieces, offset = {}, 0
    for name, shape in shapes.items():
        per = math.ceil(math.prod(shape) / world)
        pieces[name] = [v for rank in flats for v in _span(rank, offset, per)]
        offset += per
    held = sum(t.numel() for t in flats[0])
    if offset != held:
        raise ConvertError(f"{files[0]}: holds {held} values per rank, the parameters need {offset} (param_shapes of "
                           f"another checkpoint?)")
    return pieces


class MasterWeights(LazyState):
    """One tensor rank's master weights under canonical names: each read (only its rows of a fused weight) from the
    memory-mapped partitions when asked for, as fp32."""

    def __init__(self, pieces: dict[str, list[torch.Tensor]], shapes: dict[str, tuple[int, ...]], args, tp: int,
                 source: str):
        from megannm.model import fused
        self.pieces, self.source = pieces, source
        self.where: dict[str, tuple[str, int, int]] = {}  # canonical -> (module name, first row, last row + 1)
        specs = {}
        for module, shape in shapes.items():
            if module not in pieces:
                raise ConvertError(f"{source}: the optimizer partitions do not hold parameter {module}")
            held = sum(p.numel() for p in pieces[module])
            if held < math.prod(shape):
                raise ConvertError(f"{source}: the optimizer partitions hold {held} values of {module}, expected "
                                   f"{math.prod(shape)}")
            parts = fused.canonical_parts(module) or [module]
            for part in parts:
                _, rows = fused.locate(part, args, tp) if len(parts) > 1 else (module, None)
                start, stop = rows or (0, shape[0] if shape else 1)
                self.where[part] = (module, start, stop)
                specs[part] = ((stop - start, *shape[1:]) if shape else tuple(shape), torch.float32)
            if len(parts) > 1 and self.where[parts[-1]][2] != shape[0]:
                raise ConvertError(f"{source}: parameter {module} has {shape[0]} rows, its parts "
                                   f"{', '.join(parts)} need {self.where[parts[-1]][2]} at tp={tp}")
        super().__init__(specs, self._read)

    def _read(self, name: str) -> torch.Tensor:
        module, start, stop = self.where[name]
        shape = self.specs[name][0]
        cols = math.prod(shape[1:]) if len(shape) > 1 else 1
        views = _span(self.pieces[module], start * cols, (stop - start) * cols)
        flat = torch.cat(views) if len(views) > 1 else views[0]
        return flat.view(shape)
