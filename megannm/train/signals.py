"""Stopping cleanly: on SIGUSR1/SIGTERM (Slurm's ``--signal``, a requeue, a scancel) or Ctrl-C (SIGINT), finish the
step, save, exit.

The handlers only record the signal; the Trainer folds ``code()`` into its one all-reduce per step, so every rank
agrees on the step at which to stop and no rank leaves a collective half-way. A preemption exits with
``EXIT_PREEMPTED`` (the batch script requeues the job on it); Ctrl-C exits with ``EXIT_INTERRUPTED`` (the shell's
128 + SIGINT: a person stopped it, do not requeue). The first Ctrl-C restores the default action, so a second one
ends the process at once, unsaved, even from inside a long step.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

EXIT_PREEMPTED = 124  # distinct exit code: "saved after a preemption signal; requeue me"
EXIT_INTERRUPTED = 130  # saved after Ctrl-C: 128 + SIGINT, as a shell reports an interrupted command

PREEMPT, INTERRUPT = 1, 2  # what code() returns; the larger wins when ranks disagree
_received: list[int] = []


def _handler(signum, frame):
    _received.append(signum)
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
        print("megannm: Ctrl-C: saving after this step, then exiting (Ctrl-C again to stop at once, unsaved)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def installed(signals=(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)):
    """The handlers for the duration of a run; the previous ones come back afterwards (a process may run several
    stages, and a test process must get its own Ctrl-C back)."""
    _received.clear()
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def code() -> int:
    """This rank's request: 0 (none), PREEMPT or INTERRUPT (a Ctrl-C among the signals received)."""
    if not _received:
        return 0
    return INTERRUPT if signal.SIGINT in _received else PREEMPT


def received() -> str | None:
    return signal.Signals(_received[0]).name if _received else None


def exit_code(agreed: int) -> int:
    """The process exit code for the agreed request (``code()`` maximised over the ranks)."""
    return EXIT_INTERRUPTED if agreed >= INTERRUPT else EXIT_PREEMPTED
