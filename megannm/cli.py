"""The ``megannm`` command: argument parsing only; every command calls into the library.

    megannm demo        the embedded default: build the toy world, train the toy chain on the CPU, evaluate it
    megannm tokenizers  your records -> a tokenizers folder (build); train an image tokenizer on your pictures
    megannm preprocess  JSONL records -> zstd token shards
    megannm train       one recipe stage (under torchrun / deepspeed / srun / mpirun, or a single process)
    megannm stage       submit a recipe chain to Slurm with job dependencies; status; cancel
    megannm plan        parameters, FLOPs, per-GPU memory by part and step time of a recipe at a world size
    megannm convert     DeepSpeed <-> consolidated safetensors <-> Hugging Face; re-shard TP/PP
    megannm generate    sample captions or images from a checkpoint
    megannm evaluate    a registered benchmark (--benchmark, e.g. toy) or losses and exact match over your records
    megannm pairs       DPO preference pairs: two sampled answers per prompt, ranked by verifiable rewards
    megannm score       mean verifiable reward of a checkpoint's samples; win rate against another checkpoint
    megannm reward-server  serve a registered reward over HTTP, for recipes that name a reward by its URL

A user mistake exits with code 2 and one line naming the file, key or parameter at fault; a failed save exits 1,
a diverged run 3, a preempted one 124 (saved; requeue it) and an interrupted one (Ctrl-C) 130. docs/errors.md
lists every message.
"""
from __future__ import annotations

import argparse
import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, FileExistsError, NotADirectoryError)


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm train", description="Train one recipe stage.")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides (YAML scalars)")
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint.dir>/latest if present")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    p.add_argument("--verbose", action="store_true", help="keep the libraries' warnings (DeepSpeed, apex, ...)")
    a = p.parse_intermixed_args(argv)
    from megannm.data.quiet import quiet_library_warnings
    quiet_library_warnings(a.verbose)
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
    from megannm.runner import run
    return run(recipe, source=a.recipe, resume=a.resume)


def _check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm check", description="Validate a recipe (and a world size).")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=int, default=None)
    a = p.parse_args(argv)
    from megannm.config import load_recipe
    r = load_recipe(a.recipe, a.overrides, world_size=a.world_size)
    from megannm.phases import check_phase
    check_phase(r, a.recipe)
    print(f"{a.recipe}: ok ({r.name}: {r.model.num_layers} layers, hidden {r.model.hidden_size}, "
          f"{'MoT' if r.model.mot else 'dense'}, tp {r.parallel.tensor_parallel}, pp {r.parallel.pipeline_parallel}, "
          f"zero {r.parallel.zero_stage})")
    return 0


def _lazy(module: str, func: str = "main"):
    def call(argv: list[str]) -> int:
        import importlib
        return importlib.import_module(module).__dict__[func](argv) or 0
    return call


COMMANDS = {
    "train": _train,
    "check": _check,
    "demo": _lazy("megannm.toy.demo"),
    "tokenizers": _lazy("megannm.data.tokenizers_cli"),
    "preprocess": _lazy("megannm.data.preprocess", "preprocess_main"),
    "stage": _lazy("megannm.slurm"),
    "plan": _lazy("megannm.plan"),
    "convert": _lazy("megannm.convert.cli"),
    "generate": _lazy("megannm.generate"),
    "evaluate": _lazy("megannm.evaluate"),
    "pairs": _lazy("megannm.phases.rl.pairs"),
    "score": _lazy("megannm.phases.rl.score"),
    "reward-server": _lazy("megannm.rewards.server"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"megannm: unknown command {cmd!r} (expected one of {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except KeyboardInterrupt:  # Ctrl-C outside a training step (inside one, the Trainer saves and exits 130)
        print(f"megannm {cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # a user mistake (USER_ERRORS: 2), or a fault that says what failed in one line and carries its own exit
        # code (a failed save: 1, a divergence: 3); anything else is a bug and keeps its traceback
        code = getattr(e, "exit_code", 2 if isinstance(e, USER_ERRORS) else None)
        if not isinstance(code, int) or os.environ.get("MEGANNM_TRACEBACK") == "1":
            raise
        if not getattr(e, "silent", False):  # every rank of a run raises it; one prints
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, KeyError):
                msg = msg.strip("'\"")
            print(f"megannm {cmd}: error: {msg}", file=sys.stderr)
        return code
