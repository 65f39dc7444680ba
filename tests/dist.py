"""Start real multi-process runs for tests: torchrun, the deepspeed launcher, or mpirun, on gloo over localhost."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MEGANNM_QUIET": "1", "PYTHONUNBUFFERED": "1",
                "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions")})
    # a test process that initialised its own world of one (init_parallel) exported these; children must not
    # inherit them (a reused MASTER_PORT is EADDRINUSE, a stale LOCAL_RANK a wrong device)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def command(args: list[str], nproc: int, launcher: str = "torchrun") -> list[str]:
    """``args`` is what follows ``python``: e.g. ["-m", "megannm", "train", "r.yaml"]."""
    port = free_port()
    if nproc == 1 and launcher == "single":
        return [sys.executable, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
    if launcher == "deepspeed":
        # The launcher wants a script path; `-m` is passed through as --module.
        if args[0] == "-m":
            return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), "--no_local_rank",
                    "--module", *args[1:]]
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), "--no_local_rank", *args]
    if launcher == "mpirun":
        return ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc),
                "-x", f"MASTER_PORT={port}", "-x", "MASTER_ADDR=127.0.0.1", sys.executable, *args]
    raise ValueError(launcher)


def run(args: list[str], nproc: int = 2, launcher: str = "torchrun", timeout: int = 300, check: bool = True,
        **env) -> subprocess.CompletedProcess:
    cmd = command(args, nproc, launcher)
    out = subprocess.run(cmd, cwd=REPO, env=base_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n--- stdout\n{out.stdout[-4000:]}\n"
                             f"--- stderr\n{out.stderr[-6000:]}")
    return out
