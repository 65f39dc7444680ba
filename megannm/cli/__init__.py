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
  serve          an OpenAI-compatible HTTP server (chat with pictures in and out, completions, images)

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
    "serve": ("serve", "serve"),
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
        code = getattr(e, "exit_code", 2 if isinstance(e, USER_ERRORS) else _os_fault(e))
        if not isinstance(code, int) or os.environ.get("MEGANNM_TRACEBACK") == "1":
            record_for_launcher(None, e)  # a bug: its traceback is what the launcher's summary should show
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if type(e) in (OSError, PermissionError) and e.strerror:  # "[Errno 28] ...: 'path'" -> "path: ..."
            msg = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        if isinstance(e, KeyError):
            msg = msg.strip("'\"")
        line = f"megannm {cmd}: error: {msg}"
        if not getattr(e, "silent", False):  # every rank of a run raises it; one prints
            print(line, file=sys.stderr)
        record_for_launcher(line, e, code, later=bool(getattr(e, "silent", False)))
        return code


def _os_fault(e: BaseException):
    """An OS error no command turned into its own line: a full disk or an I/O error is the machine's fault (1), a
    path this user may not read or write the input's (2); anything else stays a bug (None)."""
    import errno
    if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EROFS):
        return 2
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
        return 1
    return None


def record_for_launcher(line: str | None, error: BaseException, code: int = 1, later: bool = False) -> None:
    """Under torchrun (torch.distributed.elastic), write this rank's failure into the error file the agent names in
    ``TORCHELASTIC_ERROR_FILE``, so that torchrun's failure summary reports megannm's one line (and the rank's exit
    code) as the root cause instead of "To enable traceback see ...". The file is the agent's documented JSON
    (``ProcessFailure`` reads ``message.message`` and ``message.extraInfo``); ``line`` None: an unexpected error,
    recorded with its traceback by torch's own ``ErrorHandler``. The agent reports the failure of the earliest
    timestamp (whole seconds) as the root cause: a rank whose error is silent (``later``: another rank says why)
    records its line one second later, so that the rank that says why is the one reported."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        if line is None:
            from megannm.parallel import record_launcher_exception
            record_launcher_exception(error)
            return
        import json
        import time
        when = int(time.time()) + (1 if later else 0)
        data = {"message": {"message": line, "errorCode": code, "extraInfo": {"timestamp": str(when)}}}
        with open(path, "w") as f:  # the agent reads it only after this process has exited
            json.dump(data, f)
    except OSError:  # the summary then says what it says without us; the line is on stderr anyway
        pass
