"""The Mixture-of-Transformers block (Liang et al. 2024, arXiv 2411.04996) and its dense twin, as the paper writes it.

Every non-embedding weight of a block exists once per modality (attention pre-norm, q/k/v/o projections, QK-norms,
FFN pre-norm, SwiGLU FFN); each token passes through its own modality's set, and attention is ONE global causal
attention over the whole interleaved sequence::

    h = h + attn(norm(h))        per modality: norm, q, k, v, o;  one attention over every token
    h = h + ffn(norm(h))         per modality: norm, gate, up, down

The dense twin (``n_sets == 1``) is the same code with one set, so both have the same FLOPs per token.

This file imports torch only: the Hugging Face export ships it beside its modeling file, so the exported model runs
this very code. What differs between a training rank and the export is injected:

- ``Linears`` (the layer spec) makes the projections: megatron-core's column- and row-parallel layers on a training
  rank (``megannm.model.layers``), ``nn.Linear`` in the export;
- ``Context.attend`` is the attention kernel (SDPA, flex_attention, a KV cache) on ``[B, H, S, hd]`` tensors.

Tokens travel through the blocks grouped by modality (``Routing.group``: one stable sort per micro-batch, so each
modality's tokens are one contiguous slice and a per-modality linear is one GEMM on its slice); only the attention
needs sequence order. Every modality's modules run on every call, on an empty slice when a micro-batch has none of
its tokens: skipping them would make ZeRO's collectives differ between data-parallel ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockShape:
    """The sizes of one block (whole model, before tensor-parallel splitting)."""
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    n_sets: int  # weight sets: one per modality under MoT, one for the dense twin
    qk_norm: bool
    norm_reorder: bool  # Chameleon: normalise each sub-layer's output instead of its input
    eps: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


@dataclass
class Linears:
    """The layer spec: how a block makes its projections (``column``: output split over tensor-parallel ranks;
    ``row``: input split, output reduced) and its norms. The defaults are a world of one (the export)."""
    column: Callable[[int, int], nn.Module] = lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False)
    row: Callable[[int, int], nn.Module] = lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False)
    norm: Callable[..., nn.Module] = None  # (dim, eps, shared) -> module; None: RMSNorm below
    tp: int = 1
    # applied to a weight replicated over the tensor-parallel ranks that each see part of its gradient (the QK-norm:
    # each rank normalises different heads): megatron-core's copy-to-TP-region sums those parts in the backward
    shared: Callable[[torch.Tensor], torch.Tensor] = _same

    def make_norm(self, dim: int, eps: float, shared: bool = False) -> nn.Module:
        make = self.norm or RMSNorm
        return make(dim, eps, self.shared if shared else _same)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, normalised in fp32 and cast back before the weight (Hugging Face Llama's
    order)."""

    def __init__(self, dim: int, eps: float, shared: Callable = _same):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.shared(self.weight) * y.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in Hugging Face Llama's ``rotate_half`` form; x [B, H, S, hd], cos/sin [B, 1, S, hd] in x's dtype."""
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------------------------
# routing


class _Permute(torch.autograd.Function):
    """Rows of x in the order ``index``; the gradient goes back through ``inverse`` (the inverse permutation).

    Why not ``x.index_select(0, index)``: its backward zero-fills a buffer and scatter-adds into it, where a
    permutation's gradient is just the inverse gather, one read and one write on any device."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class Routing:
    """A micro-batch's tokens grouped by modality: a stable sort of the flattened ``modality`` [B, S] ids, so each
    modality's tokens form one contiguous slice (in sequence order), ``counts`` tokens each (0 allowed)."""

    def __init__(self, modality: torch.Tensor, n_sets: int):
        self.shape = tuple(modality.shape)
        flat = modality.reshape(-1)
        if n_sets == 1:  # the dense twin: nothing to permute
            self.order = self.inverse = None
            self.counts = [flat.numel()]
            return
        self.order = torch.sort(flat, stable=True).indices
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(flat.numel(), device=flat.device)
        self.counts = torch.bincount(flat, minlength=n_sets).tolist()  # slice sizes: the one host sync
        if len(self.counts) != n_sets:
            raise ValueError(f"modality ids must be < {n_sets} (got a maximum of {len(self.counts) - 1})")

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] in sequence order -> [B * S, ...] grouped by modality."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.order is None else _Permute.apply(flat, self.order, self.inverse)

    def ungroup(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``group``: [B * S, ...] grouped by modality -> [B, S, ...] in sequence order."""
        if self.order is not None:
            x = _Permute.apply(x, self.inverse, self.order)
        return x.view(*self.shape, *x.shape[1:])


class PerModality(nn.ModuleList):
    """One module per weight set (``.0`` text, ``.1`` image under MoT; only ``.0`` dense), each applied to its
    modality's slice of rows grouped by ``Routing``."""

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(self) == 1:
            return self[0](x)
        return torch.cat([module(part) for module, part in zip(self, x.split(counts))])


def per_modality(n: int, make: Callable[[], nn.Module]) -> PerModality:
    return PerModality([make() for _ in range(n)])


def by_modality(fn: Callable[..., tuple], x: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """``fn(m, x_m)`` on each modality's slice of the rows of x (grouped by ``Routing``), each of its outputs joined
    over the modalities: one concatenation per output however many steps ``fn`` takes per modality."""
    outs = [fn(m, part) for m, part in enumerate(x.split(counts))]
    if len(outs) == 1:
        return list(outs[0])
    return [torch.cat(parts) for parts in zip(*outs)]


@dataclass
class Context:
    """What every block of a micro-batch shares, computed once per micro-batch (per pipeline stage) and passed to
    each block explicitly: the routing, the RoPE tables [B, 1, S, hd] in the activations' dtype, and the attention
    kernel ``attend(q, k, v, layer) -> [B, S, H * hd]`` over q [B, Hq, S, hd], k/v [B, Hkv, S, hd] (which knows the
    mask and any KV cache; ``layer`` indexes the cache)."""
    routing: Routing
    cos: torch.Tensor
    sin: torch.Tensor
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# the block


class Attention(nn.Module):
    """Per-modality norm and q/k/v/o projections around ONE global attention over the interleaved sequence."""

    def __init__(self, shape: BlockShape, linears: Linears, layer: int):
        super().__init__()
        n, d, hd, tp = shape.n_sets, shape.hidden, shape.head_dim, linears.tp
        self.layer, self.head_dim, self.norm_reorder = layer, hd, shape.norm_reorder
        self.heads, self.kv_heads = shape.heads // tp, shape.kv_heads // tp  # this rank's
        self.norm = per_modality(n, lambda: linears.make_norm(d, shape.eps))
        self.q_proj = per_modality(n, lambda: linears.column(d, shape.heads * hd))
        self.k_proj = per_modality(n, lambda: linears.column(d, shape.kv_heads * hd))
        self.v_proj = per_modality(n, lambda: linears.column(d, shape.kv_heads * hd))
        self.o_proj = per_modality(n, lambda: linears.row(shape.heads * hd, d))
        self.qk_norm = shape.qk_norm
        if shape.qk_norm:  # over head_dim, before RoPE (as Qwen3 and the MoT reference code)
            self.q_norm = per_modality(n, lambda: linears.make_norm(hd, shape.eps, shared=True))
            self.k_norm = per_modality(n, lambda: linears.make_norm(hd, shape.eps, shared=True))

    def qkv(self, m: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Modality m's queries, keys and values [n_m, heads, hd] of its tokens h [n_m, D]."""
        x = h if self.norm_reorder else self.norm[m](h)
        q, k, v = (proj[m](x).unflatten(-1, (-1, self.head_dim)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.qk_norm:
            q, k = self.q_norm[m](q), self.k_norm[m](k)
        return q, k, v

    def out(self, m: int, o: torch.Tensor) -> tuple[torch.Tensor]:
        o = self.o_proj[m](o)
        return (self.norm[m](o) if self.norm_reorder else o),

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        counts = ctx.routing.counts
        # per modality: q, k, v; then ONE attention in sequence order: every token attends to every earlier one
        q, k, v = (ctx.routing.ungroup(t).transpose(1, 2) for t in by_modality(self.qkv, h, counts))
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        o = ctx.routing.group(ctx.attend(q, k, v, self.layer))
        return by_modality(self.out, o, counts)[0]


class FeedForward(nn.Module):
    """Per-modality norm and SwiGLU FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, shape: BlockShape, linears: Linears):
        super().__init__()
        n, d, f = shape.n_sets, shape.hidden, shape.ffn
        self.norm_reorder = shape.norm_reorder
        self.norm = per_modality(n, lambda: linears.make_norm(d, shape.eps))
        self.gate_proj = per_modality(n, lambda: linears.column(d, f))
        self.up_proj = per_modality(n, lambda: linears.column(d, f))
        self.down_proj = per_modality(n, lambda: linears.row(f, d))

    def swiglu(self, m: int, h: torch.Tensor) -> tuple[torch.Tensor]:
        """Modality m's FFN on its tokens h [n_m, D]."""
        x = h if self.norm_reorder else self.norm[m](h)
        out = self.down_proj[m](F.silu(self.gate_proj[m](x)) * self.up_proj[m](x))
        return (self.norm[m](out) if self.norm_reorder else out),

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        return by_modality(self.swiglu, h, ctx.routing.counts)[0]


class Block(nn.Module):
    """One transformer block, MoT or dense by ``shape.n_sets``, on the residual stream h [N, D] grouped by
    modality (``Routing.group``)."""

    def __init__(self, shape: BlockShape, linears: Linears, layer: int = 0):
        super().__init__()
        self.attn = Attention(shape, linears, layer)
        self.ffn = FeedForward(shape, linears)

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        h = h + self.attn(h, ctx)
        return h + self.ffn(h, ctx)
