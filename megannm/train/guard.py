"""The divergence guard: a step whose loss or gradient norm is inf/NaN on any rank is caught the step it happens.

Each rank contributes its evidence to the Trainer's one all-reduce (max) over the world per step: whether its own
step sums (the loss and whatever else its phase adds) hold a non-finite value, whether the gradient norm DeepSpeed
computed does (after every update of the step), and that norm. The evidence stays on the device, so the guard adds
no host sync: the all-reduce's one copy to the host is shared with the stop signals and the wall clock.

A step is bad when a rank's loss is not finite, when the gradient norm is not finite (except under fp16, where
DeepSpeed's loss scaler skips such steps by design and lowers its scale: those are only counted as skipped), or,
with ``guard.spike_factor``, when the loss exceeds that many times the median of the last ``spike_window`` good
steps. A bad step is counted and logged; the Trainer saves nothing while the newest step is bad and protects the
last good checkpoint from pruning; ``guard.max_bad_steps`` bad steps in a row stop the run with ``Diverged``.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch

from megannm import parallel
from megannm.train.stats import Stats

EXIT_DIVERGED = 3  # distinct from success (0), bad input (2) and preemption (124): "look at the run before resuming"


class Diverged(RuntimeError):
    """The run stopped on bad steps; one line naming the step, the rank and the last good checkpoint."""
    exit_code = EXIT_DIVERGED


@dataclass
class Verdict:
    bad: bool
    reason: str = ""  # what was wrong, naming the lowest rank that saw it
    grad_norm: Optional[float] = None  # the largest over the step's updates; None when DeepSpeed computes none
    streak: int = 0  # bad steps in a row, this one included
    stop: bool = False


class Guard:
    def __init__(self, cfg, rank: int, world: int, loss_scaled: bool = False):
        self.cfg, self.rank, self.world, self.loss_scaled = cfg, rank, world, loss_scaled
        self.streak = 0
        self.bad_steps = 0  # over the whole run (kept in the checkpoint's metadata)
        self.first: Optional[tuple[int, str]] = None  # (step, reason) of the current streak's first bad step
        self._losses: deque = deque(maxlen=cfg.spike_window)

    def state(self) -> dict:
        return {"bad_steps": self.bad_steps}

    def load_state(self, state: Optional[dict]) -> None:
        self.bad_steps = int((state or {}).get("bad_steps", 0))

    def evidence(self, sums: Stats, grad_norms: list) -> list[torch.Tensor]:
        """This rank's three entries of the step's all-reduce (max), as device scalars: (world - rank) where its
        sums are not finite, else 0; the same for the gradient norm; the norm (inf for NaN, -1 when unknown)."""
        device = parallel.device()
        me = float(self.world - self.rank)  # the max over ranks is then the lowest rank that saw it
        tensors = [v.reshape(()).to(device) for v in sums.sums.values() if torch.is_tensor(v)]
        floats_ok = all(math.isfinite(v) for v in sums.sums.values() if not torch.is_tensor(v))
        finite = torch.stack(tensors).isfinite().all() if tensors else torch.tensor(True, device=device)
        loss_flag = (~finite).double() * me if floats_ok else torch.tensor(me, dtype=torch.float64, device=device)
        norms = [torch.as_tensor(g, dtype=torch.float64).reshape(()).to(device) for g in grad_norms if g is not None]
        if not norms:  # ZeRO-0 computes no norm: a bad update there shows in the next step's loss
            zero = torch.zeros((), dtype=torch.float64, device=device)
            return [loss_flag, zero, zero - 1]
        g = torch.stack(norms)
        norm = torch.nan_to_num(g, nan=math.inf, posinf=math.inf).max()  # (a NaN would not survive a max)
        return [loss_flag, (~g.isfinite().all()).double() * me, norm]

    def judge(self, step: int, agreed: list[float], loss: Optional[float]) -> Verdict:
        """The step's verdict from the reduced evidence (the same on every rank) and its global loss."""
        loss_at, grad_at, norm = agreed
        reasons = []
        if loss_at > 0:
            reasons.append(f"non-finite loss on rank {self.world - int(loss_at)}")
        if grad_at > 0 and not self.loss_scaled:
            reasons.append(f"non-finite gradient norm ({norm:g}) on rank {self.world - int(grad_at)}")
        k, window = self.cfg.spike_factor, self.cfg.spike_window
        finite_loss = loss is not None and math.isfinite(loss)
        if not reasons and k and finite_loss and len(self._losses) == window:
            median = statistics.median(self._losses)
            if median > 0 and loss > k * median:
                reasons.append(f"loss {loss:.4g} above {k:g} x its running median {median:.4g} (guard.spike_factor)")
        grad_norm = norm if norm >= 0 else None
        if not reasons:
            self.streak, self.first = 0, None
            if finite_loss:
                self._losses.append(loss)
            return Verdict(False, grad_norm=grad_norm)
        self.streak += 1
        self.bad_steps += 1
        reason = "; ".join(reasons)
        if self.streak == 1:
            self.first = (step, reason)
        limit = self.cfg.max_bad_steps
        return Verdict(True, reason, grad_norm, self.streak, stop=bool(limit) and self.streak >= limit)

    def stop_message(self, step: int, good, suspect=None, why: Optional[str] = None, fallback=None) -> str:
        """The one line a stopped run prints. ``good``: the newest checkpoint whose weights passed a good step;
        ``suspect``: a newer one, saved just before the first bad step (it holds the weights that step ran on);
        ``why`` defaults to the current streak; ``fallback``: without ``good``, what ``latest`` names now (an
        older checkpoint saved before this run; None: ``latest`` was removed)."""
        if why is None:
            first_step, first_reason = self.first or (step, "?")
            why = (f"{self.streak} bad step{'s' if self.streak > 1 else ''} in a row (guard.max_bad_steps="
                   f"{self.cfg.max_bad_steps}), the first at step {first_step}: {first_reason}")
        if suspect is not None and suspect != good:
            after = f"{suspect.name} after it" if good else str(suspect)
            note = (f"{'latest names it again; ' if good else ''}{after} holds the weights the first bad step ran "
                    f"on")
            if not good:
                note += (f"; latest names {fallback.name}, saved before this run" if fallback is not None else
                         "; latest removed: --resume starts afresh")
        else:
            note = "nothing saved after it" if good else "this run saved no checkpoint"
        return f"diverged at step {step}: {why}; last good checkpoint: {good or 'none'} ({note})"
