"""The recipe schema: typed, nested, extra keys forbidden, checked before any process starts.

A recipe is one YAML file. ``base: other.yaml`` inherits another recipe (paths relative to the file; the child's
keys override the base's, nested mappings merged key by key). Command-line overrides ``a.b.c=value`` are parsed as
YAML scalars and applied last. Every error is one line: ``recipe.yaml: key.path: what is wrong (got X, expected Y)``
(``format_validation_error`` for the schema's errors, ``check_recipe`` for the impossible combinations).

``phase: {kind: ..., options: {...}}``: the kind chooses the schema of the options (``GRPOOptions``, ``DPOOptions``;
none for pretrain and SFT), so ``recipe.phase.options`` is a typed object once loaded. ``slurm:`` holds the sbatch
resources ``megannm stage`` passes (``SlurmConfig``).
"""
from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    hidden_size: int = Field(256, gt=0, description="Width of the residual stream.")
    num_layers: int = Field(4, gt=0, description="Transformer blocks.")
    num_heads: int = Field(4, gt=0, description="Attention heads (query).")
    num_kv_heads: Optional[int] = Field(None, gt=0, description="Key/value heads (GQA); None = num_heads.")
    ffn_hidden_size: int = Field(688, gt=0, description="SwiGLU inner width.")
    mot: bool = Field(True, description="Mixture-of-Transformers: one set of non-embedding weights per modality. "
                                        "False = the dense twin (same dimensions and FLOPs).")
    qk_norm: bool = Field(True, description="RMSNorm on queries and keys (per modality under MoT).")
    z_loss: float = Field(0.0, ge=0, description="Coefficient of the z-loss on the log partition (Chameleon ~1e-5).")
    norm_reorder: bool = Field(False, description="Chameleon's norm placement: normalise the sub-layer output "
                                                  "instead of its input.")
    compile: bool = Field(False, description="Compile each transformer block with torch.compile (regional "
                                             "compilation: element-wise work fused into generated kernels). "
                                             "Costs a compile of seconds to minutes at the first step; pays on "
                                             "long runs, on a GPU above all.")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    max_seq_len: int = Field(512, gt=0, description="Longest sequence the positions support.")
    loss_weights: dict[str, float] = Field(default_factory=lambda: {"text": 1.0, "image": 1.0},
                                           description="Per-modality loss weight, by modality name.")


class ParallelConfig(_Strict):
    tensor_parallel: int = Field(1, gt=0, description="Tensor-parallel size (megatron-core).")
    pipeline_parallel: int = Field(1, gt=0, description="Pipeline stages (DeepSpeed PipelineModule).")
    world_size: Optional[int] = Field(None, gt=0, description="Expected total ranks; None = whatever the launcher "
                                                              "gives (then checked at start).")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    pipeline_partition: Literal["parameters", "uniform"] = Field("parameters")
    activation_checkpointing: bool = Field(False)
    grad_accum_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Dtype gradients accumulate in over the micro-batches of a step (DeepSpeed's "
                            "data_types.grad_accum_dtype). fp32 by default: bf16 accumulation over 128 micro-batches "
                            "loses ~1% of the gradient. Under bf16/fp16 DeepSpeed needs zero_stage >= 1 for it.")
    timeout_minutes: float = Field(10.0, gt=0, description="Collective timeout (Megatron's "
                                                           "--distributed-timeout-minutes): a rank waiting longer "
                                                           "in one collective fails the job instead of hanging.")

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel


class DatasetRef(_Strict):
    path: str = Field(description="A shard folder written by `megannm preprocess` (has manifest.json).")
    weight: float = Field(1.0, gt=0, description="Blending weight (normalised over the list).")


class DataConfig(_Strict):
    train: list[DatasetRef] = Field(default_factory=list)
    valid: list[DatasetRef] = Field(default_factory=list)
    vocab: Optional[str] = Field(None, description="vocab.json; None = the one beside the first train data set.")
    seq_len: int = Field(128, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="Sequences per rank per micro-step.")
    global_batch_size: int = Field(32, gt=0, description="Sequences per optimizer step over all data-parallel ranks.")
    pack: bool = Field(True, description="Pack documents to seq_len (position ids reset, document mask).")
    seed: int = 1234
    caption_dropout: float = Field(0.0, ge=0, lt=1, description="Probability that a caption before an image is "
                                                                "dropped (enables classifier-free guidance).")
    plan_dir: Optional[str] = Field(None, description="Folder for the sample plans (each data set's per-epoch order "
                                                      "and packing, built once and memory-mapped, keyed by a hash "
                                                      "of what determines them); None = plans/ inside each train "
                                                      "data set's folder.")
    prefetch: int = Field(4, ge=0, description="Micro-batches read ahead on a background thread by the reading "
                                               "rank of each tensor-parallel group (0 = read when asked).")
    balance: bool = Field(False, description="Deal each global batch to the data-parallel ranks so that image "
                                             "tokens per rank are even (same samples per step; exact resume).")
    verify: Literal["auto", "full", "index", "none"] = Field(
        "auto", description="Before the first step: full = every shard's sha256 (all ranks share the work), index = "
                            "the indexes and shard sizes only, none = skip; auto = full when each rank's share is "
                            "at most 2 GiB, else index.")


class OptimizerConfig(_Strict):
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 = off.")


class ScheduleConfig(_Strict):
    train_steps: int = Field(100, gt=0, description="Optimizer steps of this stage.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up from 0 to optimizer.lr.")
    decay: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="After warm-up: cosine or linear to optimizer.min_lr at train_steps, constant at lr, "
                              "or wsd (warmup-stable-decay): lr until the last decay_steps, then linear to min_lr.")
    decay_steps: int = Field(0, ge=0, description="wsd only: length of the final decay (0 = stays at lr, for a "
                                                  "stage whose successor starts from this rate and decays).")
    exit_interval: int = Field(0, ge=0, description="Save and stop once step % exit_interval == 0 (0 = never); "
                                                    "the schedule still spans train_steps, so a resume continues it.")
    exit_duration_minutes: float = Field(0, ge=0, description="Save and stop after this much wall time (0 = "
                                                               "never); for jobs shorter than the run.")


# ---------------------------------------------------------------------------------------------------------------------
# phases: `phase: {kind: ..., options: {...}}`, the options' schema chosen by the kind


class _Options(_Strict):
    """``phase.options`` of one phase kind; an unknown key is reported with the phase and the keys it takes."""
    phase_kind: ClassVar[str]


class PretrainOptions(_Options):
    """``phase.options`` of a pretraining recipe: none."""
    phase_kind: ClassVar[str] = "pretrain"


class SFTOptions(_Options):
    """``phase.options`` of an SFT recipe: none (the loss mask comes with the data)."""
    phase_kind: ClassVar[str] = "sft"


class GRPOOptions(_Options):
    """``phase.options`` of a GRPO recipe."""
    phase_kind: ClassVar[str] = "grpo"
    prompts: str = Field(description="Prompt source: a JSONL file of records {parts|messages, answer_kind, answer}, "
                                     "a registered generator (entry-point group megannm.prompts, e.g. the toy "
                                     "world's toy_image) or package.module:function.")
    prompt_split: Literal["seen", "heldout", "all"] = Field("seen", description="Split a generator draws prompts "
                                                                                "from (a JSONL file has one).")
    tokenizers: Optional[str] = Field(None, description="Tokenizer bundle; None = the folder of data.vocab.")
    rewards: Union[list[str], dict[str, float]] = Field(description="Reward names (weight 1 each) or name -> "
                                                                    "weight: registered names, entry points of "
                                                                    "megannm.rewards, or package.module:function.")
    group_size: int = Field(8, ge=2, description="Answers sampled per prompt.")
    prompts_per_step: int = Field(8, gt=0, description="Prompts per rollout over all data-parallel ranks.")
    ppo_epochs: int = Field(1, gt=0, description="Passes over each rollout.")
    mini_batches: int = Field(1, gt=0, description="Optimizer steps per pass; each is data.global_batch_size "
                                                   "answers.")
    clip_ratio: float = Field(0.2, gt=0, lt=1, description="Lower clip: ratio >= 1 - clip_ratio.")
    clip_ratio_high: Optional[float] = Field(None, gt=0, description="Upper clip (DAPO's clip-higher); None = "
                                                                     "clip_ratio.")
    kl_coef: float = Field(0.04, ge=0, description="Weight of the k3 KL to the reference; 0 = no reference.")
    loss_normalisation: Literal["token", "sequence", "dr_grpo"] = Field(
        "token", description="How a mini-batch's per-token terms are averaged: token = over all its answer tokens "
                             "(DAPO); sequence = over each answer's tokens, then over answers (the GRPO paper); "
                             "dr_grpo = summed per answer over a constant length (max_new_tokens, or the image "
                             "grid), then over answers (Dr. GRPO: no length bias).")
    dynamic_sampling: bool = Field(False, description="Leave groups whose rewards are all equal out of the loss and "
                                                      "its normaliser (DAPO's dynamic sampling, without refilling "
                                                      "the batch); logged as dropped_groups.")
    scale_rewards: Optional[bool] = Field(None, description="Divide advantages by the group's std; None = true, "
                                                            "false under loss_normalisation dr_grpo.")
    adv_eps: float = Field(1e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    cfg_scale: float = Field(1.0, ge=0, description="Classifier-free guidance for image answers: only 1 (off); "
                                                     "the log-probs GRPO trains on are the conditional model's, "
                                                     "so guided samples would be off-policy.")
    max_new_tokens: int = Field(32, gt=0, description="Longest text answer.")
    rollout_batch_size: Optional[int] = Field(None, gt=0, description="Most answers decoding together in a "
                                                                      "rollout (one KV cache); None = all of the "
                                                                      "rank's prompts x group_size at once.")

    @property
    def std_scaled(self) -> bool:
        """Whether advantages are divided by the group's std: ``scale_rewards``, or the variant's own default."""
        return self.loss_normalisation != "dr_grpo" if self.scale_rewards is None else self.scale_rewards


class DPOOptions(_Options):
    """``phase.options`` of a DPO recipe."""
    phase_kind: ClassVar[str] = "dpo"
    pairs: str = Field(description="A folder written by `megannm pairs` (pairs.jsonl + manifest.json).")
    beta: float = Field(0.1, gt=0, description="Strength of the KL constraint to the reference (DPO's beta).")


class _Phase(_Strict):
    @field_validator("options", mode="before", check_fields=False)
    @classmethod
    def _no_options(cls, v):
        return {} if v is None else v  # `options:` with nothing under it


# `options` defaults to {} validated like a given mapping, so that a required option (DPO's pairs) is reported as
# phase.options.<key>, not as a missing `options`.
class PretrainPhaseConfig(_Phase):
    kind: Literal["pretrain"] = "pretrain"
    options: PretrainOptions = Field(default_factory=dict, validate_default=True)


class SFTPhaseConfig(_Phase):
    kind: Literal["sft"] = "sft"
    options: SFTOptions = Field(default_factory=dict, validate_default=True)


class GRPOPhaseConfig(_Phase):
    kind: Literal["grpo"] = "grpo"
    options: GRPOOptions = Field(default_factory=dict, validate_default=True)


class DPOPhaseConfig(_Phase):
    kind: Literal["dpo"] = "dpo"
    options: DPOOptions = Field(default_factory=dict, validate_default=True)


class CustomPhaseConfig(_Strict):
    """A phase registered outside the built-in four (``megannm.phases.PHASES`` or the ``megannm.phases``
    entry-point group): its kind is checked against the registry, and its options against the phase's own
    ``Options`` model, by ``megannm check``/``train`` before any process starts."""
    kind: str
    options: Any = Field(default_factory=dict)


BUILTIN_PHASES = ("pretrain", "sft", "grpo", "dpo")


def _phase_tag(v) -> str:
    kind = v.get("kind", "pretrain") if isinstance(v, dict) else getattr(v, "kind", "pretrain")
    return kind if kind in BUILTIN_PHASES else "custom"


PhaseConfig = Annotated[Union[Annotated[PretrainPhaseConfig, Tag("pretrain")], Annotated[SFTPhaseConfig, Tag("sft")],
                              Annotated[GRPOPhaseConfig, Tag("grpo")], Annotated[DPOPhaseConfig, Tag("dpo")],
                              Annotated[CustomPhaseConfig, Tag("custom")]],
                        Discriminator(_phase_tag)]
# built-in objectives with a pipeline loss (``Phase.pipeline``; tests/test_pipeline.py keeps both equal)
PIPELINE_PHASES = ("pretrain",)


class CheckpointConfig(_Strict):
    dir: Optional[str] = Field(None, description="Where checkpoints go; None = <logging.dir>/checkpoints.")
    save_interval: int = Field(0, ge=0, description="Save every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (older ones deleted after a good save).")
    init_from: Optional[str] = Field(None, description="Start weights from this checkpoint folder (optimizer fresh).")
    resume: bool = Field(False, description="Continue from <dir>/latest if it exists.")
    fallback: bool = Field(False, description="When the checkpoint `latest` names is unreadable (a damaged pointer, "
                                              "a truncated or corrupt file), resume from the newest older complete "
                                              "checkpoint instead of stopping; each one skipped is named in the log.")


class GuardConfig(_Strict):
    """The divergence guard (``recipe.guard``): every step, the loss and the gradient norm of every rank are checked
    for inf/NaN; a bad step is counted, logged and never saved, and the newest checkpoint before it is kept from
    pruning. ``max_bad_steps`` bad steps in a row stop the run (exit code 3) with one line naming the step and
    rank."""
    max_bad_steps: int = Field(3, ge=0, description="Consecutive bad steps that stop the run (0 = never stop "
                                                    "early: count and log only; a run whose last step is bad still "
                                                    "ends unsaved with exit code 3).")
    spike_factor: float = Field(0.0, ge=0, description="A step whose loss exceeds spike_factor x the median of "
                                                       "the last spike_window good steps' losses is bad too (0 = "
                                                       "off; e.g. 3).")
    spike_window: int = Field(50, ge=2, description="Good steps in the running median of the spike rule; the rule "
                                                    "applies once this many have been seen.")


class LoggingConfig(_Strict):
    dir: str = Field("runs/default", description="Run folder: metrics.jsonl, tensorboard/, checkpoints/.")
    interval: int = Field(10, gt=0, description="Log every N steps.")
    eval_interval: int = Field(0, ge=0, description="Eval loss every N steps (0 = at the end only).")
    eval_batches: int = Field(4, gt=0)
    tensorboard: bool = True
    progress_bar: Optional[bool] = Field(None, description="None = only on an interactive terminal.")
    peak_tflops: float = Field(1.0, gt=0, description="Per-device peak for the MFU estimate (e.g. 989 for H100 "
                                                     "bf16 dense).")


# Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]]
_SLURM_TIME = re.compile(r"(\d+)(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE")


class SlurmConfig(_Strict):
    """sbatch resources of one stage (``megannm stage``): each key is the sbatch option of the same name with '-' for
    '_'. None = not passed (the cluster's default). A chain's ``slurm:``, the recipe's and the stage entry's are
    merged key by key, in that order."""
    partition: Optional[str] = Field(None, description="--partition")
    account: Optional[str] = Field(None, description="--account")
    qos: Optional[str] = Field(None, description="--qos")
    time: Optional[str] = Field(None, description="--time limit, e.g. 2-00:00:00 (a requeued job gets it afresh).")
    nodes: Optional[int] = Field(None, gt=0, description="--nodes")
    ntasks_per_node: Optional[int] = Field(None, gt=0, description="--ntasks-per-node: one task (rank) per "
                                                                    "device; default gpus_per_node, else 1.")
    gpus_per_node: Optional[int] = Field(None, ge=0, description="--gpus-per-node")
    cpus_per_task: Optional[int] = Field(None, gt=0, description="--cpus-per-task (also each rank's OMP threads).")
    mem: Optional[str] = Field(None, description="--mem per node, e.g. 0 (all) or 500G.")
    constraint: Optional[str] = Field(None, description="--constraint")
    extra: list[str] = Field(default_factory=list, description="Further sbatch arguments, verbatim (e.g. "
                                                               "--exclusive, --signal=B:USR1@900); appended.")

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(f"a time limit is a quoted string such as \"12:00:00\" or \"2-00:00:00\" (got the "
                             f"number {v}: YAML reads an unquoted 12:00:00 as 43200)")
        if isinstance(v, str) and not _SLURM_TIME.fullmatch(v):
            raise ValueError(f"not a Slurm time limit (got {v!r}, expected minutes, hours:minutes:seconds or "
                             f"days-hours:minutes:seconds)")
        return v

    @field_validator("mem", mode="before")
    @classmethod
    def _mem(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `mem: 0` = all of the node's

    @field_validator("extra")
    @classmethod
    def _extra(cls, v: list[str]) -> list[str]:
        for a in v:
            if not a.startswith("-"):  # a bare word before the batch script would be taken for the script
                raise ValueError(f"each extra sbatch argument is an option starting with '-' (got {a!r})")
        return v

    def tasks_per_node(self) -> int:
        return self.ntasks_per_node or self.gpus_per_node or 1

    def world_size(self) -> int:
        return (self.nodes or 1) * self.tasks_per_node()


class Recipe(_Strict):
    name: str = "run"
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Weights and activations: bf16 (or fp16 with a dynamic loss scale) keeps fp32 master "
                            "weights in the optimizer; RoPE, norms, softmax and the loss run in fp32.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    phase: PhaseConfig = Field(default_factory=PretrainPhaseConfig,
                               description="The objective (phase.kind) and its options (phase.options).")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig, description="The divergence guard (inf/NaN, spikes).")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="sbatch resources for `megannm stage`.")

    @field_validator("phase", mode="before")
    @classmethod
    def _pretrain_by_default(cls, v):
        return {**v, "kind": "pretrain"} if isinstance(v, dict) and "kind" not in v else v

    # derived ------------------------------------------------------------------------------------------------------
    def data_parallel(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel

    def grad_accum(self, world_size: int) -> int:
        dp = self.data_parallel(world_size)
        return self.data.global_batch_size // (self.data.micro_batch_size * dp)


# ---------------------------------------------------------------------------------------------------------------------
# cross-field checks


def check_recipe(r: Recipe, world_size: Optional[int] = None,
                 vocab_size: Optional[int] = None) -> list[tuple[str, str]]:
    """Every impossible combination as (key.path, message). ``world_size``/``vocab_size`` add the checks that need
    them (known at launch, or from the data's vocab.json)."""
    errs: list[tuple[str, str]] = []
    m, p = r.model, r.parallel
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if pp > 1 and r.phase.kind not in PIPELINE_PHASES:
        errs.append(("parallel.pipeline_parallel", f"phase {r.phase.kind} cannot run with pipeline parallelism (got "
                     f"pipeline_parallel={pp} with phase.kind={r.phase.kind}, expected pipeline_parallel = 1: only "
                     f"phase {' or '.join(PIPELINE_PHASES)} has a pipeline loss)"))
    if p.zero_stage >= 2 and pp > 1:
        errs.append(("parallel.zero_stage", f"ZeRO stage {p.zero_stage} cannot run with pipeline parallelism "
                     f"(DeepSpeed's pipeline engine supports ZeRO 0 and 1) (got zero_stage={p.zero_stage} with "
                     f"pipeline_parallel={pp}, expected zero_stage <= 1 or pipeline_parallel = 1)"))
    if m.hidden_size % m.num_heads:
        errs.append(("model.num_heads", f"hidden_size must divide by num_heads (got hidden_size={m.hidden_size}, "
                     f"num_heads={m.num_heads})"))
    if m.num_heads % tp:
        errs.append(("model.num_heads", f"heads must divide by the tensor-parallel size (got {m.num_heads}, "
                     f"expected a multiple of parallel.tensor_parallel={tp})"))
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        errs.append(("model.num_kv_heads", f"num_heads must divide by num_kv_heads (got {m.num_heads} / {kv})"))
    if kv % tp:
        errs.append(("model.num_kv_heads", f"kv heads must divide by the tensor-parallel size (got {kv}, expected a "
                     f"multiple of parallel.tensor_parallel={tp})"))
    if m.ffn_hidden_size % tp:
        errs.append(("model.ffn_hidden_size", f"must divide by the tensor-parallel size (got {m.ffn_hidden_size}, "
                     f"expected a multiple of parallel.tensor_parallel={tp})"))
    if (m.hidden_size // max(m.num_heads, 1)) % 2:
        errs.append(("model.hidden_size", f"head dimension must be even for RoPE (got {m.hidden_size // m.num_heads})"))
    if m.num_layers % pp:
        errs.append(("model.num_layers", f"layers must divide by the pipeline size (got {m.num_layers}, expected a "
                     f"multiple of parallel.pipeline_parallel={pp})"))
    bad = set(m.loss_weights) - {"text", "image"}
    if bad:
        errs.append(("model.loss_weights", f"unknown modality {sorted(bad)[0]!r} (expected text, image)"))
    if r.data.seq_len > m.max_seq_len:
        errs.append(("data.seq_len", f"longer than the model supports (got {r.data.seq_len}, expected <= "
                     f"model.max_seq_len={m.max_seq_len})"))
    if r.optimizer.min_lr > r.optimizer.lr:
        errs.append(("optimizer.min_lr", f"above lr (got {r.optimizer.min_lr}, expected <= {r.optimizer.lr})"))
    if 0 < r.guard.spike_factor <= 1:  # the loss is at or above its median on half the steps: every run would stop
        errs.append(("guard.spike_factor", f"a spike is a loss several times its running median (got "
                     f"{r.guard.spike_factor}, expected 0 (off) or > 1, e.g. 3)"))
    if r.schedule.warmup_steps > r.schedule.train_steps:
        errs.append(("schedule.warmup_steps", f"longer than the run (got {r.schedule.warmup_steps}, expected <= "
                     f"schedule.train_steps={r.schedule.train_steps})"))
    s = r.schedule
    if s.decay_steps and s.decay != "wsd":
        errs.append(("schedule.decay_steps", f"only decay: wsd has a final decay phase (got decay_steps="
                     f"{s.decay_steps} with decay={s.decay})"))
    elif s.warmup_steps + s.decay_steps > s.train_steps:
        errs.append(("schedule.decay_steps", f"warm-up and decay longer than the run (got warmup_steps="
                     f"{s.warmup_steps} + decay_steps={s.decay_steps}, expected <= train_steps={s.train_steps})"))
    if r.precision != "fp32" and p.grad_accum_dtype == "fp32" and p.zero_stage == 0:
        # DeepSpeed 0.19: fp32 accumulation of low-precision gradients lives in its ZeRO-1 (BF16_Optimizer) and
        # ZeRO-2/3 optimizers; at stage 0 it raises "unsupported mix of model_dtype and grad_accum_dtype".
        errs.append(("parallel.zero_stage", f"precision {r.precision} accumulates gradients in fp32 only with ZeRO "
                     f">= 1 (got zero_stage=0 with parallel.grad_accum_dtype=fp32, expected zero_stage >= 1, or "
                     f"grad_accum_dtype={r.precision} to accept {r.precision} accumulation)"))
    elif r.precision != "fp32" and p.grad_accum_dtype not in ("fp32", r.precision):
        errs.append(("parallel.grad_accum_dtype", f"accumulate in fp32 or in the model's dtype (got "
                     f"{p.grad_accum_dtype} with precision {r.precision})"))
    if vocab_size is not None and vocab_size % tp:
        errs.append(("parallel.tensor_parallel", f"padded vocabulary must divide by the tensor-parallel size "
                     f"(got vocab {vocab_size}, tensor_parallel={tp})"))
    if r.phase.kind == "grpo":
        o, gbs = r.phase.options, r.data.global_batch_size
        answers = o.prompts_per_step * o.group_size
        if answers != gbs * o.mini_batches:
            errs.append(("phase.options.prompts_per_step", f"prompts_per_step x group_size answers must fill "
                         f"mini_batches optimizer steps of data.global_batch_size (got {o.prompts_per_step} x "
                         f"{o.group_size} = {answers}, expected {o.mini_batches} x {gbs} = {o.mini_batches * gbs})"))
        if o.cfg_scale != 1.0:
            # policy, old and reference log-probs are the conditional model's: a guided sample's ratio and KL would
            # describe a distribution it was not drawn from
            errs.append(("phase.options.cfg_scale", f"GRPO samples on-policy, without classifier-free guidance (got "
                         f"cfg_scale={o.cfg_scale:g}, expected 1; guidance is for megannm generate/evaluate/score)"))
        if o.loss_normalisation == "dr_grpo" and o.scale_rewards:
            errs.append(("phase.options.scale_rewards", "Dr. GRPO does not divide advantages by the group's std (got "
                         "scale_rewards=true with loss_normalisation=dr_grpo, expected false or unset)"))
    ws = p.world_size if world_size is None else world_size
    if p.world_size is not None and world_size is not None and p.world_size != world_size:
        errs.append(("parallel.world_size", f"the launcher started {world_size} ranks (got {world_size}, expected "
                     f"{p.world_size})"))
    if ws is not None:
        if ws % (tp * pp):
            errs.append(("parallel.world_size", f"world size is not tensor x pipeline x data (got {ws}, expected a "
                         f"multiple of tensor_parallel={tp} x pipeline_parallel={pp} = {tp * pp})"))
        else:
            dp = ws // (tp * pp)
            per_step = r.data.micro_batch_size * dp
            if r.data.global_batch_size % per_step:
                errs.append(("data.global_batch_size", f"must divide by micro_batch_size x data-parallel size (got "
                             f"{r.data.global_batch_size}, expected a multiple of {r.data.micro_batch_size} x {dp} = "
                             f"{per_step})"))
            elif pp > 1 and r.data.global_batch_size // per_step < pp:
                errs.append(("data.global_batch_size", f"micro-batches per step fewer than pipeline stages (got "
                             f"{r.data.global_batch_size // per_step}, expected >= pipeline_parallel={pp})"))
            if r.phase.kind == "grpo" and r.phase.options.prompts_per_step % dp:
                errs.append(("phase.options.prompts_per_step", f"must divide by the data-parallel size (got "
                             f"{r.phase.options.prompts_per_step}, dp={dp}): a group stays on one rank"))
    elif r.data.global_batch_size % r.data.micro_batch_size:
        errs.append(("data.global_batch_size", f"must divide by micro_batch_size (got {r.data.global_batch_size}, "
                     f"micro_batch_size={r.data.micro_batch_size})"))
    return errs


# ---------------------------------------------------------------------------------------------------------------------
# loading


def _merge(base: dict, child: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in child.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise RecipeError(f"{path}: base: inheritance cycle through {' -> '.join(str(s) for s in seen)}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        why = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}: {where}: not valid YAML ({why})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: (top): a recipe is a mapping (got {type(data).__name__})")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise RecipeError(f"{path}: base: expected a recipe file name (got {base!r})")
        if not (path.parent / base).is_file():
            raise RecipeError(f"{path}: base: {base}: recipe file not found ({path.parent / base})")
        parent = _read_yaml(path.parent / base, seen + (path.resolve(),))
        data = _merge(parent, data)
    return data


def _set_dotted(d: dict, dotted: str, value, source: str) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise RecipeError(f"{source}: {dotted}: {k} is not a mapping (got {nxt!r})")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise RecipeError(f"command line: {o}: an override is key.path=value")
        k, v = o.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
        except yaml.YAMLError:
            out.append((k.strip(), v))
    return out


def _members(annotation) -> list:
    """The types of a Union / Optional annotation (without None), or [] for any other annotation."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return []


def _discriminator(field):
    """A field's discriminator: a key name, or the ``Discriminator`` in its metadata (a callable one)."""
    return field.discriminator or next((m for m in field.metadata if isinstance(m, Discriminator)), None)


def _tagged(member, disc) -> tuple:
    """(tag, model) of a discriminated union's member: ``Annotated[Model, Tag(t)]`` or a model whose field
    ``disc`` has the tag as its default."""
    if typing.get_origin(member) is Annotated:
        model, *meta = typing.get_args(member)
        return next((m.tag for m in meta if isinstance(m, Tag)), None), model
    return member.model_fields[disc].default, member


def _walk(model: Optional[type[BaseModel]], loc: tuple) -> tuple[list, Optional[type[BaseModel]], Optional[int]]:
    """An error location as the user's keys: without the tags pydantic inserts for a union (``phase.grpo.options``
    -> ``phase.options``). Returns (keys, the model that holds the last key, and where the location ended in a plain
    union: the index in ``loc`` of the member pydantic tried, or None)."""
    keys, owner, ann, disc = [], None, model, None
    for i, x in enumerate(loc):
        members = _members(ann)
        if disc is not None and members:  # a discriminated union: x is the tag, the member is the key's schema
            tagged = dict(_tagged(m, disc) for m in members)
            if x in tagged:
                ann, disc = tagged[x], None
                continue
        elif len(members) == 1:  # Optional[X]
            ann = members[0]
        elif members:  # Union[X, Y]: x names the member that failed
            return keys, owner, i
        keys.append(x)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            owner, field = ann, ann.model_fields.get(x)
            ann, disc = (field.annotation, _discriminator(field)) if field else (None, None)
        else:  # list[X] (x an index) or dict[K, X] (x a key); anything else: the walk is blind from here
            args = typing.get_args(ann)
            ann, disc = (args[-1] if args else None), None
    return keys, owner, None


def format_validation_error(source: str, err: ValidationError, model: Optional[type[BaseModel]] = None) -> str:
    """The first error of a pydantic validation as one line ``source: dotted.key: what is wrong (got X)``.

    ``model``: the class that was validated (``Recipe``, a chain's schema); with it the key path is the one the user
    wrote (pydantic's union tags left out) and an unknown key lists the keys expected there."""
    errors = err.errors()
    e = errors[0]
    keys, owner, union_at = _walk(model, e["loc"])
    path = ".".join(str(k) for k in keys) or "(top)"
    kind, got = e["type"], e.get("input")
    if kind == "extra_forbidden":
        what = f"option for phase {owner.phase_kind}" if owner is not None and issubclass(owner, _Options) else "key"
        expected = ""
        if owner is not None:
            expected = f", expected one of {', '.join(owner.model_fields)}" if owner.model_fields else ", expected none"
        return f"{source}: {path}: unknown {what} (got {keys[-1]!r}{expected})"
    if kind == "missing":
        return f"{source}: {path}: required key is missing"
    if kind == "union_tag_invalid":  # the key that chooses the schema (phase.kind)
        disc, tags = e["ctx"]["discriminator"].strip("'"), e["ctx"]["expected_tags"].replace("'", "")
        return f"{source}: {path}.{disc}: unknown {disc} (got {e['ctx']['tag']!r}, expected one of {tags})"
    if kind == "value_error":  # our validators' messages say what is wrong and what was given
        return f"{source}: {path}: {e['ctx']['error']}"
    if union_at is not None:  # every member of a Union failed: name the members
        tried = [str(x["loc"][union_at]) for x in errors
                 if len(x["loc"]) > union_at and x["loc"][:union_at] == e["loc"][:union_at]]
        return f"{source}: {path}: Input should be {' or '.join(dict.fromkeys(tried))} (got {got!r})"
    return f"{source}: {path}: {e['msg']} (got {got!r})"


def recipe_from_dict(data: dict, source: str = "recipe", world_size: Optional[int] = None,
                     vocab_size: Optional[int] = None) -> Recipe:
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(source, e, Recipe)) from None
    errs = check_recipe(r, world_size=world_size, vocab_size=vocab_size)
    if errs:
        key, msg = errs[0]
        raise RecipeError(f"{source}: {key}: {msg}")
    return r


def load_recipe(path: str | Path, overrides: list[str] = (), world_size: Optional[int] = None) -> Recipe:
    """Load, inherit, override, validate. Raises RecipeError with one line."""
    path = Path(path)
    data = _read_yaml(path)
    for k, v in parse_overrides(list(overrides)):
        _set_dotted(data, k, v, str(path))
    return recipe_from_dict(data, source=str(path), world_size=world_size)


def dump_recipe(r: Recipe) -> str:
    return yaml.safe_dump(r.model_dump(mode="json"), sort_keys=False)
