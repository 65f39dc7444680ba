"""Continuous images: latent patches in, velocities out, and the rectified-flow objective (Transfusion, BAGEL).

An image is a span of latent slots in the one token stream, ``<boi> [latent] x n <eoi>``: each slot holds one
patch of an autoencoder's latent (``C`` numbers, e.g. a 2 x 2 patch of a 16-channel VAE latent: C = 64). The slot's
id is the vocabulary's image id, so routing (MoT's image weights), the document mask and every sequence tool treat
it as an image token; its hidden state is the id's embedding plus the patch's projection and the timestep's
embedding. The head reads a velocity (``C`` numbers) at the same slot, through the image modality's final norm.

Rectified flow, with t = 0 the clean latent and t = 1 pure noise (the SD3 / FLUX convention)::

    x_t = (1 - t) x_0 + t * noise          v = noise - x_0          loss = mean over slots of |v_pred - v|^2

Timesteps are drawn logit-normal (t = sigmoid(n), n ~ N(0, 1): most of the weight on the middle of the path, as
SD3 found best). An image the sequence generates is noised (its slots carry the loss); an image the sequence reads
(a picture to caption) is clean, t = 0. An image that is both (interleaved generation, read by later text) is read
noised, Transfusion's single copy: BAGEL's clean second copy doubles the image's slots for one case; see
docs/architecture.md.

Attention is causal over the sequence and bidirectional inside an image (``image_spans``): every slot of an image
sees every other slot of the same image, as a diffusion transformer sees the whole picture it denoises.

This module imports torch only. The projections are plain linears replicated on every tensor-parallel rank: their
inputs (a patch, the hidden state after the head's norm) are the same on every rank, so are their gradients, and
they are tiny (C x D) beside a block.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FREQUENCIES = 256  # sinusoidal features of the timestep before its MLP (DiT's and BAGEL's choice)


def timestep_features(t: torch.Tensor, dim: int = FREQUENCIES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [..., dim] of timesteps t [...] in [0, 1] (scaled by 1000, the range the frequencies were
    chosen for), in fp32 whatever t's dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (t.float() * 1000.0)[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class LatentInput(nn.Module):
    """A latent patch and its timestep -> a hidden-state offset [..., D]: ``patch(x_t) + time(t)``."""

    def __init__(self, channels: int, hidden: int, std: float):
        super().__init__()
        self.patch = nn.Linear(channels, hidden)
        self.time = nn.Sequential(nn.Linear(FREQUENCIES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        for lin in (self.patch, self.time[0], self.time[2]):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self.patch.weight.dtype
        return self.patch(x.to(dtype)) + self.time(timestep_features(t).to(dtype))


class VelocityHead(nn.Module):
    """The hidden state after the head's (image) norm -> the predicted velocity [..., C]. Zero at initialisation, so
    the first steps start from the trivial prediction instead of noise (as DiT's final layer)."""

    def __init__(self, hidden: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(hidden, channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def sample_timesteps(shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Logit-normal timesteps in (0, 1)."""
    return torch.sigmoid(torch.randn(shape, generator=generator, device=device))


def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int
          ) -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 1 (``noise``) to t = 0 in ``steps`` equal Euler steps; t is a 0-d
    tensor on the noise's device (no host sync)."""
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    x = noise
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * velocity(x, ts[i]).to(x.dtype)
    return x


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noised latent x_t and the velocity target ``noise - x0``; t [...] broadcasts over the channels."""
    tt = t[..., None].to(x0.dtype)
    return (1 - tt) * x0 + tt * noise, noise - x0


def flow_arguments(batch: dict) -> dict:
    """A micro-batch's continuous-image tensors (clean ``latents`` [B, S, C] at the image slots, ``noise``
    [B, S, C], ``timesteps`` [B, S], ``flow_mask`` [B, S]: 1 at the slots of the images it generates) -> the model's
    keyword arguments: the noised latents, the timesteps, the velocity target and the mask. {} for a batch without
    images in latents (discrete images, or text only)."""
    if "latents" not in batch:
        return {}
    xt, target = interpolate(batch["latents"], batch["noise"], batch["timesteps"])
    return {"latents": xt, "timesteps": batch["timesteps"], "flow_target": target, "flow_mask": batch["flow_mask"]}


def flow_loss(velocity: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared velocity error over the slots where ``mask`` [B, S] is 1 (each slot's error averaged over its
    channels, in fp32). Returns (loss, number of slots)."""
    per_slot = F.mse_loss(velocity.float(), target.float(), reduction="none").mean(-1)
    m = mask.float()
    slots = m.sum()
    return (per_slot * m).sum() / slots.clamp(min=1.0), slots


def image_spans(modality: torch.Tensor, document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] ids of the image each token belongs to (a run of consecutive image tokens in one document), -1 for
    text: computed on the device from what travels between pipeline stages, no host sync."""
    img = modality.bool()
    prev_img = F.pad(img[:, :-1], (1, 0), value=False)
    prev_doc = F.pad(document_ids[:, :-1], (1, 0), value=-1)
    starts = img & (~prev_img | (document_ids != prev_doc))
    return torch.where(img, starts.long().cumsum(dim=1) - 1, torch.full_like(document_ids, -1))
