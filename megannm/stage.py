"""One recipe stage on this rank, start to finish: what ``megannm train`` (and the demo's chain) call.

Initialises the process groups (``parallel``), builds the recipe's phase from the registry and the Trainer, runs
it, and always shuts the groups down; returns the process exit code (0, ``signals.EXIT_PREEMPTED`` or
``signals.EXIT_INTERRUPTED``). A run that cannot go on raises one line: bad input (``ValueError``s: exit 2), a
failed save (``train.checkpoint.SaveError``: exit 1), a divergence (``train.guard.Diverged``: exit 3).
"""
from __future__ import annotations

from megannm import parallel
from megannm.config import Recipe
from megannm.phases import build_phase
from megannm.train.loop import Trainer, load_vocab


def run_stage(recipe: Recipe, source: str = "recipe", resume: bool = False) -> int:
    p = recipe.parallel
    layout = parallel.init_parallel(p.tensor_parallel, p.pipeline_parallel, timeout_s=60 * p.timeout_minutes)
    try:
        result = build_trainer(recipe, layout, source).run(resume=resume or recipe.checkpoint.resume)
    finally:
        parallel.shutdown()
    return int(result.get("exit_code", 0))


def build_trainer(recipe: Recipe, layout, source: str = "recipe") -> Trainer:
    """The Trainer of ``recipe`` on an initialised layout: its vocabulary, its phase from the registry."""
    vocab = load_vocab(recipe, source)
    return Trainer(recipe, layout, build_phase(recipe, layout, vocab, source), vocab, source)
