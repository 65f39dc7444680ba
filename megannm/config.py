"""The recipe schema: typed, nested, extra keys forbidden, checked before any process starts.

A recipe is one YAML file. ``base: other.yaml`` inherits another recipe (paths relative to the file; the child's
keys override the base's, nested mappings merged key by key). Command-line overrides ``a.b.c=value`` are parsed as
YAML scalars and applied last. Every error is one line: ``recipe.yaml: key.path: what is wrong (got X, expected Y)``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class RecipeError(ValueError):
    """A recipe that cannot be used; the message is one line naming the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    warmup_steps: int = Field(10, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    exit_interval: int = Field(0, ge=0, description="Save and stop once step % exit_interval == 0 (0 = never); "
                                                    "the schedule still spans train_steps, so a resume continues it.")
    exit_duration_minutes: float = Field(0, ge=0, description="Save and stop after this much wall time (0 = "
                                                               "never); for jobs shorter than the run.")


class PhaseConfig(_Strict):
    kind: Literal["pretrain", "sft", "grpo", "dpo"] = "pretrain"
    options: dict = Field(default_factory=dict, description="Phase-specific settings, checked by the phase.")


class CheckpointConfig(_Strict):
    dir: Optional[str] = Field(None, description="Where checkpoints go; None = <logging.dir>/checkpoints.")
    save_interval: int = Field(0, ge=0, description="Save every N steps (0 = only at the end).")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept (older ones deleted after a good save).")
    init_from: Optional[str] = Field(None, description="Start weights from this checkpoint folder (optimizer fresh).")
    resume: bool = Field(False, description="Continue from <dir>/latest if it exists.")


class LoggingConfig(_Strict):
    dir: str = Field("runs/default", description="Run folder: metrics.jsonl, tensorboard/, checkpoints/.")
    interval: int = Field(10, gt=0, description="Log every N steps.")
    eval_interval: int = Field(0, ge=0, description="Eval loss every N steps (0 = at the end only).")
    eval_batches: int = Field(4, gt=0)
    tensorboard: bool = True
    progress_bar: Optional[bool] = Field(None, description="None = only on an interactive terminal.")
    peak_tflops: float = Field(1.0, gt=0, description="Per-device peak for the MFU estimate (e.g. 989 for H100 "
                                                     "bf16 dense).")


class Recipe(_Strict):
    name: str = "run"
    seed: int = 1234
    precision: Literal["fp32", "bf16"] = "fp32"
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    phase: PhaseConfig = Field(default_factory=PhaseConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    slurm: dict = Field(default_factory=dict, description="sbatch resources for `megannm stage` (partition, "
                                                          "account, time, nodes, gpus_per_node, ...).")

    # derived ------------------------------------------------------------------------------------------------------
    def data_parallel(self, world_size: int) -> int:
        return world_size // self.parallel.model_parallel

    def grad_accum(self, world_size: int) -> int:
        dp = self.data_parallel(world_size)
        return self.data.global_batch_size // (self.data.micro_batch_size * dp)


# ---------------------------------------------------------------------------------------------------------------------
# cross-field checks


def check_recipe(r: Recipe, world_size: Optional[int] = None, vocab_size: Optional[int] = None) -> list[tuple[str, str]]:
    """Every impossible combination as (key.path, message). ``world_size``/``vocab_size`` add the checks that need
    them (known at launch, or from the data's vocab.json)."""
    errs: list[tuple[str, str]] = []
    m, p = r.model, r.parallel
    tp, pp = p.tensor_parallel, p.pipeline_parallel
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
    if r.schedule.warmup_steps > r.schedule.train_steps:
        errs.append(("schedule.warmup_steps", f"longer than the run (got {r.schedule.warmup_steps}, expected <= "
                     f"schedule.train_steps={r.schedule.train_steps})"))
    if vocab_size is not None and vocab_size % tp:
        errs.append(("parallel.tensor_parallel", f"padded vocabulary must divide by the tensor-parallel size "
                     f"(got vocab {vocab_size}, tensor_parallel={tp})"))
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
        raise RecipeError(f"{path}: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: (top): a recipe is a mapping (got {type(data).__name__})")
    base = data.pop("base", None)
    if base is not None:
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
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


def _format_validation(source: str, e: ValidationError) -> str:
    err = e.errors()[0]
    path = ".".join(str(x) for x in err["loc"]) or "(top)"
    kind = err["type"]
    got = err.get("input")
    if kind == "extra_forbidden":
        return f"{source}: {path}: unknown key (got {path.split('.')[-1]!r})"
    if kind == "missing":
        return f"{source}: {path}: required key is missing"
    msg = err["msg"]
    expected = ""
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        expected = f", expected {ctx['expected']}"
    return f"{source}: {path}: {msg} (got {got!r}{expected})"


def recipe_from_dict(data: dict, source: str = "recipe", world_size: Optional[int] = None,
                     vocab_size: Optional[int] = None) -> Recipe:
    try:
        r = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation(source, e)) from None
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
