"""The layer spec of a training rank: which layers ``megannm.model.block`` is built from, and its compilation.

- Projections: megatron-core's ``ColumnParallelLinear`` (q, k, v, gate, up: output split over tensor-parallel
  ranks) and ``RowParallelLinear`` (o, down: input split, output all-reduced), at every TP size, so a TP=1 and a
  TP=2 model start from the same weights (megatron-core draws each full master weight on the CPU and keeps the
  rank's slice). Output projections get Megatron's scaled init, std / sqrt(2 * layers): two of them add into the
  residual stream per block, so its variance stays independent of depth.
- Norms: RMSNorm, through NVIDIA apex's fused kernel when apex is importable and the tensors are on a GPU (never
  ``pip install apex``: that PyPI name is an unrelated web toolkit); element-wise fusion otherwise comes from
  ``torch.compile`` of each block (``compile_blocks``, the recipe's ``model.compile``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from megannm.model.block import Block, Linears, RMSNorm

if TYPE_CHECKING:
    from megannm.model.args import ModelArgs
    from megannm.parallel import Layout

try:  # NVIDIA apex's fused RMSNorm where a GPU is
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine as _apex_rms_norm
except Exception:  # apex absent: the torch form, fused by torch.compile when the blocks are compiled
    _apex_rms_norm = None


class _WithoutExtraState:
    """megatron-core's linears save an ``_extra_state: None`` entry for Transformer Engine, which we never have: the
    state dict (what checkpoints and conversion read) holds weights only. Loading needs nothing: megatron-core's own
    load hook supplies the missing entry."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        destination.pop(prefix + "_extra_state", None)


class ColumnLinear(_WithoutExtraState, ColumnParallelLinear):
    """y = x W^T with W [out, in] split by rows over tensor-parallel ranks (each rank: out / tp outputs)."""

    def forward(self, x):
        return super().forward(x)[0]


class RowLinear(_WithoutExtraState, RowParallelLinear):
    """y = x W^T with W [out, in] split by columns (each rank: in / tp inputs), outputs all-reduced over TP."""

    def forward(self, x):
        return super().forward(x)[0]

    def _forward_impl(self, *args, **kwargs):
        # megatron-core 0.16's RowParallelLinear hands its matmul tp_group=None, which then warns on every call: a
        # flood of messages, and a graph break in every compiled block. The layer's own group is what it means.
        return super()._forward_impl(*args, **{**kwargs, "tp_group": self.tp_group})


class FusedRMSNorm(RMSNorm):
    """``block.RMSNorm`` in the model's parameter dtype, through apex's fused kernel on a GPU when installed."""

    def __init__(self, dim: int, eps: float, shared, dtype: torch.dtype):
        super().__init__(dim, eps, shared)
        self.weight.data = self.weight.data.to(dtype)

    def forward(self, x):
        if _apex_rms_norm is not None and x.is_cuda and x.numel():
            w = self.shared(self.weight)
            return _apex_rms_norm(x, w, w.shape, self.eps)
        return super().forward(x)


def column(args: "ModelArgs", layout: "Layout", n_in: int, n_out: int, init=None) -> ColumnLinear:
    return ColumnLinear(n_in, n_out, config=args.megatron_config(layout.tp, layout.pp),
                        init_method=init or args.init_method(), bias=False, gather_output=False,
                        tp_group=layout.tp_group)


def row(args: "ModelArgs", layout: "Layout", n_in: int, n_out: int) -> RowLinear:
    return RowLinear(n_in, n_out, config=args.megatron_config(layout.tp, layout.pp),
                     init_method=args.output_init_method(), bias=False, input_is_parallel=True,
                     skip_bias_add=False, tp_group=layout.tp_group)


def linears(args: "ModelArgs", layout: "Layout") -> Linears:
    """The spec of a training rank: megatron-core's parallel linears over ``layout``'s tensor group."""
    group = layout.tp_group if layout.tp > 1 else None
    return Linears(
        column=lambda n_in, n_out: column(args, layout, n_in, n_out),
        row=lambda n_in, n_out: row(args, layout, n_in, n_out),
        norm=lambda dim, eps, shared: FusedRMSNorm(dim, eps, shared, dtype=args.torch_dtype),
        tp=layout.tp,
        shared=(lambda w: copy_to_tensor_model_parallel_region(w, group=group)) if group is not None else
        (lambda w: w))


def block(args: "ModelArgs", layout: "Layout", layer: int) -> Block:
    """Block ``layer`` of a model of ``args`` on this rank."""
    return Block(args.block_shape, linears(args, layout), layer)


def compile_blocks(blocks) -> None:
    """Regional compilation (torchtitan's ``apply_compile``): each block compiled in place, one graph per block
    reused by every layer, element-wise work fused by Inductor. In place (``Module.compile``), so parameter names
    and checkpoints are those of the eager model. Shapes are marked dynamic from the start: the tokens per modality
    change every micro-batch."""
    for b in blocks:
        b.compile(dynamic=True)
