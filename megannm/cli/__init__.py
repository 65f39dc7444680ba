"""The ``megannm`` command: one function per command parses its arguments and calls the library.

Each module here holds the parsers of one family of commands (``train``: train, check, estimate; ``data``:
tokenizers, preprocess, sample-order; ``generate``: generate, evaluate; ``rl``: pairs, score, reward-server;
``slurm``: stage; ``toy``: demo, selfcheck; ``convert``: convert). ``main`` turns the errors the library raises into
exit codes and one line each. The library never imports this package.
"""
from __future__ import annotations

import importlib
import os
import sys

from megannm.trust import FLAG as TRUST_FLAG
from megannm.trust import trust_code

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, FileExistsError, NotADirectoryError)

HELP = """\
megannm: train native multimodal models, one transformer over interleaved text and image tokens (dense or
Mixture-of-Transformers), with megatron-core tensor parallelism and DeepSpeed pipeline parallelism and ZeRO, from
your own records to a Hugging Face checkpoint.

usage: megannm [--verbose] [--trust-code] COMMAND [options]      megannm COMMAND --help: that command's options

getting started:
  demo           build a small world of shapes and captions, train the toy recipe chain on the CPU and evaluate it
                 (no GPU, cluster or download needed)

your data:
  tokenizers     make a tokenizers folder from your records (text BPE + image tokenizer); train an image tokenizer
  preprocess     tokenise records (JSONL, WebDataset, Energon, Parquet, Hugging Face) into zstd token shards
  sample-order   build a recipe's sample order (each data set's epochs, packed) before training starts

training:
  check          validate a recipe (and a world size) without starting anything
  estimate       parameters, FLOPs, per-GPU memory and step time of a recipe at a world size (alias: plan)
  train          run one recipe stage (alone, or under torchrun / deepspeed / srun / mpirun)
  stage          submit a recipe chain to Slurm, one job per stage; its status; cancel it

checkpoints:
  convert        DeepSpeed <-> consolidated safetensors <-> Hugging Face; re-shard tensor / pipeline parallelism
  generate       sample captions for pictures, or pictures for captions, from a checkpoint
  evaluate       a registered benchmark (e.g. toy), or losses and caption exact match over your own records

reinforcement learning:
  pairs          DPO preference pairs: two sampled answers per prompt, ranked by verifiable rewards
  score          mean verifiable reward of a checkpoint's answers; win rate against another checkpoint
  reward-server  serve a registered reward over HTTP, for recipes that name a reward by its URL

this machine:
  selfcheck      bf16 steps of every phase, sampling and export (and on a GPU: memory and speed), one line each

options:
  --verbose      show the libraries' own warnings and notices (DeepSpeed, megatron-core, transformers), hidden
                 otherwise
  --trust-code   (with any command) load checkpoints and tokenizer folders even where that runs code they name:
                 pickled objects beyond tensors, unregistered image tokenizer kinds; refused otherwise
                 (docs/security.md)

A mistake in the input exits with code 2 and one line naming the file, key or parameter at fault; a failed save exits
1, a diverged run 3, a preempted one 124 (saved; requeue it) and an interrupted one (Ctrl-C) 130. docs/errors.md
lists every message."""

# command -> (module of this package, function); the module is imported only when its command runs
COMMANDS = {
    "demo": ("toy", "demo"),
    "tokenizers": ("data", "tokenizers"),
    "preprocess": ("data", "preprocess"),
    "sample-order": ("data", "sample_order"),
    "check": ("train", "check"),
    "estimate": ("train", "estimate"),
    "train": ("train", "train"),
    "stage": ("slurm", "stage"),
    "convert": ("convert", "convert"),
    "generate": ("generate", "generate"),
    "evaluate": ("generate", "evaluate"),
    "pairs": ("rl", "pairs"),
    "score": ("rl", "score"),
    "reward-server": ("rl", "reward_server"),
    "selfcheck": ("toy", "selfcheck"),
}
ALIASES = {"plan": "estimate"}  # the names commands had before


def command(name: str):
    """The function of command ``name`` (an alias resolved): ``f(argv) -> exit code``."""
    module, func = COMMANDS[ALIASES.get(name, name)]
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    end = argv.index("--") if "--" in argv else len(argv)  # --trust-code: before or after the command, not after --
    trust, argv = TRUST_FLAG in argv[:end], [a for a in argv[:end] if a != TRUST_FLAG] + argv[end:]
    verbose = False
    while argv and argv[0] in ("--verbose", "-v"):
        verbose, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS and cmd not in ALIASES:
        print(f"megannm: unknown command {cmd!r} (expected one of {', '.join(COMMANDS)}; megannm --help says what "
              f"each does)", file=sys.stderr)
        return 2
    from megannm.cli.quiet import quiet_library_warnings
    # before any library is imported: their import-time notices are what this hides (a command's own --verbose too)
    quiet_library_warnings(verbose or "--verbose" in rest[:rest.index("--") if "--" in rest else len(rest)])
    try:
        with trust_code(trust):
            return command(cmd)(rest) or 0
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
