"""Named sums that a step accumulates over micro-batches and reduces over ranks in one collective.

A phase's ``loss`` returns its micro-batch's contribution as ``Stats`` (sums, never means: token counts, summed
losses, numbers of pairs), the Trainer adds them over the step's micro-batches and updates, and one all-reduce over
the data-parallel group turns every rank's sums into the global ones; the phase's ``summarize`` then divides. Every
rank must add the same keys (they do: every rank runs the same code on its own data).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from megannm import parallel

Number = Union[float, int, torch.Tensor]


class Stats:
    def __init__(self, **sums: Number):
        self.sums: dict[str, Number] = {}
        for k, x in sums.items():
            self.add(k, x)

    def add(self, key: str, x: Number) -> "Stats":
        x = x.detach().double() if torch.is_tensor(x) else float(x)
        self.sums[key] = self.sums[key] + x if key in self.sums else x
        return self

    def __iadd__(self, other: "Stats") -> "Stats":
        for k, x in other.sums.items():
            self.add(k, x)
        return self

    def __bool__(self) -> bool:
        return bool(self.sums)

    def zeros(self) -> "Stats":
        """The same keys, every sum 0 (what a rank without the data contributes to a collective)."""
        return Stats(**{k: 0.0 for k in self.sums})

    def _vector(self, device) -> tuple[list[str], torch.Tensor]:
        keys = sorted(self.sums)
        vals = [self.sums[k].to(device).reshape(()) if torch.is_tensor(self.sums[k])
                else torch.tensor(self.sums[k], dtype=torch.float64, device=device) for k in keys]
        vec = torch.stack(vals) if vals else torch.zeros(0, dtype=torch.float64, device=device)
        return keys, vec

    def reduce(self, group, device: Optional[torch.device] = None) -> dict[str, float]:
        """The sums over every rank of ``group`` (None = the world): one all-reduce, one copy to the host."""
        keys, vec = self._vector(device or parallel.device())
        parallel.all_reduce(vec, group=group)
        return dict(zip(keys, vec.cpu().tolist()))

    def broadcast(self, group, src: int) -> "Stats":
        """Every rank of ``group`` gets the sums of its ``src``-th rank (the same keys everywhere)."""
        keys, vec = self._vector(parallel.device())
        parallel.broadcast(vec, group=group, src=src)
        return Stats(**dict(zip(keys, vec)))
