"""The DeepSpeed engine built from a recipe: optimizer, schedule, ZeRO stage, precision, clipping, accumulation."""
from __future__ import annotations

import math

import torch

from megannm import parallel
from megannm.config import Recipe


def lr_multiplier(recipe: Recipe):
    """Linear warm-up to ``lr``, then cosine (or linear, or constant) decay to ``min_lr`` at ``train_steps``."""
    o, s = recipe.optimizer, recipe.schedule
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "constant":
            return 1.0
        span = max(1, s.train_steps - s.warmup_steps)
        t = min(1.0, (step - s.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if s.decay == "cosine" else 1 - t
        return floor + (1 - floor) * shape

    return f


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's convention: no weight decay on norms and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def deepspeed_config(recipe: Recipe, layout) -> dict:
    d, p = recipe.data, recipe.parallel
    accum = d.global_batch_size // (d.micro_batch_size * layout.dp)
    zero = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        # Gather whole layers only when needed; keep small models' prefetch modest on the CPU.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e6,
                     "stage3_max_live_parameters": 1e8, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": d.global_batch_size,
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.optimizer.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": recipe.precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def build_engine(recipe: Recipe, layout, module: torch.nn.Module, pipeline: bool = False):
    """``deepspeed.initialize`` over ``module`` with a torch AdamW (DeepSpeed's own Adam would JIT-build a C++ op)."""
    import deepspeed

    o = recipe.optimizer
    optimizer = torch.optim.AdamW(param_groups(module, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(recipe))
    # A PipelineModule carries its own grid (built in Megatron's order by parallel.pipeline_topology); without a
    # pipeline, ZeRO needs megatron-core's groups under DeepSpeed's names.
    mpu = None if pipeline else parallel.MegatronMPU(layout)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe, layout), mpu=mpu)
    return engine
