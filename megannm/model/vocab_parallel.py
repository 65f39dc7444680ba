"""Softmax arithmetic over a vocabulary split across tensor-parallel ranks: the one implementation of it.

The head returns vocab-parallel logits [..., V_pad / tp]: rank r holds the rows [r * V_pad / tp, (r + 1) * V_pad / tp)
of the unified vocabulary, and rows >= ``vocab_size`` are padding (added so every shard is equal) that must take
no probability. The loss (``lm_loss``), the log-probs of RL and DPO, and the entropy all start from ``mask_padding``,
then use:

- ``cross_entropy``: megatron-core's ``vocab_parallel_cross_entropy`` (its fused, in-place kernel; it takes its
  group from megatron-core's own state, which ``megannm.parallel.init_parallel`` set to the layout's tensor group);
- ``logsumexp``: the log partition (for the z-loss), all-reduce MAX of the shift and SUM of the exponentials over
  the layout's tensor group, differentiable;
- ``entropy``: of the model's distribution, without a gradient.

Only the logits of one shard are ever materialised: the full vocabulary never gathers at TP > 1.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megannm import parallel


def mask_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int, consume: bool = False) -> torch.Tensor:
    """fp32 logits with the TP padding rows at the lowest float: a NEW tensor (the cross entropy below works in
    place), so the caller's logits stay intact; ``consume``: the caller needs them no more (the training loss on the
    head's output), and fp32 logits without padding are used as they are, saving a copy of the largest activation.
    The same loss whatever the padding, i.e. whatever the TP size."""
    v_local = logits.shape[-1]
    offset = tp_rank * v_local
    out = logits.float()
    if offset + v_local > vocab_size:
        ids = torch.arange(v_local, device=logits.device) + offset
        return out.masked_fill(ids >= vocab_size, torch.finfo(torch.float32).min)
    return out.clone() if out is logits and not consume else out


def cross_entropy(masked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log p(label) per position [...] from ``mask_padding``'s output (consumed: overwritten in place)."""
    return vocab_parallel_cross_entropy(masked, labels)


def logsumexp(masked: torch.Tensor, tp_group) -> torch.Tensor:
    """log sum_v exp(logits) over the whole vocabulary, differentiable. The shift is detached (it cancels); the sum
    goes through megatron-core's reduce-from-TP-region (all-reduce forward, identity backward: each rank owns the
    gradient of its own slice)."""
    shift = parallel.all_reduce(masked.max(dim=-1).values.detach(), group=tp_group, op="max")
    total = torch.exp(masked - shift[..., None]).sum(-1)
    if parallel.group_size(tp_group) > 1:
        total = reduce_from_tensor_model_parallel_region(total, group=tp_group)
    return total.log() + shift


@torch.no_grad()
def entropy(masked: torch.Tensor, tp_group) -> torch.Tensor:
    """H = log Z - E_p[z - shift] with Z = sum exp(z - shift), per position, without a gradient."""
    z = masked.detach()
    shift = parallel.all_reduce(z.max(-1).values, group=tp_group, op="max")
    e = torch.exp(z - shift[..., None])
    sums = parallel.all_reduce(torch.stack([e.sum(-1), (e * (z - shift[..., None])).sum(-1)]), group=tp_group)
    return sums[0].log() - sums[1] / sums[0]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, layout, temperature: float = 1.0,
                   with_entropy: bool = False):
    """log p(label) [...] (differentiable) under softmax(logits / temperature), and the entropy (detached) or None."""
    masked = mask_padding(logits.float() / temperature if temperature != 1.0 else logits, vocab_size,
                          layout.tp_rank)
    ent = entropy(masked, layout.tp_group) if with_entropy else None
    return -cross_entropy(masked, labels), ent
