"""Training objectives over the one engine, model and loop: one file per phase, one line each in ``PHASES``.

    pretrain  next token over every token, per-modality loss weights        (pipeline: yes)
    sft       next token on assistant turns, per token over the global batch
    grpo      group-relative policy optimisation with verifiable rewards
    dpo       direct preference optimisation on ranked pairs

Each is a ``megannm.train.phase.Phase`` subclass; ``phase.kind`` in a recipe picks it. Adding an objective: write
``megannm/phases/myphase.py`` with ``class MyPhase(Phase)`` and add ``"myphase": "megannm.phases.myphase:MyPhase"``
below (or declare it under the ``megannm.phases`` entry-point group of your own package); a phase that reads token
shards builds its batches with ``megannm.train.phase.data_iterator``. Its options, if any, are a pydantic model set
as ``MyPhase.Options``; ``check_phase`` validates the recipe's ``phase.options`` against it before any process
starts. (The four built-in phases have their options in the recipe schema, ``megannm.config``.)
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from pydantic import ValidationError

from megannm.config import CustomPhaseConfig, RecipeError, format_validation_error

PHASES = {
    "pretrain": "megannm.phases.pretrain:PretrainPhase",
    "sft": "megannm.phases.sft:SFTPhase",
    "grpo": "megannm.phases.grpo:GRPOPhase",
    "dpo": "megannm.phases.dpo:DPOPhase",
}


ENTRY_POINT_GROUP = "megannm.phases"


def registered() -> dict[str, str]:
    """Every phase kind: the built-in table, then installed packages' entry points."""
    out = dict(PHASES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep.value)
    return out


def phase_class(kind: str, source: str = "recipe"):
    """The Phase subclass registered under ``kind`` (imported on first use)."""
    table = registered()
    if kind not in table:
        raise RecipeError(f"{source}: phase.kind: unknown phase {kind!r} (expected one of {', '.join(table)})")
    module, _, name = table[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def check_phase(recipe, source: str = "recipe"):
    """Before launch: the phase kind is registered, a registered phase's own ``Options`` accept the recipe's
    ``phase.options`` (replaced by the typed object), and the phase can run with the recipe's pipeline stages."""
    kind = recipe.phase.kind
    cls = phase_class(kind, source)
    if isinstance(recipe.phase, CustomPhaseConfig):
        model, given = getattr(cls, "Options", None), recipe.phase.options
        if model is None and given:
            raise RecipeError(f"{source}: phase.options: phase {kind} takes no options (got {sorted(given)[0]!r})")
        if model is not None and isinstance(given, dict):
            try:
                recipe.phase.options = model.model_validate(given)
            except ValidationError as e:
                line = format_validation_error(source, e, model)
                raise RecipeError(line.replace(f"{source}: ", f"{source}: phase.options.", 1)) from None
    cls.check(recipe, source)
    pp = recipe.parallel.pipeline_parallel
    if pp > 1 and not cls.pipeline:
        raise RecipeError(f"{source}: parallel.pipeline_parallel: phase {kind} cannot run with pipeline parallelism "
                          f"(got pipeline_parallel={pp}, expected 1: its loss is not the pipeline's lm_loss)")
    return cls


def build_phase(recipe, layout, vocab, source: str = "recipe"):
    return check_phase(recipe, source)(recipe, layout, vocab)
