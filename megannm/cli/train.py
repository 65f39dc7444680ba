"""``megannm train``, ``megannm check`` and ``megannm estimate``: a recipe run, validated, or sized beforehand."""
from __future__ import annotations

import argparse
import json
import os

from megannm.cli.options import float_in, int_at_least


def train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm train", description="Train one recipe stage: in this process alone, or "
                                "on every rank under torchrun, deepspeed, srun or mpirun (the launcher is detected).")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (YAML scalars)")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint.dir>/latest if present")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--verbose", action="store_true", help="keep the libraries' warnings (DeepSpeed, apex, ...)")
    a = p.parse_intermixed_args(argv)
    from megannm.config import load_recipe
    from megannm.parallel import discover_launch
    info = discover_launch()
    recipe = load_recipe(a.recipe, a.overrides, world_size=info.world_size)
    from megannm.phases import check_phase
    check_phase(recipe, a.recipe)  # a registered phase kind and its options, before any process group starts
    # One CPU thread per rank when several share a node, unless the user chose: torch is already imported here, so
    # the environment variable alone would come too late for this process (its children read it).
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1" if info.world_size > 1 else str(os.cpu_count() or 1))
    import torch
    torch.set_num_threads(max(1, int(threads)))
    from megannm.stage import run_stage
    return run_stage(recipe, source=a.recipe, resume=a.resume)


def check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm check", description="Validate a recipe (and a world size) without "
                                                                  "starting anything.")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=int_at_least(1), default=None,
                   help="devices (ranks) the recipe will run on (default: parallel.world_size)")
    a = p.parse_intermixed_args(argv)  # overrides before or after --world-size, as train takes them
    from megannm.config import load_recipe
    r = load_recipe(a.recipe, a.overrides, world_size=a.world_size)
    from megannm.phases import check_phase
    check_phase(r, a.recipe)
    print(f"{a.recipe}: ok ({r.name}: {r.model.num_layers} layers, hidden {r.model.hidden_size}, "
          f"{'MoT' if r.model.mot else 'dense'}, tp {r.parallel.tensor_parallel}, pp {r.parallel.pipeline_parallel}, "
          f"zero {r.parallel.zero_stage})")
    return 0


def estimate(argv: list[str]) -> int:
    from megannm.estimate import DEVICES, format_estimate, estimate_recipe
    ap = argparse.ArgumentParser(prog="megannm estimate", description="Parameters, FLOPs, per-GPU memory and speed "
                                 "of a recipe at a world size, before asking for the GPUs (also: megannm plan).")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key.path=value overrides")
    ap.add_argument("--world-size", type=int_at_least(1), required=True, help="devices (ranks) in all")
    ap.add_argument("--gpu", default="h100", choices=[k for k in DEVICES if k != "cpu"])
    ap.add_argument("--mfu", type=float_in(0, 1, low_open=True), default=0.4,
                    help="model-FLOPs utilisation the step time assumes, in (0, 1]")
    ap.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    a = ap.parse_intermixed_args(argv)
    from megannm.config import load_recipe
    recipe = load_recipe(a.recipe, a.overrides)
    est = estimate_recipe(recipe, a.world_size, a.gpu, mfu=a.mfu, source=a.recipe)
    print(json.dumps(est.to_dict()) if a.json else format_estimate(est))
    return 0
