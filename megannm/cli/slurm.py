"""``megannm stage``: a recipe chain on Slurm (submit, status, cancel); and the check ``slurm/train.sbatch`` runs
first, ``python -m megannm.cli.slurm RECIPE [key=value ...]``: does this job's allocation hold the recipe?"""
from __future__ import annotations

import argparse
import os
import sys


def stage(argv: list[str]) -> int:
    from megannm.slurm import SlurmError, cancel, status, submit
    if argv and argv[0] in ("status", "cancel"):
        p = argparse.ArgumentParser(prog=f"megannm stage {argv[0]}", description={
            "status": "Show the state of every stage (job) of a submitted chain.",
            "cancel": "Cancel every stage (job) of a submitted chain that is still pending or running."}[argv[0]])
        p.add_argument("run", help="run folder (holds stages.json)")
        a = p.parse_args(argv[1:])
        command = lambda: (status if argv[0] == "status" else cancel)(a.run)  # noqa: E731
    else:
        p = argparse.ArgumentParser(prog="megannm stage", description="Submit a recipe chain to Slurm: one job per "
                                    "stage, each after the previous one succeeded, each from its checkpoint.",
                                    epilog="also: megannm stage status RUN | megannm stage cancel RUN")
        p.add_argument("chain", help="chain YAML (stages: recipe, overrides, slurm resources)")
        p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
        p.add_argument("--run-dir", default=None, help="run folder (default: the chain's run_dir, or runs/<name>)")
        a = p.parse_args(argv)
        command = lambda: submit(a.chain, a.run_dir, a.dry_run)  # noqa: E731
    try:
        command()
    except SlurmError as e:
        print(f"megannm stage: error: {e}", file=sys.stderr)
        return 1
    return 0


def allocation(argv: list[str]) -> int:
    """``python -m megannm.cli.slurm RECIPE [key=value ...]``: exit 2 with one line when the job cannot hold it."""
    args = [a for a in argv if a != "--resume"]
    if not args:
        print("usage: python -m megannm.cli.slurm RECIPE [key.path=value ...]", file=sys.stderr)
        return 2
    from megannm.slurm import allocation_problem
    problem = allocation_problem(args[0], args[1:], os.environ)
    if problem:
        print(f"megannm: error: {problem}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(allocation(sys.argv[1:]))
