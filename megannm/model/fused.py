"""Fused projections: the module's names on one tensor-parallel rank <-> the canonical names.

Each modality's q, k and v projections are ONE column-parallel linear in the module (``attn.qkv_proj.{m}``) and its
gate and up projections one more (``ffn.gate_up_proj.{m}``): one GEMM (and, under TP, one input-gradient
all-reduce) where there were three or two. On a rank the fused weight stacks that rank's own slices along dim 0::

    qkv_proj.{m}.weight     = [ q rows of this rank's heads ; k rows of its kv heads ; v rows of its kv heads ]
    gate_up_proj.{m}.weight = [ gate rows of its ffn slice ; up rows of its ffn slice ]

so a rank's fused weight is never a slice of a full fused weight. The canonical form (consolidated folders,
resharding, the Hugging Face export) keeps the separate names ``q_proj``/``k_proj``/``v_proj`` and
``gate_proj``/``up_proj``; the functions below are the one adapter between the two, applied wherever a rank's
module-named weights are read into canonical names or written back. Names without a fused part pass through
unchanged, so the adapter also takes pipeline-stage names after ``pipeline_to_canonical``.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PART_OF = {part: (fused, i) for fused, parts in FUSED.items() for i, part in enumerate(parts)}
_FUSED_NAME = re.compile(r"^(.*)\.(" + "|".join(FUSED) + r")\.(\d+)\.weight$")
_PART_NAME = re.compile(r"^(.*)\.(" + "|".join(_PART_OF) + r")\.(\d+)\.weight$")


def part_rows(args, tp: int) -> dict[str, tuple[int, ...]]:
    """Rows of each part inside one rank's fused weight (``args``: a ``ModelArgs``)."""
    q, kv = args.heads * args.head_dim // tp, args.kv_heads * args.head_dim // tp
    f = args.ffn // tp
    return {"qkv_proj": (q, kv, kv), "gate_up_proj": (f, f)}


def canonical_parts(name: str) -> Optional[list[str]]:
    """A fused module name -> its canonical part names in stacking order; None for any other name."""
    m = _FUSED_NAME.match(name)
    if m is None:
        return None
    prefix, fused, index = m.groups()
    return [f"{prefix}.{p}.{index}.weight" for p in FUSED[fused]]


def locate(name: str, args, tp: int) -> tuple[str, Optional[tuple[int, int]]]:
    """Where a canonical name's rank-local rows live in a rank's module state: (module name, (start, stop) rows of
    its dim 0), or (name, None) for a name that is not fused. For readers that take one tensor at a time."""
    m = _PART_NAME.match(name)
    if m is None:
        return name, None
    prefix, part, index = m.groups()
    fused, i = _PART_OF[part]
    rows = part_rows(args, tp)[fused]
    start = sum(rows[:i])
    return f"{prefix}.{fused}.{index}.weight", (start, start + rows[i])


def module_name(name: str) -> str:
    """The module name holding a canonical name (itself when not fused)."""
    m = _PART_NAME.match(name)
    if m is None:
        return name
    prefix, part, index = m.groups()
    return f"{prefix}.{_PART_OF[part][0]}.{index}.weight"


def to_canonical(state: Mapping[str, torch.Tensor], args, tp: int) -> dict[str, torch.Tensor]:
    """One rank's module-named weights -> the same rank's weights under canonical names (fused weights split into
    views of their parts, in order; everything else as it was)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        parts = canonical_parts(name)
        if parts is None:
            out[name] = t
            continue
        rows = part_rows(args, tp)[_FUSED_NAME.match(name).group(2)]
        if t.shape[0] != sum(rows):
            raise ValueError(f"{name}: {t.shape[0]} rows, expected {sum(rows)} ({' + '.join(map(str, rows))} for "
                             f"{', '.join(p.rsplit('.', 3)[1] for p in parts)} at tp={tp})")
        out.update(zip(parts, t.split(list(rows), dim=0)))
    return out


def from_canonical(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_canonical``: canonical rank-local weights -> module names (the parts of a fused weight
    concatenated at the place of its first part). Every part of a fused weight must be there."""
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, t in state.items():
        fused = module_name(name)
        if fused == name:
            out[name] = t
            continue
        if fused in done:
            continue
        parts = canonical_parts(fused)
        missing = [p for p in parts if p not in state]
        if missing:
            raise KeyError(f"{fused}: its parts {', '.join(missing)} are missing")
        out[fused] = torch.cat([state[p] for p in parts], dim=0)
        done.add(fused)
    return out
