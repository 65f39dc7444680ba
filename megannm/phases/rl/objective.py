"""GRPO's objective as pure tensor functions, each tested against a hand computation: group-relative advantages,
per-answer weights of the loss normalisations (token-level as DAPO, sequence-level as the GRPO paper, Dr. GRPO), the
clipped surrogate and the k3 KL estimate."""
from __future__ import annotations

import numpy as np
import torch


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """rewards [P, G] (P prompts, G answers each) -> advantages [P, G]: (r - group mean) / (group std + eps), with
    the sample (unbiased) std; ``scale=False`` leaves r - mean."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def answer_weights(lengths: np.ndarray, max_lengths: np.ndarray, mode: str,
                   keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per answer: the weight of each of its per-token terms, and its share of the mini-batch's normaliser (the
    loss is sum_i w_i sum_t l_t / sum_i share_i). ``token``: w = 1, share = |o|; ``sequence``: w = 1/|o|, share = 1;
    ``dr_grpo``: w = 1/L (L = ``max_lengths``), share = 1. ``keep`` False: weight and share 0 (dynamic sampling)."""
    lengths = np.maximum(np.asarray(lengths, np.float64), 1.0)  # an answer holds at least its stop token
    ones = np.ones_like(lengths)
    if mode == "token":
        w, share = ones, lengths
    elif mode == "sequence":
        w, share = 1.0 / lengths, ones
    elif mode == "dr_grpo":
        w, share = 1.0 / np.asarray(max_lengths, np.float64), ones
    else:
        raise ValueError(f"grpo: unknown loss normalisation {mode!r} (expected token, sequence or dr_grpo)")
    k = ones if keep is None else np.asarray(keep, np.float64)
    return w * k, share * k


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased, GRPO's)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(ratio A, clip(ratio, 1 - low, 1 + high) A), the ratio, and where the clip is active
    (the clipped term is the smaller one, so the token's gradient is zero)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), ratio, (clipped < unclipped)


def token_loss(logp, old_logp, ref_logp, adv, clip_low: float, clip_high: float, kl_coef: float) -> dict:
    """Every per-token term of the objective (tensors shaped like ``logp``); ``ref_logp`` None = no KL term."""
    pg, ratio, clipped = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    return {"loss": pg + kl_coef * kl, "pg": pg, "kl": kl, "ratio": ratio, "clipped": clipped.float()}
