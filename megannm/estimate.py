"""``megannm estimate RECIPE --world-size N [--gpu h100|h200|a100|b200]``: will this recipe fit, how fast will it run?

From the recipe alone (no process group, no device): parameters (total and active per token), training FLOPs per
token (``megannm.model.flops``), per-GPU memory by part for the pipeline stage that needs the most, the 1F1B bubble,
and the step time and tokens/s at a stated model-FLOPs utilisation; then warnings when the layout wastes devices.

The memory model counts what megannm and DeepSpeed 0.19 actually allocate (checked against measured peaks of small
CPU runs at several layouts by ``tests/test_plan.py``), per rank, with P the parameters this rank holds, dp the
data-parallel size and e the bytes of the recipe's precision (2 for bf16/fp16, 4 for fp32):

- weights: e P (ZeRO-3: e P / dp, plus the layers gathered for the current computation);
- gradients: the module's e P (ZeRO 2-3: only a reduction bucket of them at a time), plus DeepSpeed's fp32
  accumulation buffer under bf16/fp16 (BF16_Optimizer at ZeRO 1: 4 P; ZeRO 2-3: 4 P / dp), or ZeRO-1's fp32
  reduced partition (4 P / dp);
- optimizer: fp32 master weights (4 P / dp at ZeRO >= 1; ZeRO-0 keeps none in fp32 and none is needed) and Adam's
  two moments (8 P / dp; 8 P at ZeRO 0);
- buffers: ZeRO 1-2's contiguous gradient bucket (``train.engine.BUCKET_ELEMENTS`` elements, allocated whole on a
  GPU), and the largest transient of the step: ZeRO-0's flattened copy of all gradients for the all-reduce, or the
  Adam step's temporary (foreach on a GPU: 4 bytes per master element);
- activations: what autograd keeps per token and layer (``layer_activation_bytes``: norms keep an fp32 copy of
  their input, RoPE keeps its rotated halves, attention keeps q, k, v and its output; the MoT routing adds nothing
  per layer), times the micro-batches in flight (1F1B: stage s of pp holds min(pp - s, accum)), or with activation
  checkpointing each layer's input plus one layer recomputed;
- logits: the last stage's [tokens, vocab / tp] head output and its fp32 copies for the loss (more with z-loss);
- overhead: the CUDA context, NCCL and cuBLAS workspaces and allocator fragmentation, a stated constant.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megannm.config import Recipe, check_recipe

GiB = 2 ** 30

# ZeRO's reduction bucket in elements: train/engine.py's BUCKET_ELEMENTS (copied as a number so that planning
# imports no training code; tests/test_plan.py keeps the two equal).
BUCKET_ELEMENTS = int(5e7)
# DeepSpeed's ZeRO-0 all-reduce flattens at most this many gradient elements at once (MEMORY_OPT_ALLREDUCE_SIZE).
ZERO0_FLATTEN_ELEMENTS = int(5e8)


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: Optional[float]  # usable memory as nvidia-smi reports it; None = no fixed budget (the CPU)
    peak_tflops: dict  # dense peak per precision
    node_size: int  # devices per node, i.e. per NVLink domain: where tensor parallelism is fast
    overhead_gib: float  # CUDA context, NCCL/cuBLAS workspaces, allocator fragmentation
    foreach_adam: bool = True  # torch's AdamW on CUDA tensors: multi-tensor steps with one full-size temporary
    whole_buckets: bool = True  # a buffer counts when allocated (CUDA), not when touched (the CPU's resident pages)


DEVICES = {
    "a100": Device("A100 80GB SXM", 80.0, {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 8, 2.0),
    "h100": Device("H100 80GB SXM", 79.6, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 8, 2.0),
    "h200": Device("H200 141GB SXM", 139.8, {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}, 8, 2.0),
    "b200": Device("B200 180GB", 178.4, {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0}, 8, 2.0),
    # The validation target: a CPU process's resident memory. No fixed budget; its overhead is what the interpreter
    # allocates during a step besides tensors (autograd's graph, DeepSpeed's Python objects, malloc arenas).
    "cpu": Device("CPU", None, {"bf16": 1.0, "fp16": 1.0, "fp32": 1.0}, 1, 0.005, foreach_adam=False,
                  whole_buckets=False),
}

# Without a vocab.json to read, the estimate assumes a 65,536-id text tokenizer and an 8,192-code image tokenizer.
DEFAULT_TEXT_VOCAB, DEFAULT_IMAGE_CODES = 65536, 8192


# ---------------------------------------------------------------------------------------------------------------------
# activations


def layer_activation_bytes(args, tp: int) -> float:
    """Bytes autograd keeps per token for one block (either modality: each token passes one weight set).

    An RMSNorm whose output feeds a linear keeps its input in fp32 (4 D: the input itself under fp32), the
    normalised value and its output in the activation dtype (2 e D); a QK-norm's output feeds no saving op (4 + e per
    element). Then q/k/v in one buffer, RoPE's rotated halves and results for q and k, the attention output and
    the output projection's (re-ordered) input, and the SwiGLU's gate, its SiLU, up and product (4 F). Everything
    after a column-parallel linear is split over TP; the residual stream is not."""
    e = 2 if args.params_dtype in ("bfloat16", "float16") else 4
    d, f = args.hidden, args.ffn / tp
    q, kv = args.heads * args.head_dim / tp, args.kv_heads * args.head_dim / tp
    norm = 4 * d + 2 * e * d
    attn = norm + e * (q + 2 * kv) + 2 * e * (q + kv) + 2 * e * q
    if args.qk_norm:
        attn += (4 + e) * (q + kv)
    ffn = norm + 4 * e * f
    return attn + ffn


def head_bytes(args, tp: int) -> float:
    """Per token at the loss: the final norm, the head's logits (e bytes) and the loss's fp32 copies of them (the
    masked copy, and for the z-loss the shifted and exponentiated ones), over this rank's vocabulary shard."""
    e = 2 if args.params_dtype in ("bfloat16", "float16") else 4
    v = args.padded_vocab_size / tp
    return 4 * args.hidden + 2 * e * args.hidden + (e + (12 if args.z_loss > 0 else 8)) * v


# ---------------------------------------------------------------------------------------------------------------------
# the estimate


@dataclass
class StageMemory:
    stage: int
    params: int  # parameters held by one rank of this stage (its TP shard)
    parts: dict = field(default_factory=dict)  # part -> bytes
    in_flight: int = 1  # micro-batches whose activations the stage holds at once (1F1B)
    per_micro_batch: dict = field(default_factory=dict)  # activations of one micro-batch: kept | checkpointed

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Estimate:
    recipe: str
    device: str
    world_size: int
    tp: int
    pp: int
    dp: int
    zero_stage: int
    precision: str
    phase: str
    vocab_note: str
    total_params: int
    active_params: int
    flops_per_token: float
    micro_batches: int  # per step and data-parallel rank (gradient-accumulation steps)
    activation_checkpointing: bool
    stages: list[StageMemory]
    bubble: float  # 1F1B idle fraction (pp - 1) / (m + pp - 1)
    mfu: float
    step_time_s: float
    tokens_per_s: float
    warnings: list[str]

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_stage"] = self.peak.stage
        d["peak_bytes"] = self.peak.total
        return d


def _stage_params(args, tp: int, pp: int, partition: str) -> tuple[list[int], list[int]]:
    """Parameters per rank of each pipeline stage and the stages' chain bounds: the chain [embedding, blocks...,
    head] split the way DeepSpeed's PipelineModule splits it (``model/pipeline.py``: counts from the dimensions,
    balanced, or uniform)."""
    from megannm.model import flops
    table = args.padded_vocab_size // tp * args.hidden
    block = args.n_sets * (flops.block_matmul_params(args) // tp + flops.block_norm_params(args))
    chain = [table] + [block] * args.layers + [args.n_sets * args.hidden + table]
    if pp == 1:
        return [sum(chain)], [0, len(chain)]
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed announces its accelerator on stdout when imported
        from deepspeed.runtime import utils as ds_utils
    whole = args.n_sets * (flops.block_matmul_params(args) + flops.block_norm_params(args))
    counts = [args.padded_vocab_size * args.hidden] + [whole] * args.layers + [args.n_sets * args.hidden
                                                                                + args.padded_vocab_size * args.hidden]
    bounds = (ds_utils.partition_balanced(weights=counts, num_parts=pp) if partition == "parameters"
              else ds_utils.partition_uniform(num_items=len(chain), num_parts=pp))
    return [sum(chain[bounds[s]:bounds[s + 1]]) for s in range(pp)], list(bounds)


def _model_states(p: int, block: int, dp: int, zero: int, precision: str, dev: Device) -> tuple[dict, float]:
    """Bytes of weights, gradients, optimizer state and DeepSpeed's persistent buffers for p parameters on one rank
    (``block``: the parameters of one block, what ZeRO-3 gathers at a time), and the step's largest transient.

    Which DeepSpeed optimizer holds what (0.19, a torch AdamW inside; ``train/engine.py``'s config):
    ZeRO 0: the module's weights and gradients, Adam's moments, and the all-reduce's flattened copy of the gradients
    (under bf16 with bf16 accumulation DeepSpeed's FP16_Optimizer adds an fp32 master and fp32 gradient copies).
    ZeRO 1 under bf16/fp16 with fp32 accumulation: BF16_Optimizer: 16-bit weights and gradients, an fp32 gradient
    buffer of the WHOLE model (it all-reduces, then each rank updates its partition), the fp32 master and moments
    partitioned, and the all-reduce's flattened fp32 copy. ZeRO 1-2 otherwise: DeepSpeedZeroOptimizer: the module's
    weights (and, at 1, its gradients), the reduced fp32 gradient partition, the fp32 master partition (a copy even
    under fp32), the moments partitioned, and a contiguous reduction bucket. ZeRO 3: weights partitioned too."""
    e = 2 if precision in ("bf16", "fp16") else 4
    low = e == 2
    shard = dp if zero >= 1 else 1
    master = 4 * p / shard if (low or zero >= 1) else 0.0
    parts = {"weights": e * p / dp + 2 * e * block if zero == 3 else e * p}  # ZeRO-3: + this and the next block
    buffers = 0.0
    if zero == 0 or (zero == 1 and low):
        grads = e * p + (4 * p if low else 0.0)  # the module's, and (bf16) the fp32 accumulation buffer
        transient = 4 * min(p, ZERO0_FLATTEN_ELEMENTS)  # the all-reduce's flat copy (of fp32 gradients)
        if zero == 0 and low:
            transient += 4 * p  # FP16_Optimizer's fp32 copies of the gradients at the step
    else:
        # the contiguous reduction bucket: allocated whole on a GPU; on a CPU only its pages in use are resident,
        # and those hold the reduced partition counted below
        buffers = 4 * BUCKET_ELEMENTS if dev.whole_buckets else 0.0
        if zero == 1:  # gradients stay in the module until the last micro-batch's backward reduces them into the
            grads = e * p  # fp32 partition, while that backward frees the activations: a transient beside them
            transient = 4 * p / dp
        else:  # ZeRO 2-3 reduce every micro-batch's gradients as they come, bucket by bucket
            grads, transient = e * min(p, BUCKET_ELEMENTS) + 4 * p / dp, 0.0
    if dev.foreach_adam:
        transient = max(transient, 4 * p / shard)  # torch's multi-tensor Adam: one temporary the size of the master
    parts.update(gradients=grads, optimizer=master + 8 * p / shard, buffers=buffers)
    return parts, transient


def estimate_recipe(recipe: Recipe, world_size: int, device: str = "h100", vocab=None, mfu: float = 0.4,
              source: str = "recipe") -> Estimate:
    """The estimate for ``recipe`` on ``world_size`` devices of kind ``device`` (a key of ``DEVICES``). ``vocab``: a
    ``Vocab``; None reads ``data.vocab`` when it exists, else assumes the default sizes (said in ``vocab_note``)."""
    from megannm.model import flops
    from megannm.model.args import ModelArgs
    from megannm.vocab import Vocab
    if device not in DEVICES:
        gpus = ", ".join(k for k in DEVICES if k != "cpu")
        raise ValueError(f"estimate: --gpu must be one of {gpus} (got {device!r})")
    dev = DEVICES[device]
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"estimate: --world-size must be a whole number of devices, at least 1 (got {world_size!r})")
    if not 0 < mfu <= 1:
        raise ValueError(f"estimate: --mfu must be in (0, 1] (got {mfu})")
    errs = check_recipe(recipe, world_size=world_size)
    if errs:
        key, msg = errs[0]
        raise ValueError(f"{source}: {key}: {msg}")
    refs = recipe.data.train or recipe.data.valid
    path = Path(recipe.data.vocab) if recipe.data.vocab else Path(refs[0].path) / "vocab.json" if refs else None
    note = f"from {path}"
    if vocab is None:
        if path is not None and path.exists():
            vocab = Vocab.load(path)
        else:
            vocab = Vocab(text_size=DEFAULT_TEXT_VOCAB, image_codes=DEFAULT_IMAGE_CODES)
            note = (f"assumed: {DEFAULT_TEXT_VOCAB} text ids + {DEFAULT_IMAGE_CODES} image codes, no "
                    f"{path or 'data.vocab'} here")
    p, d = recipe.parallel, recipe.data
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    dp = world_size // (tp * pp)
    args = ModelArgs.from_config(recipe.model, vocab, tp, params_dtype=recipe.precision)
    accum = d.global_batch_size // (d.micro_batch_size * dp)
    tokens = d.micro_batch_size * d.seq_len  # per micro-batch
    per_stage, bounds = _stage_params(args, tp, pp, p.pipeline_partition)
    block = args.n_sets * (flops.block_matmul_params(args) // tp + flops.block_norm_params(args))
    e = 2 if recipe.precision in ("bf16", "fp16") else 4
    layer = layer_activation_bytes(args, tp)
    kind = recipe.phase.kind
    with_reference = kind == "dpo" or (kind == "grpo" and recipe.phase.options.kl_coef > 0)
    rollout_cache = 0.0
    if kind == "grpo":  # the rollout: rollout_batch_size answers (default all of the rank's) decoding together,
        from megannm.generate import PREFILL_TOKENS  # each up to max_seq_len in the KV cache, plus one prefill
        o = recipe.phase.options  # chunk's fp32 logits
        rows = o.rollout_batch_size or o.prompts_per_step // dp * o.group_size
        rollout_cache = rows * args.max_seq_len * args.layers * 2 * (args.kv_heads // tp) * args.head_dim * e
        rollout_cache += PREFILL_TOKENS * args.padded_vocab_size // tp * 4
    cpu_mask = 0.0 if dev.whole_buckets else 5 * d.seq_len  # CPU SDPA: the bool document mask and its float copy
    stages = []
    for s, params in enumerate(int(x) for x in per_stage):
        # chain positions [first, last): 0 the embedding, 1..N the blocks, N + 1 the head
        first, last = int(bounds[s]), int(bounds[s + 1])
        blocks = max(0, min(last, args.layers + 1) - max(first, 1))
        in_flight = min(pp - s, accum)
        inputs = e * args.hidden + cpu_mask  # the stage's input (embedding output or the activation received)
        # per micro-batch in flight: every block's saved tensors, or with checkpointing only each block's input,
        # plus (once, not per micro-batch) the block being recomputed in the backward
        kept, checkpointed = tokens * (blocks * layer + inputs), tokens * (blocks * e * args.hidden + inputs)
        per_mb, live = (checkpointed, tokens * layer) if p.activation_checkpointing else (kept, 0.0)
        parts, transient = _model_states(params, block, dp, p.zero_stage, recipe.precision, dev)
        if with_reference:  # GRPO's and DPO's frozen reference: the same shards in the same dtype, no gradients
            parts["reference"] = e * params
        parts["activations"] = in_flight * per_mb + live
        parts["logits"] = tokens * head_bytes(args, tp) if last == args.layers + 2 else 0.0
        transient = max(transient, rollout_cache)  # the rollout's KV cache comes and goes between updates
        # the optimizer step's transient comes after the backward has freed the activations: only its excess counts
        parts["step extra"] = max(0.0, transient - parts["activations"] - parts["logits"])
        parts["overhead"] = dev.overhead_gib * GiB
        stages.append(StageMemory(s, params, parts, in_flight, {"kept": kept, "checkpointed": checkpointed}))
    fpt = float(flops.flops_per_token(args, d.seq_len))
    bubble = (pp - 1) / (accum + pp - 1)
    peak = dev.peak_tflops[recipe.precision] * 1e12
    compute = fpt * d.global_batch_size * d.seq_len / (world_size * peak * mfu)
    step = compute / (1 - bubble)
    est = Estimate(recipe=source, device=device, world_size=world_size, tp=tp, pp=pp, dp=dp, zero_stage=p.zero_stage,
                precision=recipe.precision, phase=kind, vocab_note=note, total_params=flops.num_params(args),
                active_params=flops.num_params(args, active_only=True), flops_per_token=fpt, micro_batches=accum,
                activation_checkpointing=p.activation_checkpointing, stages=stages, bubble=bubble, mfu=mfu,
                step_time_s=step, tokens_per_s=d.global_batch_size * d.seq_len / step, warnings=[])
    est.warnings = _warnings(est, dev)
    return est


def _warnings(est: Estimate, dev: Device) -> list[str]:
    out = []
    if est.tp > dev.node_size:
        out.append(f"tensor_parallel={est.tp} is above the {dev.node_size} devices of a node: its all-reduces "
                   f"(two per block, forward and backward) would cross the inter-node network")
    if dev.memory_gib is not None:
        used = est.peak.total / (dev.memory_gib * GiB)
        if used > 1:
            out.append(f"does not fit: stage {est.peak.stage} needs {est.peak.total / GiB:.1f} GiB of "
                       f"{dev.memory_gib:.0f} (raise tensor/pipeline parallelism or the ZeRO stage, turn on "
                       f"parallel.activation_checkpointing, or lower data.micro_batch_size)")
        elif used < 0.3:
            fewer = (f"fewer model-parallel ranks (tensor x pipeline = {est.tp * est.pp}), " if est.tp * est.pp > 1
                     else "")
            lower = "a lower ZeRO stage (less communication), " if est.zero_stage >= 2 else ""
            out.append(f"memory under 30% used ({used:.0%} on the fullest stage): the layout wastes devices; "
                       f"{fewer}{lower}or a larger data.micro_batch_size would do the same work faster")
    if est.bubble > 0.2:
        out.append(f"pipeline bubble {est.bubble:.0%}: more micro-batches per step (data.global_batch_size) or "
                   f"fewer stages")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the table


def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def format_estimate(est: Estimate) -> str:
    dev = DEVICES[est.device]
    lines = [f"{est.recipe}: {est.world_size} x {dev.name} = tensor {est.tp} x pipeline {est.pp} x data "
             f"{est.dp}, ZeRO {est.zero_stage}, {est.precision}, activation checkpointing "
             f"{'on' if est.activation_checkpointing else 'off'}",
             f"  parameters        {est.total_params / 1e9:8.2f} B total, {est.active_params / 1e9:.2f} B active per "
             f"token   (vocabulary {est.vocab_note})",
             f"  FLOPs per token   {est.flops_per_token / 1e9:8.2f} GFLOP (training: 6 x active matmul weights "
             f"+ attention)",
             f"  micro-batches     {est.micro_batches:8d} per step and data-parallel rank; 1F1B bubble "
             f"{est.bubble:.1%}",
             "  memory per GPU (one rank of each pipeline stage; activations: the micro-batches in flight under 1F1B, "
             "each kept whole or, with checkpointing, as its blocks' inputs plus one block recomputed):"]
    names = list(est.stages[0].parts)
    w = 30
    lines.append("    " + "part".ljust(w) + "".join(f"stage {s.stage}".rjust(13) for s in est.stages))
    for n in names:
        lines.append("    " + n.ljust(w) + "".join(_gib(s.parts[n]).rjust(13) for s in est.stages))
    lines.append("    " + "total".ljust(w) + "".join(_gib(s.total).rjust(13) for s in est.stages))
    for mode in ("kept", "checkpointed"):
        lines.append("    " + f"one micro-batch, {mode}".ljust(w)
                     + "".join(_gib(s.per_micro_batch[mode]).rjust(13) for s in est.stages))
    lines.append("    " + "micro-batches in flight".ljust(w) + "".join(f"{s.in_flight:13d}" for s in est.stages))
    if dev.memory_gib is not None:
        lines.append(f"    of {dev.memory_gib:.1f} GiB: {est.peak.total / (dev.memory_gib * GiB):.0%} on the fullest "
                     f"stage ({est.peak.stage})")
    lines.append(f"  step time         {est.step_time_s:8.2f} s at {est.mfu:.0%} MFU "
                 f"({dev.peak_tflops[est.precision]:.0f} TFLOP/s peak {est.precision}), "
                 f"{est.tokens_per_s:,.0f} tokens/s")
    if est.phase in ("grpo", "dpo"):
        lines.append(f"    (the step time counts the updates only: {est.phase}'s "
                     f"{'rollout and ' if est.phase == 'grpo' else ''}reference forwards come on top)")
    lines += [f"  warning: {w}" for w in est.warnings] or ["  no warnings"]
    return "\n".join(lines)

