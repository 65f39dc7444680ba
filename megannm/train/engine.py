"""The DeepSpeed engine built from a recipe: optimizer, schedule, ZeRO stage, precision, clipping, accumulation."""
from __future__ import annotations

import math

import torch

from megannm import parallel
from megannm.config import Recipe


def lr_multiplier(recipe: Recipe):
    """Linear warm-up to ``lr``, then cosine (or linear) decay to ``min_lr`` at ``train_steps``, or constant, or
    warmup-stable-decay: ``lr`` until the last ``decay_steps``, then linear to ``min_lr``. A chain continues its
    rate across stages by starting a stage at the previous stage's last rate (``recipes/nmm-7b``)."""
    o, s = recipe.optimizer, recipe.schedule
    floor = o.min_lr / o.lr

    def f(step: int) -> float:
        if s.warmup_steps and step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.decay == "constant":
            return 1.0
        if s.decay == "wsd":
            stable_until = s.train_steps - s.decay_steps
            if step < stable_until:
                return 1.0
            t = min(1.0, (step + 1 - stable_until) / max(1, s.decay_steps))  # the last step reaches min_lr
            return floor + (1 - floor) * (1 - t)
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


# ZeRO's gradient-reduction and parameter all-gather buckets, in elements (DeepSpeed's default is 5e8, i.e. 1 GB per
# bucket in bf16 and more in fp32); Megatron-LM's DDP buckets are 40M. ``megannm plan`` counts them.
BUCKET_ELEMENTS = int(5e7)


def deepspeed_config(recipe: Recipe, layout) -> dict:
    d, p = recipe.data, recipe.parallel
    accum = d.global_batch_size // (d.micro_batch_size * layout.dp)
    zero = {"stage": p.zero_stage, "reduce_bucket_size": BUCKET_ELEMENTS, "allgather_bucket_size": BUCKET_ELEMENTS}
    if p.zero_stage == 3:
        # Gather whole layers only when needed; keep small models' prefetch modest on the CPU.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 5e6,
                     "stage3_max_live_parameters": 1e8, "stage3_gather_16bit_weights_on_model_save": False})
    config = {
        "train_batch_size": d.global_batch_size,
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": recipe.optimizer.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # bf16/fp16: the module holds 16-bit weights, the optimizer an fp32 master copy (BF16_Optimizer at ZeRO 1,
        # the ZeRO optimizer's fp32 partitions at 2-3); fp16 gets DeepSpeed's dynamic loss scaler (initial 2^16,
        # halved on an overflow, which skips the step, doubled after 1000 clean steps).
        "bf16": {"enabled": recipe.precision == "bf16"},
        "fp16": {"enabled": recipe.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if recipe.precision != "fp32":
        # Without it DeepSpeed 0.19 accumulates in the model's dtype: ~1% relative gradient error after 128
        # bf16 micro-batches (measured against fp32 accumulation).
        config["data_types"] = {"grad_accum_dtype": p.grad_accum_dtype}  # DeepSpeed's names are the recipe's
    return config


def adamw(groups: list[dict], o) -> torch.optim.AdamW:
    """torch's AdamW with its fused kernel (one kernel per tensor for the whole update, on the CPU and GPUs) where
    every parameter lives on a device that has one; torch's default implementation otherwise. The same update
    either way (to float rounding): DeepSpeed hands it the fp32 master copies under bf16/fp16 (BF16_Optimizer, the
    ZeRO partitions), so the update runs in fp32 whatever the module's dtype."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    supported = set(_get_fused_kernels_supported_devices())
    fused = all(p.device.type in supported and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def check_precision(precision: str) -> None:
    """One line, before DeepSpeed's own traceback, when this device cannot train in ``precision`` (DeepSpeed's CPU
    accelerator says fp16 only where the processor has half-precision arithmetic)."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    supported = {"fp16": acc.is_fp16_supported, "bf16": acc.is_bf16_supported}.get(precision)
    if supported is not None and not supported():
        raise ValueError(f"precision: {precision} is not supported on this device ({acc.device_name()}, as DeepSpeed "
                         f"reports it); use " + " or ".join(p for p in ("bf16", "fp32") if p != precision))


class DataLoads:
    """DeepSpeed's checkpoint engine with its ``load`` replaced by megannm's, everything else (saving, commits)
    passed through unchanged.

    DeepSpeed's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``, which runs whatever a
    pickled object in the file names. Ours unpickles as data: ``weights_only=True`` plus DeepSpeed's own few types
    (``megannm.checkpoint.tensors.load_torch``); a file that needs anything else is refused with one line naming it
    and the class, unless ``--trust-code`` was given. Every file ``engine.load_checkpoint`` reads passes through
    here: the module states (``SDLoaderFactory``), a pipeline's layer files, the ZeRO and BF16_Optimizer partitions
    (and megannm's RNG files, read by ``megannm.train.checkpoint``). DeepSpeed builds its engine from its config
    alone (``create_checkpoint_engine``, no hook), so ``build_engine`` wraps the one it built."""

    def __init__(self, inner):
        self.inner = inner

    def load(self, path, map_location=None):
        from megannm.checkpoint.tensors import load_torch
        # whole files, as DeepSpeed reads them (not memory-mapped: the optimizer keeps some loaded tensors as they are)
        return load_torch(path, map_location=map_location or "cpu", mmap=False)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def build_engine(recipe: Recipe, layout, module: torch.nn.Module, pipeline: bool = False):
    """``deepspeed.initialize`` over ``module`` with a torch AdamW (``adamw``; DeepSpeed's own Adam would JIT-build a
    C++ op)."""
    import deepspeed

    check_precision(recipe.precision)
    o = recipe.optimizer
    optimizer = adamw(param_groups(module, o.weight_decay), o)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(recipe))
    # A PipelineModule carries its own grid (built in Megatron's order by parallel.pipeline_topology); without a
    # pipeline, ZeRO needs megatron-core's groups under DeepSpeed's names.
    mpu = None if pipeline else parallel.MegatronMPU(layout)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(recipe, layout), mpu=mpu)
    engine.checkpoint_engine = DataLoads(engine.checkpoint_engine)  # loads as data, never as code
    if layout.dp == 1 and not pipeline and engine.zero_optimization_stage() == 0:
        # One data-parallel replica (a single device, or tensor parallel only): DeepSpeed's ZeRO-0 backward still
        # flattens every gradient into buckets, all-reduces them over a group of one and copies them back
        # (measured: ~2% of a small model's CPU step). Nothing to reduce; ZeRO 1-3 keep their own path (their
        # reduce also fills the optimizer's partitions).
        engine.enable_backward_allreduce = False
    return engine
