"""One recipe stage on this rank, start to finish: what ``megannm train`` (and the demo's chain) call.

Initialises the process groups (``parallel``), builds the recipe's phase from the registry and the Trainer, runs
it, and always shuts the groups down; returns the process exit code (0, or ``signals.EXIT_PREEMPTED``).
"""
from __future__ import annotations

from megannm import parallel
from megannm.config import Recipe
from megannm.phases import build_phase
from megannm.train.loop import Trainer, load_vocab


def run(recipe: Recipe, source: str = "recipe", resume: bool = False) -> int:
    layout = parallel.init_parallel(recipe.parallel.tensor_parallel, recipe.parallel.pipeline_parallel)
    try:
        result = build_trainer(recipe, layout, source).run(resume=resume or recipe.checkpoint.resume)
    finally:
        parallel.shutdown()
    return int(result.get("exit_code", 0))


def build_trainer(recipe: Recipe, layout, source: str = "recipe") -> Trainer:
    """The Trainer of ``recipe`` on an initialised layout: its vocabulary, its phase from the registry."""
    vocab = load_vocab(recipe)
    return Trainer(recipe, layout, build_phase(recipe, layout, vocab, source), vocab, source)
