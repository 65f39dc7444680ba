"""The hub of every conversion: one consolidated safetensors folder with canonical parameter names.

Layout of a consolidated folder::

    model.safetensors                     canonical names (``NMMModel``'s at TP = 1), vocabulary rows unpadded
      (or model-0000i-of-0000n.safetensors + model.safetensors.index.json beyond --max-shard-size)
    consolidated.json                     written last: format, model_args, vocab (dict + fingerprint), source
                                          (kind, path, layout, ZeRO stage, step, ...), dtype, files, total_size
    tokenizers/                           optional: the tokenizer bundle (text/, image_tokenizer.*, vocab.json)

Every other form converts to and from this one (``megannm.convert``), and a training run starts from it at any layout
(``checkpoint.init_from``, which reads this rank's slices through ``Folder.local``).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from megannm.checkpoint import canonical
from megannm.checkpoint.folders import CheckpointError
from megannm.checkpoint.names import CONSOLIDATED_META as META
from megannm.checkpoint.tensors import (DEFAULT_SHARD_SIZE, LazyState, SafetensorsFolder, cast_to, save_safetensors,
                                        specs_of, tensor_bytes)
from megannm.fileio import atomic_output, atomic_write_json
from megannm.vocab import Vocab

FORMAT = "megannm-consolidated"
VERSION = 1
TOKENIZERS = "tokenizers"


@dataclass
class Consolidated:
    """A whole model in canonical form: full tensors (in memory, or a ``LazyState`` that reads them one at a time
    from their files) plus what gives them meaning."""
    state: Mapping  # canonical name -> full tensor (unpadded vocabulary rows)
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


def normalise_args(model_args, vocab: Vocab, tp: int = 1):
    """ModelArgs (or their dict) with the vocabulary padding of a TP size (the canonical form records TP = 1's)."""
    from megannm.model.args import ModelArgs
    args = model_args if isinstance(model_args, ModelArgs) else ModelArgs.from_dict(model_args)
    return dataclasses.replace(args, padded_vocab_size=vocab.padded_size(tp))


def write(c: Consolidated, dst: str | Path, overwrite: bool = False, max_shard_size: int = DEFAULT_SHARD_SIZE,
          dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``c`` as a consolidated folder at ``dst`` (temporary folder + rename), one shard at a time in canonical
    order; ``dtype`` casts the floating-point weights (default: as they come)."""
    shapes = canonical.canonical_shapes(c.args)
    specs = specs_of(c.state)
    canonical.check_shape_map({k: s for k, (s, _) in specs.items()}, shapes, "consolidated state")
    specs = {k: (specs[k][0], cast_to(specs[k][1], dtype)) for k in shapes}  # canonical order
    dtypes = sorted({str(dt).replace("torch.", "") for _, dt in specs.values()})
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        files = save_safetensors(tmp, LazyState(specs, c.state.__getitem__), max_shard_size,
                                 metadata={"vocab_fingerprint": c.vocab.fingerprint}, dtype=dtype)
        if c.tokenizers is not None:
            shutil.copytree(c.tokenizers, tmp / TOKENIZERS)
        atomic_write_json(tmp / META, {
            "format": FORMAT, "version": VERSION, "model_args": c.args.to_dict(), "vocab": c.vocab.to_dict(),
            "source": c.source, "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "files": files,
            "total_size": sum(tensor_bytes(*s) for s in specs.values()),
            "num_params": sum(torch.Size(s).numel() for s, _ in specs.values()), "recipe": c.recipe})
    return dst


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / META
    if not path.exists():
        raise CheckpointError(f"{folder}: not a consolidated checkpoint (no {META})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("model_args", "vocab"):
        if key not in meta:
            raise CheckpointError(f"{path}: required key {key} is missing")
    return meta


class Folder:
    """A consolidated folder opened lazily: metadata, names and shapes checked now, tensors (or TP slices of them)
    read on request."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        where = str(self.folder / META)
        try:
            self.vocab = Vocab.from_dict(self.meta["vocab"], source=where)
            self.args = normalise_args(self.meta["model_args"], self.vocab)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        self.reader = SafetensorsFolder(self.folder)
        self.shapes = canonical.canonical_shapes(self.args)
        canonical.check_names(self.reader.keys(), self.shapes, str(self.folder))
        self.specs = {name: self.reader.spec(name) for name in self.shapes}
        for name, shape in self.shapes.items():
            got = self.specs[name][0]
            if got != tuple(shape):
                raise CheckpointError(f"{self.folder / self.reader.map[name]}: parameter {name} has shape "
                                      f"{list(got)}, expected {list(shape)} (from {META})")

    def full(self, name: str) -> torch.Tensor:
        return self.reader.get(name)

    def local(self, name: str, tp: int, rank: int, padded_vocab: int) -> torch.Tensor:
        """TP rank ``rank``'s slice, reading only its rows/columns from disk."""
        dim = canonical.split_dim(name)
        if name in canonical.VOCAB_PARAMS:
            per = padded_vocab // tp
            real = self.shapes[name][0]
            rows = self.reader.get_rows(name, 0, min(rank * per, real), min((rank + 1) * per, real))
            if rows.shape[0] < per:
                rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], *rows.shape[1:])])
            return rows
        if dim is None or tp == 1:
            return self.full(name)
        n = self.shapes[name][dim] // tp
        return self.reader.get_rows(name, dim, rank * n, (rank + 1) * n)

    def load(self) -> Consolidated:
        """The whole folder as a ``Consolidated`` whose state reads each tensor when asked for."""
        tok = self.folder / TOKENIZERS
        return Consolidated(LazyState(self.specs, self.full), self.args, self.vocab,
                            dict(self.meta.get("source") or {}), self.meta.get("recipe"), tok if tok.is_dir() else None)


def read(folder: str | Path) -> Consolidated:
    return Folder(folder).load()
