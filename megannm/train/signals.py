"""Preemption: on SIGUSR1/SIGTERM (Slurm's ``--signal``, a requeue, a scancel) finish the step, save, exit.

The handler only sets a flag; the loop asks ``preempted()`` once per step, and every rank agrees (an all-reduce of
the flag), so no rank leaves a collective half-way.
"""
from __future__ import annotations

import signal

import torch

from megannm import parallel

EXIT_PREEMPTED = 124  # distinct exit code: "saved after a preemption signal; requeue me"

_flag = {"signal": None}


def _handler(signum, frame):
    _flag["signal"] = signum


def install(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    for s in signals:
        signal.signal(s, _handler)


def preempted() -> bool:
    """True on every rank when any rank received a preemption signal."""
    t = torch.tensor([1.0 if _flag["signal"] is not None else 0.0], device=parallel.device())
    parallel.all_reduce(t, op="max")
    return bool(t.item() > 0)


def received() -> str | None:
    s = _flag["signal"]
    return signal.Signals(s).name if s is not None else None
