"""The Mixture-of-Transformers block (Liang et al. 2024, arXiv 2411.04996) and its dense twin.

Under MoT every non-embedding weight of a block exists once per modality: attention pre-norm, q/k/v and output
projections, QK-norms, FFN pre-norm and SwiGLU FFN. Each token passes through its own modality's set, chosen by the
modality id that travels with the hidden states; attention itself is ONE global causal attention over the whole
interleaved sequence (``attention.py``). The dense twin (``mot: false``) is the same code with one set: each token
still passes exactly one set of weights of the same sizes, so both have the same FLOPs per token.

Routing (``route``) is a stable sort of the flattened micro-batch by modality: one gather puts each modality's
tokens in a contiguous slice, per-modality linears run on their slice, one gather restores the order. No per-token
Python. Every modality's modules run on every step, on an empty [0, D] slice when a micro-batch has none of its
tokens: skipping them would make ZeRO's collectives differ between data-parallel ranks (measured: aborts at ZeRO 1-3, and a mismatched all-gather can pass wrong data first).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

# megatron-core 0.16's linear autograd function warns on every call that its tp_group argument is None even when the
# layer was built with an explicit group (ours are: ``column``/``row`` below); one message per matmul floods logs.
warnings.filterwarnings("ignore", message=".*tp_group is None.*", category=DeprecationWarning)
from megannm.model.attention import AttentionInputs, KVCache, LayerCache, apply_rotary, attend, attention_inputs

if TYPE_CHECKING:
    from megannm.model.args import ModelArgs
    from megannm.parallel import Layout

try:  # NVIDIA apex's fused kernel where a GPU is; the torch code below is the reference and the CPU path
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:  # apex absent (never `pip install apex`: that PyPI name is an unrelated web toolkit)
    _apex_rms_norm = None


# ---------------------------------------------------------------------------------------------------------------------
# routing


@dataclass
class Routing:
    """A micro-batch's tokens grouped by modality (stable: order within a modality is kept).

    ``order`` is None for the dense twin: one set, nothing to permute.
    """
    order: Optional[torch.Tensor]  # [N] flat token index of each sorted position
    inverse: Optional[torch.Tensor]  # [N] sorted position of each flat token
    counts: list[int]  # tokens per modality (0 allowed)

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] in sequence order -> the same rows grouped by modality (one gather)."""
        return x if self.order is None else x.index_select(0, self.order)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``sort`` (one gather)."""
        return x if self.order is None else x.index_select(0, self.inverse)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Sorted [N, ...] -> one contiguous [n_m, ...] view per modality (no copy)."""
        return [x] if self.order is None else list(x.split(self.counts))

    @staticmethod
    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-modality slices -> sorted [N, ...]."""
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[N, ...] in sequence order -> one contiguous [n_m, ...] slice per modality."""
        return self.parts(self.sort(x))

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``split``: per-modality slices -> [N, ...] in sequence order."""
        return self.unsort(self.join(parts))


def route(modality: torch.Tensor, n_sets: int) -> Routing:
    """Routing for a [B, S] tensor of modality ids; ``n_sets`` = 1 collapses it (dense twin)."""
    flat = modality.reshape(-1)
    if n_sets == 1:
        return Routing(None, None, [flat.numel()])
    order = torch.sort(flat, stable=True).indices
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=n_sets).tolist()  # the one host sync: slice sizes
    if len(counts) != n_sets:
        raise ValueError(f"modality ids must be < {n_sets} (got a maximum of {len(counts) - 1})")
    return Routing(order, inverse, counts)


@dataclass
class Context:
    """Computed once per micro-batch and shared by every block: the routing and the attention inputs."""
    routing: Routing
    attn: AttentionInputs


def prepare(args: "ModelArgs", modality, position_ids, document_ids, cache: Optional[KVCache] = None) -> Context:
    return Context(route(modality, args.n_sets),
                   attention_inputs(position_ids, document_ids, args.head_dim, args.rope_theta, args.torch_dtype,
                                    cache))


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 as Hugging Face Llama does.

    ``tp_group``: the weight multiplies activations split across tensor-parallel ranks (the QK-norm is over
    head_dim and each rank holds different heads), so each rank sees only part of its gradient. Using the weight
    through megatron-core's copy-to-TP-region (identity forward, all-reduce backward) sums those parts, keeping the
    replicated weight identical on every rank.
    """

    def __init__(self, dim: int, eps: float, dtype=torch.float32, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self.tp_group = tp_group  # set: the weight is shared over this group's ranks (see above)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.tp_group is not None:
            w = copy_to_tensor_model_parallel_region(w, group=self.tp_group)
        if _apex_rms_norm is not None and x.is_cuda and x.numel():
            return _apex_rms_norm(x, w, w.shape, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x.to(dtype)


class _WeightsOnly:
    """megatron-core linears add an ``_extra_state: None`` entry to their state dict for Transformer Engine; we have no
    such state, and the canonical names that checkpoints and conversion map should be weights only."""
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # megatron-core also registers a load pre-hook that inserts `_extra_state`; without the matching getter
        # that key would be "unexpected" on every load.
        self._load_state_dict_pre_hooks.clear()


class ColumnLinear(_WeightsOnly, ColumnParallelLinear):
    """y = x W^T with W [out, in] split by rows over tensor-parallel ranks (each rank: out/tp outputs)."""

    def forward(self, x):
        return super().forward(x)[0]


class RowLinear(_WeightsOnly, RowParallelLinear):
    """y = x W^T with W [out, in] split by columns (each rank: in/tp inputs); outputs all-reduced over TP."""

    def forward(self, x):
        return super().forward(x)[0]


def column(args: "ModelArgs", layout: "Layout", n_in: int, n_out: int,
           init: Optional[Callable] = None) -> ColumnLinear:
    return ColumnLinear(n_in, n_out, config=args.megatron_config(layout.tp, layout.pp),
                        init_method=init or args.init_method(), bias=False, gather_output=False,
                        tp_group=layout.tp_group)


def row(args: "ModelArgs", layout: "Layout", n_in: int, n_out: int) -> RowLinear:
    # Output projections get Megatron's scaled init, std / sqrt(2 * layers): two of them add into the residual
    # stream per block, so its variance stays independent of depth.
    return RowLinear(n_in, n_out, config=args.megatron_config(layout.tp, layout.pp),
                     init_method=args.output_init_method(), bias=False, input_is_parallel=True,
                     skip_bias_add=False, tp_group=layout.tp_group)


class PerModality(nn.ModuleList):
    """One module per weight set (``.0`` text, ``.1`` image under MoT; only ``.0`` dense), applied slice by slice."""

    def __init__(self, n_sets: int, make: Callable[[], nn.Module]):
        super().__init__([make() for _ in range(n_sets)])

    def forward(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [module(x) for module, x in zip(self, parts)]


# ---------------------------------------------------------------------------------------------------------------------
# the two sub-layers


class Attention(nn.Module):
    """Per-modality norm and q/k/v/o projections around ONE global attention over the interleaved sequence.

    ``norm_reorder`` (Chameleon): normalise the sub-layer's output instead of its input, which bounds what each
    modality can add to the shared residual stream.
    """

    def __init__(self, args: "ModelArgs", layout: "Layout"):
        super().__init__()
        n, d, hd = args.n_sets, args.hidden, args.head_dim
        tp = layout.tp
        self.head_dim = hd
        self.heads, self.kv_heads = args.heads // tp, args.kv_heads // tp  # this rank's
        self.norm_reorder = args.norm_reorder
        self.norm = PerModality(n, lambda: RMSNorm(d, args.eps, args.torch_dtype))
        self.q_proj = PerModality(n, lambda: column(args, layout, d, args.heads * hd))
        self.k_proj = PerModality(n, lambda: column(args, layout, d, args.kv_heads * hd))
        self.v_proj = PerModality(n, lambda: column(args, layout, d, args.kv_heads * hd))
        self.o_proj = PerModality(n, lambda: row(args, layout, args.heads * hd, d))
        self.qk_norm = args.qk_norm
        if args.qk_norm:  # over head_dim, before RoPE (as Qwen3 and the MoT reference code): local to a TP rank
            shared = layout.tp_group if tp > 1 else None
            self.q_norm = PerModality(n, lambda: RMSNorm(hd, args.eps, args.torch_dtype, tp_group=shared))
            self.k_norm = PerModality(n, lambda: RMSNorm(hd, args.eps, args.torch_dtype, tp_group=shared))

    def qkv(self, m: int, x: torch.Tensor) -> torch.Tensor:
        """Modality m's projections of its slice x [n, D] -> [n, (Hq + 2 Hkv) * hd]."""
        q, k, v = self.q_proj[m](x), self.k_proj[m](x), self.v_proj[m](x)
        if self.qk_norm:
            q = self.q_norm[m](q.view(-1, self.heads, self.head_dim)).flatten(1)
            k = self.k_norm[m](k.view(-1, self.kv_heads, self.head_dim)).flatten(1)
        return torch.cat([q, k, v], dim=-1)

    def forward(self, hs: torch.Tensor, routing: Routing, attn: AttentionInputs, shape: tuple[int, int],
                cache: Optional[LayerCache] = None) -> torch.Tensor:
        """hs: the micro-batch's [N, D] tokens grouped by modality (``Routing.sort``); returns the same layout.
        Only the attention itself needs sequence order: q/k/v are put in it, the output taken back out."""
        b, s = shape
        parts = routing.parts(hs)
        if not self.norm_reorder:
            parts = self.norm(parts)
        qkv = routing.unsort(routing.join([self.qkv(m, p) for m, p in enumerate(parts)]))
        qkv = qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = apply_rotary(q, attn.cos, attn.sin), apply_rotary(k, attn.cos, attn.sin)
        if cache is not None:
            k, v = cache.store(k, v, attn.start)
        out = attend(q, k, v, attn.mask)  # [B, S, Hq * hd]: every modality attends to every earlier token
        parts = self.o_proj(routing.parts(routing.sort(out.reshape(b * s, -1))))
        if self.norm_reorder:
            parts = self.norm(parts)
        return routing.join(parts)


class FeedForward(nn.Module):
    """Per-modality norm and SwiGLU FFN, down(silu(gate(x)) * up(x)) (gate/up split by rows over TP, down by
    columns, so the product needs no communication until down's all-reduce)."""

    def __init__(self, args: "ModelArgs", layout: "Layout"):
        super().__init__()
        n, d, f = args.n_sets, args.hidden, args.ffn
        self.norm_reorder = args.norm_reorder
        self.norm = PerModality(n, lambda: RMSNorm(d, args.eps, args.torch_dtype))
        self.gate_proj = PerModality(n, lambda: column(args, layout, d, f))
        self.up_proj = PerModality(n, lambda: column(args, layout, d, f))
        self.down_proj = PerModality(n, lambda: row(args, layout, f, d))

    def swiglu(self, m: int, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj[m](F.silu(self.gate_proj[m](x)) * self.up_proj[m](x))

    def forward(self, hs: torch.Tensor, routing: Routing) -> torch.Tensor:
        """hs: [N, D] grouped by modality; a token-wise sub-layer never needs sequence order."""
        parts = routing.parts(hs)
        if not self.norm_reorder:
            parts = self.norm(parts)
        parts = [self.swiglu(m, p) for m, p in enumerate(parts)]
        if self.norm_reorder:
            parts = self.norm(parts)
        return routing.join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# the block


class Block(nn.Module):
    """One transformer block, MoT or dense per ``args.mot``; a pipeline stage in its own right.

    Takes and returns the activation tuple ``(hidden [B,S,D], modality [B,S], position_ids [B,S], document_ids
    [B,S])``. ``ctx`` (routing, mask, RoPE) is computed once per micro-batch by ``NMMModel``; a pipeline stage, which
    only sees the tuple, recomputes it from the tuple (a sort and a comparison: cheap next to the block).
    """

    def __init__(self, args: "ModelArgs", layout: "Layout", layer_number: int = 0):
        super().__init__()
        self.args, self.layer_number = args, layer_number
        self.attn = Attention(args, layout)
        self.ffn = FeedForward(args, layout)

    def forward(self, x: tuple, ctx: Optional[Context] = None, cache: Optional[LayerCache] = None) -> tuple:
        h, modality, position_ids, document_ids = x
        if ctx is None:
            ctx = prepare(self.args, modality, position_ids, document_ids)
        b, s, d = h.shape
        hs = self.run_sorted(ctx.routing.sort(h.reshape(b * s, d)), ctx, (b, s), cache)
        return ctx.routing.unsort(hs).view(b, s, d), modality, position_ids, document_ids

    def run_sorted(self, hs: torch.Tensor, ctx: Context, shape: tuple[int, int],
                   cache: Optional[LayerCache] = None) -> torch.Tensor:
        """The block on the residual stream kept grouped by modality ([N, D], ``Routing.sort``): the model sorts
        once per micro-batch instead of gathering around every sub-layer."""
        hs = hs + self.attn(hs, ctx.routing, ctx.attn, shape, cache)  # per-modality QKV, ONE global attention
        hs = hs + self.ffn(hs, ctx.routing)  # per-modality norm + SwiGLU
        return hs
