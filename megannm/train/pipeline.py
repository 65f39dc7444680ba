"""The Trainer's updates through DeepSpeed's ``PipelineEngine`` (1F1B ``train_batch``, forward-only ``eval_batch``).

Only the first stage reads the inputs and only the last the labels; the last stage's ``PipelineLoss`` keeps each
micro-batch's ``lm_loss`` statistics, which the phase turns into ``Stats`` and the last stage broadcasts over its
pipeline group, so every rank logs what the non-pipeline path logs.
"""
from __future__ import annotations

from megannm.model.pipeline import pipeline_batch
from megannm.train.stats import Stats


def _needs_data(engine) -> bool:
    return engine.is_first_stage() or engine.is_last_stage()


def _stats(engine, phase, layout) -> Stats:
    kept = engine.module.loss_fn.take()
    out = Stats()
    for loss, model_stats in kept:  # micro-batch order, as the non-pipeline path adds them
        out += phase.lm_stats(loss, model_stats)
    if not engine.is_last_stage():  # the same keys, zero, to receive the last stage's values
        out = phase.lm_stats(loss=None, model_stats={}).zeros()
    return out.broadcast(layout.pp_group, src=layout.pp - 1) if layout.pp > 1 else out


def train_update(engine, phase, layout, micro_batches: list[dict]) -> Stats:
    micro = [pipeline_batch(b) for b in micro_batches] if _needs_data(engine) else []
    engine.module.loss_fn.take()  # nothing left over from an interrupted call
    engine.train_batch(iter(micro))
    return _stats(engine, phase, layout)


def eval_batches(engine, phase, layout, batches: list[dict]) -> Stats:
    micro = [pipeline_batch(b) for b in batches] if _needs_data(engine) else []
    engine.module.loss_fn.take()
    engine.eval_batch(iter(micro), num_micro_batches=len(batches), bcast_loss=False)
    return _stats(engine, phase, layout)
