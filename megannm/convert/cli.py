"""``megannm convert SRC DST --to {consolidated,deepspeed,hf}``: argument parsing and dispatch only.

SRC is recognised by what it holds: ``consolidated.json`` (the consolidated hub), ``megannm.json`` or a ``latest``
pointer (a megannm DeepSpeed checkpoint of any TP x PP x ZeRO layout), or ``config.json`` (a Hugging Face LLM, which
only converts ``--to consolidated``). Every route passes through the consolidated form (in memory unless it is the
target).

Conversion streams: tensors are read (memory-mapped), joined from their TP shards and cast when the output file that
holds them is written, so memory stays one output file (a safetensors shard of at most --max-shard-size, a DeepSpeed
rank file), not the model.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import torch

from megannm import checkpoint
from megannm.checkpoint.tensors import DEFAULT_SHARD_SIZE
from megannm.convert import ConvertError

TARGETS = ("consolidated", "deepspeed", "hf")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype

EXAMPLES = """examples:
  megannm convert runs/joint/checkpoints out/joint --to consolidated --tokenizers tokenizers/
  megannm convert out/joint out/joint-tp2pp2 --to deepspeed --tp 2 --pp 2
  megannm convert out/joint out/joint-hf --to hf --tokenizers tokenizers/   (MoT: trust_remote_code=True)
  megannm convert llama/ out/start --to consolidated --image-tokenizer tokenizers/image_tokenizer.npz

A consolidated folder also starts training directly at any layout: checkpoint.init_from: <folder>."""


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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="megannm convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert checkpoints through the consolidated safetensors form: DeepSpeed (any tensor x pipeline "
                    "x ZeRO layout) <-> consolidated <-> Hugging Face; re-shard with --to deepspeed --tp N --pp N.",
        epilog=EXAMPLES)
    p.add_argument("src", type=Path, help="consolidated folder, megannm DeepSpeed checkpoint, or Hugging Face folder")
    p.add_argument("dst", type=Path, help="output folder (written to a temporary name, then renamed)")
    p.add_argument("--to", required=True, choices=TARGETS)
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size of a --to deepspeed output (default 1)")
    p.add_argument("--pp", type=int, default=None, help="pipeline size of a --to deepspeed output (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype of the written weights (default: --to hf in the run's precision recorded in the "
                        "checkpoint, e.g. bf16 for a bf16 run; --to consolidated/deepspeed full precision, what a "
                        "next stage starts from: fp32 from a DeepSpeed checkpoint, as stored from a consolidated "
                        "folder)")
    p.add_argument("--weights", choices=("auto", "module", "master"), default="auto",
                   help="DeepSpeed source: 'module' reads the module files only (what the engine computes with: "
                        "fp32 under fp32, a bf16 copy under bf16, placeholders under ZeRO-3); 'master' the fp32 "
                        "master from the optimizer partitions (memory-mapped: only the master's bytes are used, a "
                        "third of those files beside the Adam moments, but the whole files are read once for their "
                        "crc32 check: ~6x the bytes of bf16 module files); "
                        "'auto' (default) reads the "
                        "partitions only where the module files cannot give --dtype exactly (ZeRO-3; bf16/fp16 "
                        "ZeRO-1/2 with --dtype fp32). The choice and its cost are printed in one line")
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # accepted for old scripts; unused
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--max-shard-size", default=str(DEFAULT_SHARD_SIZE),
                   help="safetensors file size above which weights are split into shards + index (e.g. 500MB)")
    p.add_argument("--tokenizers", type=Path, default=None,
                   help="tokenizer bundle (text/, image_tokenizer.*, vocab.json): exported beside --to hf weights "
                        "and kept inside a consolidated folder")
    p.add_argument("--image-tokenizer", type=Path, default=None,
                   help="Hugging Face LLM -> megannm: the image tokenizer whose codes extend the LLM's vocabulary")
    p.add_argument("--dense", action="store_true",
                   help="Hugging Face LLM -> megannm: the dense twin (default: MoT, every modality from the LLM)")
    p.add_argument("--seed", type=int, default=0, help="Hugging Face LLM -> megannm: noise seed of the new rows")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")  # megatron-core's import-time notices

    src, dst = a.src, a.dst
    shard = parse_size(a.max_shard_size)
    if a.to != "deepspeed" and (a.tp or a.pp):
        raise ConvertError(f"--tp/--pp set the layout of a --to deepspeed output (got --to {a.to}; the consolidated "
                           f"and Hugging Face forms have no layout)")
    if dst.exists() and not a.overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    if src.resolve() == dst.resolve():
        raise ConvertError(f"{dst}: is the source itself")
    kind = source_kind(src)

    if kind == "hf":
        if a.to != "consolidated":
            raise ConvertError(f"{src}: a Hugging Face LLM converts --to consolidated (then train from it, or convert "
                               f"that --to deepspeed); got --to {a.to}")
        if a.image_tokenizer is None:
            raise ConvertError(f"{src}: a Hugging Face LLM needs --image-tokenizer (its codes extend the vocabulary)")
        from megannm.convert.hf import import_hf
        out = import_hf(src, dst, a.image_tokenizer, mot=not a.dense, seed=a.seed, overwrite=a.overwrite,
                        max_shard_size=shard)
        print(f"{out}: consolidated {'dense' if a.dense else 'MoT'} model from {src} (init_from: {out})")
        return 0

    dtype = a.dtype or default_dtype(src, kind, a.to)
    c = load_source(src, kind, a.weights, dtype)
    if kind == "deepspeed":  # progress on stdout: stderr holds only the one error line
        print(f"megannm convert: weights: {c.source.get('weights')}; writing {dtype}")
    cast = DTYPES[dtype] if dtype else None
    if a.tokenizers is not None:
        c.tokenizers = a.tokenizers
    if a.to == "consolidated":
        if c.tokenizers is not None:
            from megannm.data.tokenize import Tokenizers
            c.vocab.check_same(Tokenizers.load(c.tokenizers).vocab.fingerprint, str(src),
                               str(Path(c.tokenizers) / "vocab.json"))
        from megannm.checkpoint.consolidated import write
        out = write(c, dst, overwrite=a.overwrite, max_shard_size=shard, dtype=cast)
    elif a.to == "deepspeed":
        from megannm.convert.deepspeed import write_deepspeed
        out = write_deepspeed(c, dst, tp=a.tp or 1, pp=a.pp or 1, overwrite=a.overwrite, dtype=cast)
    else:
        from megannm.convert.hf import architecture, export_hf
        out = export_hf(c, dst, tokenizers=c.tokenizers, overwrite=a.overwrite, max_shard_size=shard, dtype=cast)
        if c.tokenizers is None:
            print("megannm convert: note: no tokenizer exported (pass --tokenizers DIR)", file=sys.stderr)
        print(f"{out}: Hugging Face {architecture(c.args)} from {src} ({describe(c)})")
        return 0
    extra = f" at tp={a.tp or 1} pp={a.pp or 1} (module only: fresh optimizer)" if a.to == "deepspeed" else ""
    print(f"{out}: {a.to}{extra} from {src} ({describe(c)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
