"""Measured peak memory of small training runs, for the memory model of ``megannm plan`` (tests/test_plan.py).

usage: python memory_cases.py OUT DATA CASE [CASE ...]   (under torchrun, or alone)

Each case builds the Trainer of ``recipe(CASE)`` and makes ``STEPS`` optimizer steps (no evaluation, no save).
Every rank measures its own peak resident memory above what it held before building (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``, minus ``VmRSS`` then) and writes OUT/<case>.rank<r>.json. Run it with
``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed tensors to the system at once: resident memory then
follows the live tensors instead of what the allocator keeps cached, and cases in one process do not see each
other's garbage.
"""
import gc
import json
import os
import sys
from pathlib import Path

STEPS = 2

# case -> (layout and precision, shape): model states dominate some, activations others, so both parts are checked
CASES = {
    "z0": {"zero": 0},
    "z1_ckpt": {"zero": 1, "ckpt": True, "micro": 4},
    "bf16_z1": {"zero": 1, "precision": "bf16"},
    "tp2": {"tp": 2, "zero": 1},
    "pp2": {"pp": 2, "zero": 1, "global": 8},
    "dp2": {"zero": 1, "world": 2, "global": 8},
}


WARMUP = {"zero": 1, "hidden": 32}  # run first, not measured: what a process allocates once (~25 MiB) is no case's


def recipe_dict(case: str, data: str, out: str = "/tmp") -> dict:
    c = CASES.get(case, WARMUP)
    return {
        "name": case, "seed": 3, "precision": c.get("precision", "fp32"),
        "model": {"hidden_size": c.get("hidden", 256), "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                  "ffn_hidden_size": 768, "mot": True, "max_seq_len": 256, "z_loss": 1e-4},
        "parallel": {"tensor_parallel": c.get("tp", 1), "pipeline_parallel": c.get("pp", 1),
                     "zero_stage": c["zero"], "activation_checkpointing": c.get("ckpt", False)},
        "data": {"train": [{"path": f"{data}/train"}], "seq_len": 256, "micro_batch_size": c.get("micro", 2),
                 "global_batch_size": c.get("global", 2 * c.get("micro", 2)), "pack": True},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
        "schedule": {"train_steps": STEPS, "warmup_steps": 0},
        "logging": {"dir": f"{out}/{case}", "progress_bar": False, "tensorboard": False},
    }


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS: resident now; VmHWM: its peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(case: str, data: str, out: Path, warmup: bool = False) -> None:
    from megannm import parallel
    from megannm.config import recipe_from_dict
    from megannm.stage import build_trainer
    world = int(os.environ.get("WORLD_SIZE", 1))
    r = recipe_from_dict(recipe_dict(case, data, str(out)), source=case, world_size=world)
    layout = parallel.init_parallel(r.parallel.tensor_parallel, r.parallel.pipeline_parallel)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    trainer = build_trainer(r, layout, source=case)
    built = _status("VmRSS") - base
    batches = trainer.phase.train_batches(0)
    for _ in range(STEPS):
        trainer.train_step(batches)
    peak = _status("VmHWM") - base
    if not warmup:
        (out / f"{case}.rank{layout.rank}.json").write_text(json.dumps(
            {"case": case, "rank": layout.rank, "pp_rank": layout.pp_rank, "built": built, "peak": peak}))
    del trainer, batches
    gc.collect()


def main():
    out, data = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    from megannm import parallel
    try:
        measure("warmup", data, out, warmup=True)
        for case in sys.argv[3:]:
            measure(case, data, out)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
