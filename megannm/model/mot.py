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
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

# megatron-core 0.16's linear autograd function warns on every call that its tp_group argument is None even when the
# layer was built with an explicit group (ours are: ``column``/``row`` below); one message per matmul floods logs.
warnings.filterwarnings("ignore", message=".*tp_group is None.*", category=DeprecationWarning)
from megannm.model import kernels
from megannm.model.attention import AttentionInputs, KVCache, LayerCache, attend, attention_inputs

if TYPE_CHECKING:
    from megannm.model.args import ModelArgs
    from megannm.parallel import Layout

try:  # NVIDIA apex's fused kernel where a GPU is; the torch code below is the reference and the CPU path
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:  # apex absent (never `pip install apex`: that PyPI name is an unrelated web toolkit)
    _apex_rms_norm = None


# ---------------------------------------------------------------------------------------------------------------------
# routing


class _Split(torch.autograd.Function):
    """x [N, ...] in sequence order -> its rows grouped by modality, one slice per modality (one gather); the
    backward writes each slice's gradient back to its rows (every row written once: no zero-fill)."""

    @staticmethod
    def forward(ctx, x, order, counts):
        ctx.save_for_backward(order)
        ctx.counts = counts
        return tuple(x.index_select(0, order).split(counts))

    @staticmethod
    def backward(ctx, *grads):
        order, = ctx.saved_tensors
        return _scatter_rows(grads, order, ctx.counts), None, None


class _Merge(torch.autograd.Function):
    """Inverse of ``_Split``: one slice per modality -> [N, ...] in sequence order (each slice written to its rows,
    no concatenation first); the backward is one gather."""

    @staticmethod
    def forward(ctx, order, counts, *parts):
        ctx.save_for_backward(order)
        ctx.counts = counts
        return _scatter_rows(parts, order, counts)

    @staticmethod
    def backward(ctx, grad):
        order, = ctx.saved_tensors
        return (None, None, *grad.index_select(0, order).split(ctx.counts))


def _scatter_rows(parts, order, counts) -> torch.Tensor:
    """out[order[i]] = concatenation(parts)[i], without the concatenation. (``index_put_`` rather than
    ``index_copy_``: measured 1.6x faster on the CPU for [2560, 576] rows; the indices are unique either way.)"""
    out = parts[0].new_empty((order.numel(), *parts[0].shape[1:]))
    start = 0
    for n, part in zip(counts, parts):
        out.index_put_((order[start:start + n],), part)
        start += n
    return out


@dataclass
class Routing:
    """A micro-batch's tokens grouped by modality (stable: order within a modality is kept).

    ``order`` is None for the dense twin: one set, nothing to permute. The permutations have autograd functions of
    their own (``_Split``, ``_Merge``): each direction is one gather or one row write, both ways.
    """
    order: Optional[torch.Tensor]  # [N] flat token index of each sorted position
    counts: list[int]  # tokens per modality (0 allowed)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[N, ...] in sequence order -> one [n_m, ...] tensor per modality (one gather)."""
        return [x] if self.order is None else list(_Split.apply(x, self.order, self.counts))

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of ``split``: per-modality slices -> [N, ...] in sequence order (one row write)."""
        return parts[0] if self.order is None else _Merge.apply(self.order, self.counts, *parts)


def route(modality: torch.Tensor, n_sets: int) -> Routing:
    """Routing for a [B, S] tensor of modality ids; ``n_sets`` = 1 collapses it (dense twin)."""
    flat = modality.reshape(-1)
    if n_sets == 1:
        return Routing(None, [flat.numel()])
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=n_sets).tolist()  # the one host sync: slice sizes
    if len(counts) != n_sets:
        raise ValueError(f"modality ids must be < {n_sets} (got a maximum of {len(counts) - 1})")
    return Routing(order, counts)


@dataclass
class Context:
    """Computed once per micro-batch and shared by every block: the routing and the attention inputs."""
    routing: Routing
    attn: AttentionInputs


def prepare(args: "ModelArgs", modality, position_ids, document_ids, cache: Optional[KVCache] = None) -> Context:
    return Context(route(modality, args.n_sets),
                   attention_inputs(position_ids, document_ids, args.head_dim, args.rope_theta, args.torch_dtype,
                                    cache))


# The attribute of a micro-batch's modality tensor that carries its Context from one pipeline block to the next.
_ATTACHED = "_megannm_context"


def _key(args: "ModelArgs", ids: tuple) -> tuple:
    # _version counts in-place writes: a buffer refilled with the next micro-batch (a pipeline's receive buffer)
    # is the same object with a new version, so it never meets the previous micro-batch's context.
    return (args, *(t._version for t in ids))


def attached_context(args: "ModelArgs", modality, position_ids, document_ids) -> Optional[Context]:
    """The Context ``stage_context`` attached to these very tensors, unchanged since, for a model of these args;
    None otherwise."""
    found = getattr(modality, _ATTACHED, None)
    if found is None:
        return None
    key, ids, ctx = found
    same = all(a is b for a, b in zip(ids, (modality, position_ids, document_ids)))
    return ctx if same and key == _key(args, ids) else None


def stage_context(args: "ModelArgs", modality, position_ids, document_ids) -> Context:
    """``prepare`` once per micro-batch per pipeline stage. A stage's blocks see only the activation tuple, but
    DeepSpeed hands every block of a stage the same modality / position / document tensors (each returns them
    untouched), so the first block's Context (routing with its host sync, mask, RoPE tables) is attached to the
    modality tensor and the later blocks (and the head) take it from there. It lives and dies with the micro-batch's
    tensors; the next stage receives new tensors and prepares its own."""
    ctx = attached_context(args, modality, position_ids, document_ids)
    if ctx is None:
        ids = (modality, position_ids, document_ids)
        ctx = prepare(args, *ids)
        setattr(modality, _ATTACHED, (_key(args, ids), ids, ctx))
    return ctx


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 as Hugging Face Llama does.

    ``tp_group``: the weight multiplies activations split across tensor-parallel ranks (the QK-norm is over
    head_dim and each rank holds different heads), so each rank sees only part of its gradient. Using the weight
    through megatron-core's copy-to-TP-region (identity forward, all-reduce backward) sums those parts, keeping the
    replicated weight identical on every rank.
    """

    def __init__(self, dim: int, eps: float, dtype=torch.float32, tp_group=None, compiled: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self.compiled = compiled  # ModelArgs.compile_elementwise
        self.tp_group = tp_group  # set: the weight is shared over this group's ranks (see above)

    def shared_weight(self) -> torch.Tensor:
        """The weight as the norm uses it (through the copy-to-TP-region when it is shared: see above)."""
        w = self.weight
        return w if self.tp_group is None else copy_to_tensor_model_parallel_region(w, group=self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.shared_weight()
        if _apex_rms_norm is not None and x.is_cuda and x.numel():
            return _apex_rms_norm(x, w, w.shape, self.eps)
        # one autograd function with a closed-form backward (``kernels.rms_norm``): fp32 normalisation, cast to the
        # activations' dtype before the weight (Hugging Face Llama's order; in fp32 the weight folds in)
        return kernels.rms_norm(x, w, self.eps, self.compiled)


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


def _drawn_later(weight: torch.Tensor) -> torch.Tensor:
    """An init_method that leaves the weight as allocated: ``fused_columns`` writes every row afterwards."""
    return weight


def fused_columns(args: "ModelArgs", layout: "Layout", n_in: int, parts: tuple[int, ...]) -> PerModality:
    """One column-parallel linear per weight set computing several projections of the same input in ONE GEMM
    (q, k, v or gate, up; ``parts``: their full output sizes). This rank's weight stacks its own rows of each part
    (``megannm.model.fused``), so it is no slice of one full fused weight, and a fused master split by rows would
    hand rank 0 q-and-k rows. Each part is therefore drawn as its own full master on every rank, in the order
    separate layers would draw them (part by part, then weight set by weight set; megatron-core's CPU
    initialisation, ``ModelParallelConfig.use_cpu_initialization``), and this rank keeps its contiguous rows: the
    same weights at every TP size, and the same as separate q/k/v (gate/up) layers built from the same seed."""
    layers = PerModality(args.n_sets, lambda: column(args, layout, n_in, sum(parts), init=_drawn_later))
    init, tp, rank = args.init_method(), layout.tp, layout.tp_rank
    start = 0
    with torch.no_grad():
        for size in parts:
            rows = size // tp
            for layer in layers:
                master = torch.empty(size, n_in, dtype=torch.float32)
                init(master)
                layer.weight[start:start + rows].copy_(master[rank * rows:(rank + 1) * rows].to(args.torch_dtype))
            start += rows
    return layers


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
        self.compiled = args.compile_elementwise
        self.norm = PerModality(n, lambda: RMSNorm(d, args.eps, args.torch_dtype, compiled=args.compile_elementwise))
        # q, k and v in one GEMM (``fused_columns``; canonical names stay q_proj/k_proj/v_proj: ``fused.py``)
        self.qkv_proj = fused_columns(args, layout, d, (args.heads * hd, args.kv_heads * hd, args.kv_heads * hd))
        self.o_proj = PerModality(n, lambda: row(args, layout, args.heads * hd, d))
        self.qk_norm = args.qk_norm
        if args.qk_norm:  # over head_dim, before RoPE (as Qwen3 and the MoT reference code): local to a TP rank
            shared = layout.tp_group if tp > 1 else None
            self.q_norm = PerModality(n, lambda: RMSNorm(hd, args.eps, args.torch_dtype, tp_group=shared,
                                                         compiled=args.compile_elementwise))
            self.k_norm = PerModality(n, lambda: RMSNorm(hd, args.eps, args.torch_dtype, tp_group=shared,
                                                         compiled=args.compile_elementwise))

    def qkv(self, m: int, x: torch.Tensor) -> torch.Tensor:
        """Modality m's projections of its slice x [n, D] -> [n, (Hq + 2 Hkv) * hd] (q, k, v side by side)."""
        qkv = self.qkv_proj[m](x)
        if not self.qk_norm:
            return qkv
        # q's and k's heads normalised in the fused layout (``kernels.qk_norm``: no split and concatenation)
        qn, kn = self.q_norm[m], self.k_norm[m]
        return kernels.qk_norm(qkv, qn.shared_weight(), kn.shared_weight(), self.heads, self.kv_heads, qn.eps,
                               self.compiled)

    def forward(self, parts: list[torch.Tensor], routing: Routing, attn: AttentionInputs, shape: tuple[int, int],
                cache: Optional[LayerCache] = None) -> list[torch.Tensor]:
        """parts: the micro-batch's tokens of each modality ([n_m, D], ``Routing.split``); returns the same layout.
        Only the attention itself needs sequence order: q/k/v are put in it, the output taken back out."""
        b, s = shape
        if not self.norm_reorder:
            parts = self.norm(parts)
        qkv = routing.merge([self.qkv(m, p) for m, p in enumerate(parts)])
        # RoPE on q and k straight from the fused output; the backward writes one gradient for all three
        q, k, v = kernels.rotary_qkv(qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim), attn.cos,
                                     attn.sin, self.heads, self.kv_heads, self.compiled)
        if cache is not None:
            k, v = cache.store(k, v, attn.start)
        out = attend(q, k, v, attn.mask)  # [B, S, Hq * hd]: every modality attends to every earlier token
        parts = self.o_proj(routing.split(out.reshape(b * s, -1)))
        return self.norm(parts) if self.norm_reorder else parts


class FeedForward(nn.Module):
    """Per-modality norm and SwiGLU FFN, down(silu(gate(x)) * up(x)) (gate and up one fused GEMM, split by rows
    over TP, down by columns, so the product needs no communication until down's all-reduce)."""

    def __init__(self, args: "ModelArgs", layout: "Layout"):
        super().__init__()
        n, d, f = args.n_sets, args.hidden, args.ffn
        self.norm_reorder = args.norm_reorder
        self.norm = PerModality(n, lambda: RMSNorm(d, args.eps, args.torch_dtype, compiled=args.compile_elementwise))
        self.compiled = args.compile_elementwise
        self.gate_up_proj = fused_columns(args, layout, d, (f, f))  # gate and up in one GEMM (``fused.py``)
        self.down_proj = PerModality(n, lambda: row(args, layout, f, d))

    def swiglu(self, m: int, x: torch.Tensor) -> torch.Tensor:
        # [gate | up]: this rank's ffn/tp columns of each; one autograd function (``kernels.swiglu``)
        return self.down_proj[m](kernels.swiglu(self.gate_up_proj[m](x), self.compiled))

    def forward(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """parts: [n_m, D] per modality; a token-wise sub-layer never needs sequence order."""
        if not self.norm_reorder:
            parts = self.norm(parts)
        parts = [self.swiglu(m, p) for m, p in enumerate(parts)]
        return self.norm(parts) if self.norm_reorder else parts


# ---------------------------------------------------------------------------------------------------------------------
# the block


class Block(nn.Module):
    """One transformer block, MoT or dense per ``args.mot``; a pipeline stage in its own right.

    Takes and returns the activation tuple ``(hidden [B,S,D], modality [B,S], position_ids [B,S], document_ids
    [B,S])``. ``ctx`` (routing, mask, RoPE) is computed once per micro-batch by ``NMMModel``; in a pipeline stage,
    which only sees the tuple, the stage's first block computes it from the tuple and the later ones reuse it
    (``stage_context``).
    """

    def __init__(self, args: "ModelArgs", layout: "Layout", layer_number: int = 0):
        super().__init__()
        self.args, self.layer_number = args, layer_number
        self.attn = Attention(args, layout)
        self.ffn = FeedForward(args, layout)

    def forward(self, x: tuple, ctx: Optional[Context] = None, cache: Optional[LayerCache] = None) -> tuple:
        h, modality, position_ids, document_ids = x
        if ctx is None:
            ctx = stage_context(self.args, modality, position_ids, document_ids)
        b, s, d = h.shape
        parts = self.run_split(ctx.routing.split(h.reshape(b * s, d)), ctx, (b, s), cache)
        return ctx.routing.merge(parts).view(b, s, d), modality, position_ids, document_ids

    def run_split(self, parts: list[torch.Tensor], ctx: Context, shape: tuple[int, int],
                  cache: Optional[LayerCache] = None) -> list[torch.Tensor]:
        """The block on the residual stream kept split by modality (one [n_m, D] tensor per weight set,
        ``Routing.split``): the model splits once per micro-batch instead of gathering around every sub-layer, and
        no sub-layer output is ever concatenated (or its gradient split and re-concatenated)."""
        attn = self.attn(parts, ctx.routing, ctx.attn, shape, cache)  # per-modality QKV, ONE global attention
        parts = [h + a for h, a in zip(parts, attn)]
        return [h + f for h, f in zip(parts, self.ffn(parts))]  # per-modality norm + SwiGLU
