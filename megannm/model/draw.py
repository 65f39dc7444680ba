"""Drawing continuous images: the ODE sampler over a KV-cached prompt, with classifier-free guidance.

The prompt (``... <boi>``) is run once into a KV cache. Each of ``steps`` Euler steps then runs only the image's
slots over that cached prefix (bidirectional among themselves, causal to the prompt; the cache is rewound after each
step, so nothing of one step stays for the next), reads their velocities and moves the latents from noise (t = 1)
towards the picture (t = 0). With guidance, the unconditional prompt (``<bos> <boi>``, what caption dropout trained)
runs beside in a cache of its own and the velocity is ``uncond + scale * (cond - uncond)``.
"""
from __future__ import annotations

from typing import Optional

import torch

from megannm.model.latents import euler


@torch.no_grad()
def draw_latents(model, prompts: torch.Tensor, slots: int, steps: int = 25, cfg_scale: float = 1.0,
                 uncond: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Latents [B, slots, C] of the pictures that ``prompts`` [B, P] (each ending in ``<boi>``) ask for.
    ``uncond`` [B, U]: the unconditional prompts (needed when ``cfg_scale != 1``); ``generator`` draws the starting
    noise (on the prompts' device)."""
    args = model.args
    b, dev = prompts.shape[0], prompts.device
    c = args.latent_channels
    guided = cfg_scale != 1.0
    if guided and uncond is None:
        raise ValueError("draw_latents: classifier-free guidance needs the unconditional prompts")
    dtype = next(model.parameters()).dtype

    def prefill(ids: torch.Tensor):
        cache = model.new_cache(b, ids.shape[1] + slots)
        model(ids, cache=cache, latents=torch.zeros(*ids.shape, c, device=dev, dtype=dtype),
              timesteps=torch.zeros(ids.shape, device=dev))
        return cache

    caches = [prefill(prompts)] + ([prefill(uncond)] if guided else [])
    starts = [cache.length for cache in caches]
    ids = torch.full((b, slots), args.image_start, device=dev, dtype=prompts.dtype)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for cache, start in zip(caches, starts):
            cache.rewind(start)
            out.append(model(ids, cache=cache, latents=x.to(dtype), timesteps=t.expand(b, slots))[1].float())
        return out[0] if not guided else out[1] + cfg_scale * (out[0] - out[1])

    noise = torch.randn(b, slots, c, generator=generator, device=dev)
    return euler(velocity, noise, steps)
