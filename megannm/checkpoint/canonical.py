"""Canonical parameter names and shapes, and tensor-parallel slicing: full tensors <-> one rank's shards.

The canonical form is ``NMMModel``'s state dict at TP = 1 without the vocabulary padding rows: the embedding and
the output layer have exactly ``vocab_size`` rows. Each TP layout pads them to its own ``padded_vocab_size`` (which
depends on the TP size) before splitting. Splits follow ``megannm/model/transformer.py``: the embedding, the head,
q/k/v and gate/up are split along dim 0 (whole heads, contiguous), o_proj and down_proj along dim 1, and the norms
(QK-norms included) and the continuous images' latent modules (``embedding.latents.*``, ``head.velocity.*``) are
replicated on every TP rank. Every reader and writer checks names and shapes against these
(``check_names``, ``check_shape_map``): one line naming the first missing, unexpected or misshapen parameter.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional

import torch

from megannm.checkpoint.folders import CheckpointError
from megannm.checkpoint.tensors import LazyState, cast_to, specs_of

VOCAB_PARAMS = ("embedding.embed_tokens.weight", "head.output.weight")
_ROW = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split along dim 0 (ColumnParallelLinear)
_COL = ("o_proj", "down_proj")  # split along dim 1 (RowParallelLinear)
_LINEAR = re.compile(r"\.(" + "|".join(_ROW + _COL) + r")\.\d+\.weight$")


def split_dim(name: str) -> Optional[int]:
    """The dimension a canonical parameter is split along across TP ranks; None = replicated (norms)."""
    if name in VOCAB_PARAMS:
        return 0
    m = _LINEAR.search(name)
    if m:
        return 1 if m.group(1) in _COL else 0
    return None


def canonical_shapes(args) -> dict[str, tuple[int, ...]]:
    """Every canonical name -> its full, unpadded shape, in ``NMMModel.state_dict()`` order."""
    d, f, hd, v = args.hidden, args.ffn, args.head_dim, args.vocab_size
    q, kv = args.heads * hd, args.kv_heads * hd
    sets = range(args.n_sets)
    out = {"embedding.embed_tokens.weight": (v, d)}
    c = getattr(args, "latent_channels", 0)
    if c:  # continuous images (model/latents.py)
        from megannm.model.latents import FREQUENCIES
        out.update({"embedding.latents.patch.weight": (d, c), "embedding.latents.patch.bias": (d,),
                    "embedding.latents.time.0.weight": (d, FREQUENCIES), "embedding.latents.time.0.bias": (d,),
                    "embedding.latents.time.2.weight": (d, d), "embedding.latents.time.2.bias": (d,)})
    for i in range(args.layers):
        a, b = f"layers.{i}.attn", f"layers.{i}.ffn"
        groups = [("norm", (d,)), ("q_proj", (q, d)), ("k_proj", (kv, d)), ("v_proj", (kv, d)), ("o_proj", (d, q))]
        if args.qk_norm:
            groups += [("q_norm", (hd,)), ("k_norm", (hd,))]
        for g, shape in groups:
            for m in sets:
                out[f"{a}.{g}.{m}.weight"] = shape
        for g, shape in (("norm", (d,)), ("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            for m in sets:
                out[f"{b}.{g}.{m}.weight"] = shape
    for m in sets:
        out[f"head.norm.{m}.weight"] = (d,)
    out["head.output.weight"] = (v, d)
    if c:
        out.update({"head.velocity.proj.weight": (c, d), "head.velocity.proj.bias": (c,)})
    return out


def local_shapes(args, tp: int, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """The shapes one TP rank holds (vocabulary padded to ``padded_vocab`` before the split)."""
    out = {}
    for name, shape in canonical_shapes(args).items():
        shape = list(shape)
        if name in VOCAB_PARAMS:
            shape[0] = padded_vocab
        dim = split_dim(name)
        if dim is not None:
            shape[dim] //= tp
        out[name] = tuple(shape)
    return out


def check_divisible(args, tp: int, pp: int = 1, padded_vocab: Optional[int] = None, where: str = "target") -> None:
    """One line naming the model dimension that a TP x PP target cannot divide."""
    if tp < 1 or pp < 1:
        raise CheckpointError(f"{where}: tensor and pipeline sizes must be >= 1 (got --tp {tp} --pp {pp})")
    dims = [("heads", args.heads), ("kv_heads", args.kv_heads), ("ffn", args.ffn)]
    if padded_vocab is not None:
        dims.append(("padded_vocab_size", padded_vocab))
    for name, n in dims:
        if n % tp:
            raise CheckpointError(f"{where}: --tp {tp} does not divide the model's {name}={n}")
    if args.layers % pp:
        raise CheckpointError(f"{where}: --pp {pp} does not divide the model's layers={args.layers}")


def check_names(found: Iterable[str], expected: Iterable[str], source: str) -> None:
    """Refuse a state whose names differ from the expected ones, naming the first missing or unexpected key."""
    found, expected = set(found), list(expected)
    missing = [k for k in expected if k not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing parameter {missing[0]}{more}")
    unexpected = sorted(found - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected parameter {unexpected[0]}{more}")


def check_shape_map(found: Mapping[str, tuple], shapes: Mapping[str, tuple], source: str) -> None:
    """``check_shapes`` on shapes alone (a lazy state's, read from headers: no tensor is read)."""
    check_names(found.keys(), shapes.keys(), source)
    for name, shape in shapes.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{source}: parameter {name} has shape {list(found[name])}, expected {list(shape)}")


# ---------------------------------------------------------------------------------------------------------------------
# slicing


def shard_tensor(name: str, full: torch.Tensor, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    """TP rank ``rank``'s slice of a canonical tensor (vocabulary rows zero-padded to ``padded_vocab`` first)."""
    if name in VOCAB_PARAMS and full.shape[0] != padded_vocab:
        pad = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
        full = torch.cat([full, pad])
    dim = split_dim(name)
    if dim is None or tp == 1:
        return full
    return full.chunk(tp, dim=dim)[rank]


def rank_slice(name: str, full: torch.Tensor, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
    """``shard_tensor``, padding only the rows of this rank (a vocabulary tensor's zero rows are not made for every
    rank)."""
    if name not in VOCAB_PARAMS:
        return shard_tensor(name, full, tp, rank, padded_vocab)
    per, real = padded_vocab // tp, full.shape[0]
    rows = full[min(rank * per, real):min((rank + 1) * per, real)]
    pad = per - rows.shape[0]
    return torch.cat([rows, full.new_zeros(pad, *full.shape[1:])]) if pad else rows


def merge_states(parts: list[Mapping[str, torch.Tensor]], args, sources: list[str],
                 dtype: Optional[torch.dtype] = None) -> LazyState:
    """TP ranks' local states (index = TP rank) -> the canonical full state (padding rows dropped), lazily: each
    canonical tensor is joined from its ranks' slices when it is asked for and cast to ``dtype`` when given.

    Each part is checked against the local shapes first (from shapes alone), so an error names the rank's file and
    the parameter."""
    tp = len(parts)
    embed = "embedding.embed_tokens.weight"
    shapes = [{k: s for k, (s, _) in specs_of(p).items()} for p in parts]
    padded = shapes[0][embed][0] * tp if embed in shapes[0] else None
    if padded is not None and padded < args.vocab_size:
        raise CheckpointError(f"{sources[0]}: parameter {embed} has {padded // tp} rows per rank x {tp} ranks, fewer "
                              f"than the vocabulary's {args.vocab_size} ids")
    expected = local_shapes(args, tp, padded or args.vocab_size)
    for found, source in zip(shapes, sources):
        check_shape_map(found, expected, source)
    first = specs_of(parts[0])
    specs = {name: (shape, cast_to(first[name][1], dtype)) for name, shape in canonical_shapes(args).items()}

    def get(name: str) -> torch.Tensor:
        dim = split_dim(name)
        want = specs[name][1]
        t = parts[0][name] if dim is None or tp == 1 else torch.cat([p[name].to(want) for p in parts], dim=dim)
        return (t[:args.vocab_size] if name in VOCAB_PARAMS else t).to(want)

    return LazyState(specs, get)

