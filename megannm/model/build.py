"""The model of a recipe on this rank: a plain ``NMMModel`` or, with pipeline stages, this rank's
``PipelineModule`` stage; the same seed on every rank first, so that megatron-core slices every TP shard from the
same CPU master weight and every layout starts from identical weights."""
from __future__ import annotations

import torch

from megannm.model.args import ModelArgs


def model_args(recipe, vocab, layout) -> ModelArgs:
    """The recipe's ``model:`` section at this tensor-parallel size, in the recipe's parameter dtype (the module is
    built in it, so RoPE tables and caches follow; DeepSpeed's fp32 master copy lives in the optimizer)."""
    return ModelArgs.from_config(recipe.model, vocab, layout.tp, params_dtype=recipe.precision)


def build_model(recipe, vocab, layout, seed: int | None = None):
    """(ModelArgs, module) for this rank; ``seed`` defaults to the recipe's."""
    torch.manual_seed(recipe.seed if seed is None else seed)
    args = model_args(recipe, vocab, layout)
    ckpt = recipe.parallel.activation_checkpointing
    if layout.pp > 1:
        from megannm.model.pipeline import build_pipeline_module
        return args, build_pipeline_module(args, layout, partition=recipe.parallel.pipeline_partition,
                                           activation_checkpointing=ckpt)
    from megannm.model.transformer import NMMModel
    return args, NMMModel(args, layout, checkpoint_activations=ckpt)
