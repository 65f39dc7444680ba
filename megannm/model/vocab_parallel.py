"""Softmax arithmetic over a vocabulary split across tensor-parallel ranks: the one implementation of it.

The head returns vocab-parallel logits [..., V_pad / tp]: rank r holds the rows [r * V_pad / tp, (r + 1) * V_pad / tp)
of the unified vocabulary, and rows >= ``vocab_size`` are padding (added so every shard is equal) that must take
no probability. The loss (``lm_loss``), the log-probs of RL and DPO, and the entropy all start from ``mask_padding``,
then use:

- ``cross_entropy``: -log p(label) AND the log partition log Z (for the z-loss) in one autograd function: one
  all-reduce MAX of the row maxima and one all-reduce SUM of (sum of exponentials, label logit) over the layout's
  tensor group forward, and a backward without communication (each rank owns the gradient of its own slice):
  d logits = softmax * (g_ce + g_lse) - onehot(label) * g_ce. It turns its input into the softmax in place (max,
  shift, exp, sum, scale: no [tokens, vocab] temporary) and the backward scales that softmax in place. (Generated
  kernels that keep the logits and recompute the exponentials in the backward were measured 2x slower on the CPU.)
- ``entropy``: of the model's distribution, without a gradient.

Only the logits of one shard are ever materialised: the full vocabulary never gathers at TP > 1.
"""
from __future__ import annotations

import torch

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


class _CrossEntropy(torch.autograd.Function):
    """(ce, lse) of fp32 vocab-parallel logits [..., V_local] (consumed) and global labels [...]."""

    @staticmethod
    def forward(ctx, x, labels, tp_rank: int, tp_group):
        v_local = x.shape[-1]
        local = labels - tp_rank * v_local
        local = torch.where((local >= 0) & (local < v_local), local, torch.full_like(local, -1))
        shift = parallel.all_reduce(torch.amax(x, dim=-1), group=tp_group, op="max")
        x.sub_(shift[..., None])  # in place: x is consumed
        picked = x.gather(-1, local.clamp(min=0)[..., None]).squeeze(-1) + shift  # the label's logit
        softmax = x.exp_()
        sums = torch.stack([softmax.sum(-1), torch.where(local >= 0, picked, torch.zeros_like(picked))])
        parallel.all_reduce(sums, group=tp_group)
        lse = sums[0].log() + shift
        softmax.div_(sums[0][..., None])
        ctx.save_for_backward(softmax, local)
        return lse - sums[1], lse

    @staticmethod
    def backward(ctx, g_ce, g_lse):
        softmax, local = ctx.saved_tensors
        g_ce = torch.zeros_like(softmax[..., 0]) if g_ce is None else g_ce
        scale = g_ce if g_lse is None else g_ce + g_lse
        grad = softmax.mul_(scale[..., None])  # the saved softmax, scaled in place (used once)
        mine = torch.where(local >= 0, -g_ce, torch.zeros_like(g_ce))  # the label's term, where this rank has it
        grad.scatter_add_(-1, local.clamp(min=0)[..., None], mine[..., None].to(grad.dtype))
        return grad, None, None, None


def cross_entropy(masked: torch.Tensor, labels: torch.Tensor, layout):
    """(-log p(label), log Z) per position [...] from ``mask_padding``'s output, which this CONSUMES (overwritten
    with the softmax); both differentiable."""
    return _CrossEntropy.apply(masked, labels, layout.tp_rank, layout.tp_group)


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
    return -cross_entropy(masked, labels, layout)[0], ent
