"""Training logs: a JSONL metrics file, TensorBoard event files and a progress bar on an interactive terminal.

Only the rank that owns the log (global rank 0) writes; every other rank gets a logger that drops everything, so
callers never branch on rank.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 progress_bar: Optional[bool] = None, total_steps: int = 0, initial_step: int = 0,
                 description: str = "train"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if progress_bar is None:
            progress_bar = sys.stderr.isatty()
        if progress_bar:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, desc=description, dynamic_ncols=True,
                             leave=True)

    def log(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": prefix, "time": round(time.time(), 3)}
        record.update({k: (_json_number(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()
        if self._bar is not None and prefix == "train":
            short = {k: metrics[k] for k in ("loss", "text_loss", "image_loss", "lr", "tokens_per_s") if k in metrics}
            self._bar.set_postfix({k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in short.items()})

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def event(self, step: int, what: str, **info) -> None:
        """A non-scalar event (checkpoint saved, resumed, preempted) in the JSONL file."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "event": what, "time": round(time.time(), 3), **info}) + "\n")
        if self._bar is not None:
            self._bar.write(f"[step {step}] {what} {' '.join(f'{k}={v}' for k, v in info.items())}")
        elif os.environ.get("MEGANNM_QUIET") != "1":
            print(f"[step {step}] {what} {' '.join(f'{k}={v}' for k, v in info.items())}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _json_number(v: float):
    """A float, or "nan" / "inf" / "-inf" as a string: a diverged step's line stays strict JSON (jq, pandas)."""
    v = float(v)
    return v if math.isfinite(v) else str(v)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
