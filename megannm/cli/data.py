"""``megannm tokenizers``, ``megannm preprocess`` and ``megannm sample-order``: your records, ready to train on.

    megannm tokenizers build --input train.jsonl --out tok/ [--image-kind patch_vq|learned|janus|emu3|chameleon]
    megannm tokenizers train-image --input train.jsonl --out vq/ [--steps N] [--resume]
    megannm tokenizers info tok/
    megannm preprocess --input train.jsonl --tokenizers tok/ --output shards/
    megannm sample-order RECIPE.yaml [key=value ...]

``build`` writes the whole folder (text tokenizer, image tokenizer, vocab.json) that ``preprocess``, ``train``,
``generate`` and ``evaluate`` take, and prints its sizes and how well the image tokenizer fits your pictures.
``train-image`` trains a learned VQ image tokenizer on your pictures (resumable; pass the folder to ``build
--image-tokenizer``). ``info`` prints the sizes of a tokenizers folder or of an image tokenizer. ``preprocess``
tokenises records into zstd token shards; ``sample-order`` builds a recipe's sample order (``data/epochs.py``) before
training, so that no rank waits for it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from megannm.cli.options import float_in, int_at_least, power_of_two

TOKENIZERS_HELP = """Make the tokenizers folder for your own data:

    megannm tokenizers build --input train.jsonl --out tok/ [--image-kind patch_vq|learned|janus|emu3|chameleon]
    megannm tokenizers train-image --input train.jsonl --out vq/ [--steps N] [--resume]
    megannm tokenizers info tok/

build: the whole folder (text tokenizer, image tokenizer, vocab.json) that preprocess, train, generate and evaluate
take, with its sizes and how well the image tokenizer fits your pictures. train-image: a learned VQ image tokenizer
trained on your pictures (resumable; pass its folder to build --image-tokenizer). info: the sizes of a tokenizers
folder or of an image tokenizer. megannm tokenizers SUBCOMMAND --help: its options."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", choices=("crop", "pad"), default="crop",
                   help="fit pictures to the tokenizer's square: centre crop (default) or pad with grey")
    p.add_argument("--image-size", type=int_at_least(1), default=None,
                   help="native side in pixels (default: the kind's own; 32 for patch_vq and learned)")
    p.add_argument("--codebook-size", type=int_at_least(2), default=None,
                   help="image codes (default: patch_vq 1024, learned 512)")
    p.add_argument("--max-images", type=int_at_least(1), default=None,
                   help="pictures to train on at most (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int_at_least(1), default=None, help="learned: training steps (default 2000)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="learned: pictures per step (default 8)")
    p.add_argument("--downsample", type=power_of_two, default=None, help="learned: pixels per token side (default 4)")
    p.add_argument("--codebook", choices=("ema", "st"), default=None,
                   help="learned: codewords by moving average (ema, default) or by gradient (st)")
    p.add_argument("--base-channels", type=int, default=None, help="learned: width of the network (default 32)")
    p.add_argument("--lr", type=float_in(0, low_open=True), default=None, help="learned: learning rate (default 3e-3)")
    p.add_argument("--holdout", type=float_in(0, 0.99), default=None,
                   help="learned: share of the pictures kept out of training to measure it (default 0.05)")
    p.add_argument("--device", default="auto", help="learned: auto (a GPU if there is one), cpu or cuda[:N]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="keep library warnings")


def _train_options(a) -> dict:
    names = ("steps", "batch_size", "downsample", "codebook", "base_channels", "lr", "holdout")
    return {n: getattr(a, n) for n in names if getattr(a, n) is not None}


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm tokenizers build",
                                description="Records -> a tokenizers folder (text tokenizer, image tokenizer, "
                                            "vocab.json) for preprocess, train, generate and evaluate.")
    p.add_argument("--input", "-i", required=True, nargs="+", action="extend", type=Path,
                   help="JSONL records ({'parts': [{'image': path}, {'text': ...}]} or chat 'messages'); image "
                        "paths are relative to their file")
    p.add_argument("--out", "-o", required=True, type=Path, help="tokenizers folder to create")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--text-tokenizer", type=Path, default=None,
                   help="a Hugging Face tokenizer folder (with tokenizer.json) to use as it is, e.g. Llama's")
    t.add_argument("--text-vocab-size", type=int_at_least(257), default=4096,
                   help="train a byte-level BPE of at most this size")
    i = p.add_mutually_exclusive_group()
    i.add_argument("--image-tokenizer", type=Path, default=None,
                   help="an image tokenizer saved before (any kind: train-image's output, a patch_vq .npz, ...)")
    i.add_argument("--image-kind", default="patch_vq",
                   help="patch_vq (default), learned (trained here), janus, emu3, chameleon (with --image-model); "
                        "pixels: continuous images (pixel patches as latents, flow matching)")
    p.add_argument("--image-model", type=Path, default=None,
                   help="janus / emu3 / chameleon: a local transformers folder (the VQ model or a whole model)")
    p.add_argument("--patch", type=int_at_least(1), default=4, help="patch_vq: pixels per patch side")
    _common(p)
    a = p.parse_args(argv)
    from megannm.data.build_tokenizers import build_tokenizers
    opts = _train_options(a)
    if a.image_kind == "learned":
        opts["device"] = _device(a.device)
    build_tokenizers(a.input, a.out, text_tokenizer=a.text_tokenizer, text_vocab_size=a.text_vocab_size,
                     image_tokenizer=a.image_tokenizer, image_kind=a.image_kind, image_model=a.image_model,
                     image_size=a.image_size, resize=a.resize, codebook_size=a.codebook_size, patch=a.patch,
                     train_options=opts, max_images=a.max_images, seed=a.seed, overwrite=a.overwrite,
                     progress=not a.no_progress and sys.stderr.isatty())
    return 0


def _train_image(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm tokenizers train-image",
                                description="Train a learned VQ image tokenizer (transformers' JanusVQVAE) on your "
                                            "pictures; the folder loads with transformers too.")
    p.add_argument("--input", "-i", required=True, nargs="+", action="extend", type=Path,
                   help="JSONL records, folders of pictures (searched recursively) or picture files")
    p.add_argument("--out", "-o", required=True, type=Path, help="image tokenizer folder (saved as it trains)")
    p.add_argument("--resume", action="store_true", help="continue the training saved in --out")
    p.add_argument("--save-every", type=int_at_least(1), default=None, help="steps between saves (default 250)")
    _common(p)
    a = p.parse_args(argv)
    from megannm.data.build_tokenizers import image_files, load_pictures
    from megannm.data.image_tokenizer.learned import config_from, train_image_tokenizer
    given = _train_options(a)  # what this command line says; the rest comes from the run it resumes, or defaults
    for name in ("image_size", "codebook_size", "save_every"):
        if getattr(a, name):
            given[name] = getattr(a, name)
    base = {"resize": a.resize, "seed": a.seed}
    if a.resume and (a.out / "image_tokenizer.json").is_file():
        base = json.loads((a.out / "image_tokenizer.json").read_text()).get("training", {}).get("config", base)
    opts = {**base, **given, "device": _device(a.device)}
    cfg = config_from(opts)
    files = image_files(a.input)
    images = load_pictures(files, (cfg.image_size, cfg.image_size), cfg.resize, limit=a.max_images, seed=a.seed)
    print(f"train-image: {len(images)} pictures at {cfg.image_size} px, {cfg.codebook_size} codes, "
          f"{(cfg.image_size // cfg.downsample) ** 2} tokens per image, {cfg.steps} steps on {cfg.device}")
    r = train_image_tokenizer(images, a.out, cfg, resume=a.resume, overwrite=a.overwrite,
                              progress=not a.no_progress and sys.stderr.isatty())
    h = r["held_out"]
    fit = f"held-out PSNR {h['psnr']:.2f} dB on {h['images']} pictures, {h['codes_used']} codes used" \
        if h.get("images") else "no held-out pictures"
    print(f"{a.out}: {r['steps']} steps in {r['seconds']:.0f} s; {fit}")
    return 130 if r["stopped"] else 0


def _info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm tokenizers info", description="Sizes of a tokenizers folder or of an "
                                                                            "image tokenizer.")
    p.add_argument("path", type=Path)
    p.add_argument("--verbose", action="store_true", help="keep library warnings")
    a = p.parse_args(argv)
    from megannm.data.image_tokenizer import load_image_tokenizer
    from megannm.data.tokenize import Tokenizers
    if (a.path / "vocab.json").exists():
        tok = Tokenizers.load(a.path)
        v = tok.vocab
        print(f"{a.path}: vocabulary {v.size} ids ({v.padded_size()} padded), fingerprint {v.fingerprint}")
        print(f"  text:  {v.text_size} ids")
        image = tok.image
    else:
        image = load_image_tokenizer(a.path)
        print(f"{a.path}:")
    d = image.describe()
    print(f"  image: {d['kind']}, {d['codebook_size']} codes, {d['tokens_per_image']} tokens per image "
          f"({d['grid'][0]}x{d['grid'][1]} at {d['image_size'][0]}x{d['image_size'][1]} px, {d['resize']}"
          f"{'' if d['decodes'] else ', encode only'})")
    return 0


SUBCOMMANDS = {"build": _build, "train-image": _train_image, "info": _info}


def tokenizers(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(TOKENIZERS_HELP, file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"megannm tokenizers: unknown subcommand {argv[0]!r} (expected one of {', '.join(SUBCOMMANDS)})",
                  file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return SUBCOMMANDS[argv[0]](argv[1:])


def preprocess(argv: list[str] | None = None) -> int:
    """``megannm preprocess`` / ``tools/preprocess_data.py``: exit 0, or 2 with one line on bad input."""
    from megannm.data.preprocess import preprocess as run_preprocess
    from megannm.data.shards import ShardError, token_summary
    from megannm.data.sources import SOURCES, SourceOptions
    from megannm.data.tokenize import RecordError
    from megannm.fileio import WriteError
    p = argparse.ArgumentParser(prog="megannm preprocess",
                                description="Tokenise records (interleaved 'parts' or chat 'messages'; caption pairs "
                                            "from WebDataset, Energon, Parquet or Hugging Face data sets) into a "
                                            "folder of zstd token shards with a manifest.")
    p.add_argument("--input", "-i", required=True, nargs="+", action="extend", type=Path,
                   help="JSONL file(s) (image paths in records are relative to their file), .tar shards or a "
                        "folder of them, an Energon data set folder, .parquet file(s), or a saved HF data set")
    p.add_argument("--source", choices=["auto", *SOURCES], default="auto",
                   help="kind of input (default: detected from the inputs)")
    p.add_argument("--image-column", default="image", help="Parquet/HF: column of encoded images (default image)")
    p.add_argument("--text-column", default="text", help="Parquet/HF: column of texts (default text)")
    p.add_argument("--image-first", action="store_true",
                   help="caption pairs as image then text (understanding) instead of text then image")
    p.add_argument("--split", default="train", help="Energon / HF DatasetDict: the split to read (default train)")
    p.add_argument("--skip-bad", type=int_at_least(0), default=0, metavar="N",
                   help="skip up to N bad samples (each reported on one line, counted in the manifest); the next "
                        "one aborts (default 0: the first aborts)")
    p.add_argument("--output", "-o", required=True, type=Path, help="shard folder to create")
    p.add_argument("--tokenizers", "-t", required=True, type=Path,
                   help="tokenizer bundle folder (text/, image_tokenizer.*, vocab.json)")
    p.add_argument("--workers", "-w", type=int_at_least(1), default=max(1, (os.cpu_count() or 1) - 1),
                   help="tokenising processes (default: CPUs - 1); the output does not depend on it")
    p.add_argument("--docs-per-shard", type=int_at_least(1), default=100_000, help="documents per shard file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        options = SourceOptions(image_column=a.image_column, text_column=a.text_column, image_first=a.image_first,
                                split=a.split)
        m = run_preprocess(a.input, a.output, a.tokenizers, workers=a.workers, docs_per_shard=a.docs_per_shard,
                           progress=not a.no_progress and sys.stderr.isatty(), overwrite=a.overwrite,
                           source=a.source, options=options, skip_bad=a.skip_bad)
    except (RecordError, ShardError, ValueError, FileNotFoundError, FileExistsError, KeyError, WriteError) as e:
        # (also here, not only in megannm.cli.main: tools/preprocess_data.py calls this function directly)
        if os.environ.get("MEGANNM_TRACEBACK") == "1":
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"megannm preprocess: error: {msg}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    print(f"{a.output}: {m['num_docs']} documents, {m['num_tokens']} tokens, {len(m['shards'])} shard(s), "
          f"{sum(s['bytes'] for s in m['shards'])} bytes (vocabulary {m['vocab_fingerprint']})")
    print("\n".join(token_summary(m)))  # per-document sizes and the seq_len that fits them (shards.py)
    return 0


def sample_order(argv: list[str]) -> int:
    """``megannm sample-order``: a recipe's sample order built before training (``data.loader.build_recipe_order``)."""
    p = argparse.ArgumentParser(prog="megannm sample-order",
                                description="Build a recipe's sample order (the train order for the whole run, and "
                                            "the validation order) before training starts.")
    p.add_argument("recipe", type=Path)
    p.add_argument("overrides", nargs="*", help="key=value recipe overrides, as for megannm train")
    a = p.parse_args(argv)
    from megannm.config import load_recipe
    from megannm.data.loader import build_recipe_order
    t = time.perf_counter()
    samples = build_recipe_order(load_recipe(a.recipe, a.overrides))
    print(f"{a.recipe}: sample order for {samples} training samples ready ({time.perf_counter() - t:.1f} s)")
    return 0
