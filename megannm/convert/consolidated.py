"""The hub of every conversion: one consolidated safetensors folder with canonical parameter names.

Layout of a consolidated folder::

    model.safetensors                     canonical names (``NMMModel``'s at TP = 1), vocabulary rows unpadded
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json beyond --max-shard-size)
    consolidated.json                     written last: format, model_args, vocab (dict + fingerprint), source
                                          (kind, path, layout, ZeRO stage, step, ...), dtype, files, total_size
    tokenizers/                           optional: the tokenizer bundle (text/, image_tokenizer.*, vocab.json)

Every other form converts to and from this one (DESIGN.md section 7): ``deepspeed.py`` reads DeepSpeed checkpoints
of any TP x PP x ZeRO layout and writes module-only ones at any layout, ``hf.py`` exports to and imports from Hugging
Face folders, and ``load_into_engine`` starts a training run at any layout from it (``checkpoint.init_from``).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from megannm.convert import reshard
from megannm.convert.files import (DEFAULT_SHARD_SIZE, ConvertError, SafetensorsReader, atomic_output,
                                   save_safetensors, write_json)
from megannm.vocab import Vocab, VocabMismatchError

META = "consolidated.json"
FORMAT = "megannm-consolidated"
VERSION = 1
TOKENIZERS = "tokenizers"

# ModelArgs fields that decide which parameters exist and what they mean: they must agree when weights move into a
# model built from a recipe. Training settings (z_loss, loss_weights, init_std, max_seq_len, rope_theta, dtype) may
# change from one stage to the next.
STRUCTURAL = ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab_size", "image_start", "image_end", "mot",
              "n_modalities", "qk_norm", "norm_reorder", "eps")


@dataclass
class Consolidated:
    """A whole model in canonical form, in memory: full tensors plus what gives them meaning."""
    state: dict  # canonical name -> full tensor (unpadded vocabulary rows)
    args: object  # ModelArgs, padded_vocab_size normalised to TP = 1
    vocab: Vocab
    source: dict = field(default_factory=dict)  # where it came from (kind, path, layout, zero_stage, step, ...)
    recipe: Optional[dict] = None  # the training recipe, when the source recorded one
    tokenizers: Optional[Path] = None  # a tokenizer bundle to carry along

    @property
    def step(self) -> int:
        return int(self.source.get("step") or 0)

    @property
    def consumed_samples(self) -> int:
        return int(self.source.get("consumed_samples") or 0)


def normalise_args(model_args: dict | object, vocab: Vocab, tp: int = 1):
    """ModelArgs with the padding of a TP size (the canonical form records TP = 1's)."""
    from megannm.model.transformer import ModelArgs
    args = model_args if isinstance(model_args, ModelArgs) else ModelArgs.from_dict(model_args)
    return dataclasses.replace(args, padded_vocab_size=vocab.padded_size(tp))


def num_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------------------------------------------------------
# writing and reading


def write(c: Consolidated, dst: str | Path, overwrite: bool = False,
          max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``c`` as a consolidated folder at ``dst`` (temporary folder + rename)."""
    reshard.check_shapes(c.state, reshard.canonical_shapes(c.args), "consolidated state")
    state = {k: c.state[k] for k in reshard.canonical_shapes(c.args)}  # canonical order
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        files = save_safetensors(tmp, state, max_shard_size, metadata={"vocab_fingerprint": c.vocab.fingerprint})
        if c.tokenizers is not None:
            shutil.copytree(c.tokenizers, tmp / TOKENIZERS)
        write_json(tmp / META, {
            "format": FORMAT, "version": VERSION, "model_args": c.args.to_dict(), "vocab": c.vocab.to_dict(),
            "source": c.source, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "files": files,
            "total_size": num_bytes(state), "num_params": sum(t.numel() for t in state.values()),
            "recipe": c.recipe})
    return dst


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / META
    if not path.exists():
        raise ConvertError(f"{folder}: not a consolidated checkpoint (no {META})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model_args", "vocab"):
        if key not in meta:
            raise ConvertError(f"{path}: required key {key} is missing")
    return meta


class Opened:
    """A consolidated folder opened lazily: metadata now, tensors (or TP slices of them) on request."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        where = str(self.folder / META)
        try:
            self.vocab = Vocab.from_dict(self.meta["vocab"], source=where)
            self.args = normalise_args(self.meta["model_args"], self.vocab)
        except (TypeError, ValueError) as e:
            raise ConvertError(f"{where}: {e}") from None
        self.reader = SafetensorsReader(self.folder)
        self.shapes = reshard.canonical_shapes(self.args)
        reshard.check_names(self.reader.keys(), self.shapes, str(self.folder))
        for name, shape in self.shapes.items():
            got = self.reader.shape(name)
            if got != tuple(shape):
                raise ConvertError(f"{self.folder / self.reader.map[name]}: parameter {name} has shape {list(got)}, "
                                   f"expected {list(shape)} (from {META})")

    def full(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def local(self, name: str, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
        """TP rank ``rank``'s slice, reading only its rows/columns from disk."""
        dim = reshard.split_dim(name)
        if name in reshard.VOCAB_PARAMS:
            per = padded_vocab // tp
            lo, hi = rank * per, (rank + 1) * per
            real = self.shapes[name][0]
            rows = self.reader.get_rows(name, 0, min(lo, real), min(hi, real))
            if rows.shape[0] < per:
                rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], *rows.shape[1:])])
            return rows
        if dim is None or tp == 1:
            return self.full(name)
        n = self.shapes[name][dim] // tp
        return self.reader.get_rows(name, dim, rank * n, (rank + 1) * n)

    def load(self) -> Consolidated:
        state = {name: self.full(name) for name in self.shapes}
        tok = self.folder / TOKENIZERS
        return Consolidated(state, self.args, self.vocab, dict(self.meta.get("source") or {}),
                            self.meta.get("recipe"), tok if tok.is_dir() else None)


def read(folder: str | Path) -> Consolidated:
    return Opened(folder).load()


# ---------------------------------------------------------------------------------------------------------------------
# into a running engine (checkpoint.init_from)


def check_structure(theirs, ours, source: str) -> None:
    """Refuse weights of a model whose parameters differ in shape or meaning from the one being trained."""
    a, b = theirs.to_dict(), ours.to_dict()
    for key in STRUCTURAL:
        if a.get(key) != b.get(key):
            raise ConvertError(f"{source}: model parameter {key} is {a.get(key)!r} in the checkpoint, "
                               f"{b.get(key)!r} in the recipe")


def engine_parameters(engine, args, layout) -> list[tuple[str, str, torch.nn.Parameter]]:
    """(canonical name, module name, parameter) for every parameter this rank's engine module holds."""
    names = list(engine.module.named_parameters())
    if layout.pp > 1:  # a PipelineModule: "<chain position>.<name inside the stage>"
        from megannm.convert.deepspeed import pipeline_canonical_name
        return [(pipeline_canonical_name(n), n, p) for n, p in names]
    return [(n, n, p) for n, p in names]


@torch.no_grad()
def load_local_into_engine(engine, args, layout, get_local: Callable[[str], torch.Tensor], source: str) -> int:
    """Copy this rank's slices (``get_local(canonical_name)``) into the engine's module at any ZeRO stage.

    ZeRO-3: each parameter is gathered, written on data-parallel rank 0 and re-partitioned on exit
    (``deepspeed.zero.GatheredParameters(modifier_rank=0)``). ZeRO-1/2/3 and bf16 keep an fp32 master copy in the
    optimizer: it is refreshed from the module afterwards, so the first step starts from the loaded weights."""
    import deepspeed
    params = engine_parameters(engine, args, layout)
    if layout.pp == 1:
        reshard.check_names((c for c, _, _ in params), reshard.canonical_shapes(args),
                            f"{source} -> the recipe's model")
    count = 0
    for canonical, name, p in params:
        t = get_local(canonical)
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(t.shape) != shape:
            raise ConvertError(f"{source}: parameter {canonical} gives shape {list(t.shape)} for tensor rank "
                               f"{layout.tp_rank}, the engine's {name} has {list(shape)}")
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            p.data.copy_(t)
        count += t.numel()
    opt = getattr(engine, "optimizer", None)
    if opt is not None and hasattr(opt, "refresh_fp32_params"):
        opt.refresh_fp32_params()
    return count


def load_into_engine(trainer, path: str | Path) -> None:
    """``checkpoint.init_from: <consolidated folder>``: load this rank's TP slice (and pipeline stage) into the
    trainer's engine, at whatever layout and ZeRO stage the trainer runs. The optimizer and schedule start fresh."""
    c = Opened(path)
    where = str(c.folder / META)
    if c.vocab.fingerprint != trainer.vocab.fingerprint:
        raise VocabMismatchError(f"vocabulary mismatch: {where} has fingerprint {c.vocab.fingerprint}, the recipe's "
                                 f"data has {trainer.vocab.fingerprint}")
    check_structure(c.args, trainer.args, where)
    layout, args = trainer.layout, trainer.args
    reshard.check_divisible(c.args, layout.tp, layout.pp, args.padded_vocab_size, where=where)
    load_local_into_engine(trainer.engine, args, layout,
                           lambda name: c.local(name, layout.tp, layout.tp_rank, args.padded_vocab_size), where)
