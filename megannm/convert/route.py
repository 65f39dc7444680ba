"""One conversion: SRC (recognised by what it holds) -> DST in the form ``to`` (what ``megannm convert`` calls).

SRC is recognised by what it holds: ``consolidated.json`` (the consolidated hub), ``megannm.json`` or a ``latest``
pointer (a megannm DeepSpeed checkpoint of any TP x PP x ZeRO layout), or ``config.json`` (a Hugging Face LLM, which
only converts ``--to consolidated``). Every route passes through the consolidated form (in memory unless it is the
target).

Conversion streams: tensors are read (memory-mapped), joined from their TP shards and cast when the output file that
holds them is written, so memory stays one output file (a safetensors shard of at most --max-shard-size, a DeepSpeed
rank file), not the model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

from megannm import checkpoint
from megannm.checkpoint.tensors import DEFAULT_SHARD_SIZE
from megannm.convert import ConvertError

TARGETS = ("consolidated", "deepspeed", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype


def parse_size(text: str | int) -> int:
    """``"500MB"``, ``"5GB"``, ``"1GiB"``, ``"123"`` -> bytes (decimal units as Hugging Face's ``max_shard_size``)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ConvertError(f"--max-shard-size: not a size (got {text!r}, expected e.g. 500MB or 5GB)")
    scale = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
             "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}[m.group(2).rstrip("B")]
    return int(float(m.group(1)) * scale)


def source_kind(src: Path) -> str:
    """What ``src`` holds: ``consolidated``, ``deepspeed`` or ``hf`` (a Hugging Face model folder)."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if not src.is_dir():
        raise NotADirectoryError(f"{src}: a checkpoint is a folder")
    kind = checkpoint.kind_of(src)
    if kind is not None:
        return kind
    if (src / "config.json").exists():
        return "hf"
    raise ConvertError(f"{src}: not a checkpoint (no {checkpoint.CONSOLIDATED_META}, {checkpoint.META}, "
                       f"{checkpoint.LATEST} or config.json)")


def default_dtype(src: Path, kind: str, target: str) -> str | None:
    """--dtype when not given (None: as the source stores it).

    A Hugging Face export is written in the run's precision (the recipe recorded in the checkpoint: bf16 for a bf16
    run, which a DeepSpeed source gives exactly from its module files, optimizer partitions unread). The forms
    training starts from (consolidated, deepspeed) keep full precision: fp32 from a DeepSpeed source (the master,
    so that a stage boundary rounds nothing), the stored dtype from a consolidated one (upcasting adds nothing)."""
    if target != "hf":
        return "fp32" if kind == "deepspeed" else None
    if kind == "consolidated":
        from megannm.checkpoint.consolidated import read_meta
        recipe = read_meta(src).get("recipe") or {}
    else:
        recipe = checkpoint.read_meta(src).get("recipe") or {}
    precision = recipe.get("precision", "fp32")
    return precision if precision in DTYPES else "fp32"


def load_source(src: Path, kind: str, weights: str = "auto", dtype: str | None = "fp32"):
    """The source as a ``Consolidated`` whose tensors are read one at a time when written (nothing loaded yet)."""
    if kind == "consolidated":
        if weights != "auto":
            raise ConvertError(f"{src}: --weights chooses between a DeepSpeed checkpoint's module files and its "
                               f"optimizer partitions (a consolidated folder has one set of weights)")
        from megannm.checkpoint.consolidated import read
        return read(src)
    from megannm.checkpoint.deepspeed import read_deepspeed
    return read_deepspeed(src, weights=weights, dtype=DTYPES[dtype or "fp32"])


def describe(c) -> str:
    s = c.source
    if s.get("kind") == "deepspeed":
        lay = s.get("layout") or {}
        zero = "module-only" if s.get("zero_stage") is None else f"zero={s.get('zero_stage')}"
        return f"deepspeed tp={lay.get('tp')} pp={lay.get('pp')} {zero}, step {s.get('step')}: {s.get('weights')}"
    return s.get("kind", "consolidated")


def convert(src: Path, dst: Path, to: str, *, tp: int | None = None, pp: int | None = None, dtype: str | None = None,
            weights: str = "auto", overwrite: bool = False, max_shard_size: str | int = DEFAULT_SHARD_SIZE,
            tokenizers: Path | None = None, image_tokenizer: Path | None = None, dense: bool = False, seed: int = 0,
            say: Callable[[str], None] = print, note: Callable[[str], None] = print) -> Path:
    """Convert ``src`` into ``dst`` (written under a temporary name, then renamed) and return ``dst``. ``say`` gets
    the progress and result lines, ``note`` the warnings (the command sends them to stdout and stderr)."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise ConvertError(f"--to: expected one of {', '.join(TARGETS)} (got {to!r})")
    shard = parse_size(max_shard_size)
    if to != "deepspeed" and (tp or pp):
        raise ConvertError(f"--tp/--pp set the layout of a --to deepspeed output (got --to {to}; the consolidated "
                           f"and Hugging Face forms have no layout)")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    if src.resolve() == dst.resolve():
        raise ConvertError(f"{dst}: is the source itself")
    kind = source_kind(src)

    if kind == "hf":
        if to != "consolidated":
            raise ConvertError(f"{src}: a Hugging Face LLM converts --to consolidated (then train from it, or convert "
                               f"that --to deepspeed); got --to {to}")
        if image_tokenizer is None:
            raise ConvertError(f"{src}: a Hugging Face LLM needs --image-tokenizer (its codes extend the vocabulary)")
        from megannm.convert.hf import import_hf
        out = import_hf(src, dst, image_tokenizer, mot=not dense, seed=seed, overwrite=overwrite,
                        max_shard_size=shard)
        say(f"{out}: consolidated {'dense' if dense else 'MoT'} model from {src} (init_from: {out})")
        return out

    dtype = dtype or default_dtype(src, kind, to)
    c = load_source(src, kind, weights, dtype)
    if kind == "deepspeed":
        say(f"megannm convert: weights: {c.source.get('weights')}; writing {dtype}")
    cast = DTYPES[dtype] if dtype else None
    if tokenizers is not None:
        c.tokenizers = tokenizers
    if to == "consolidated":
        if c.tokenizers is not None:
            from megannm.data.tokenize import Tokenizers
            c.vocab.check_same(Tokenizers.load(c.tokenizers).vocab.fingerprint, str(src),
                               str(Path(c.tokenizers) / "vocab.json"))
        from megannm.checkpoint.consolidated import write
        out = write(c, dst, overwrite=overwrite, max_shard_size=shard, dtype=cast)
    elif to == "deepspeed":
        from megannm.convert.deepspeed import write_deepspeed
        out = write_deepspeed(c, dst, tp=tp or 1, pp=pp or 1, overwrite=overwrite, dtype=cast)
    else:
        from megannm.convert.hf import architecture, export_hf
        out = export_hf(c, dst, tokenizers=c.tokenizers, overwrite=overwrite, max_shard_size=shard, dtype=cast)
        if c.tokenizers is None:
            note("megannm convert: note: no tokenizer exported (pass --tokenizers DIR)")
        say(f"{out}: Hugging Face {architecture(c.args)} from {src} ({describe(c)})")
        return out
    extra = f" at tp={tp or 1} pp={pp or 1} (module only: fresh optimizer)" if to == "deepspeed" else ""
    say(f"{out}: {to}{extra} from {src} ({describe(c)})")
    return out
