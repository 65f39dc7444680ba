"""``megannm tokenizers``: make the tokenizers folder for your own data.

    megannm tokenizers build --input train.jsonl --out tok/ [--image-kind patch_vq|learned|janus|emu3|chameleon]
    megannm tokenizers train-image --input train.jsonl --out vq/ [--steps N] [--resume]
    megannm tokenizers info tok/

``build`` writes the whole folder (text tokenizer, image tokenizer, vocab.json) that ``preprocess``, ``train``,
``generate`` and ``evaluate`` take, and prints its sizes and how well the image tokenizer fits your pictures.
``train-image`` trains a learned VQ image tokenizer on your pictures (resumable; pass the folder to ``build
--image-tokenizer``). ``info`` prints the sizes of a tokenizers folder or of an image tokenizer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megannm.data.quiet import quiet_library_warnings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resize", choices=("crop", "pad"), default="crop",
                   help="fit pictures to the tokenizer's square: centre crop (default) or pad with grey")
    p.add_argument("--image-size", type=int, default=None, help="native side in pixels (default: the kind's own; "
                                                                 "32 for patch_vq and learned)")
    p.add_argument("--codebook-size", type=int, default=None, help="image codes (default: patch_vq 1024, learned 512)")
    p.add_argument("--max-images", type=int, default=None, help="pictures to train on at most (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="learned: training steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="learned: pictures per step (default 8)")
    p.add_argument("--downsample", type=int, default=None, help="learned: pixels per token side (default 4)")
    p.add_argument("--codebook", choices=("ema", "st"), default=None,
                   help="learned: codewords by moving average (ema, default) or by gradient (st)")
    p.add_argument("--base-channels", type=int, default=None, help="learned: width of the network (default 32)")
    p.add_argument("--lr", type=float, default=None, help="learned: learning rate (default 3e-3)")
    p.add_argument("--holdout", type=float, default=None,
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
    t.add_argument("--text-vocab-size", type=int, default=4096, help="train a byte-level BPE of at most this size")
    i = p.add_mutually_exclusive_group()
    i.add_argument("--image-tokenizer", type=Path, default=None,
                   help="an image tokenizer saved before (any kind: train-image's output, a patch_vq .npz, ...)")
    i.add_argument("--image-kind", default="patch_vq",
                   help="patch_vq (default), learned (trained here), janus, emu3, chameleon (with --image-model)")
    p.add_argument("--image-model", type=Path, default=None,
                   help="janus / emu3 / chameleon: a local transformers folder (the VQ model or a whole model)")
    p.add_argument("--patch", type=int, default=4, help="patch_vq: pixels per patch side")
    _common(p)
    a = p.parse_args(argv)
    quiet_library_warnings(a.verbose)
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
    p.add_argument("--save-every", type=int, default=None, help="steps between saves (default 250)")
    _common(p)
    a = p.parse_args(argv)
    quiet_library_warnings(a.verbose)
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
    quiet_library_warnings(a.verbose)
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip(), file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"megannm tokenizers: unknown subcommand {argv[0]!r} (expected one of {', '.join(SUBCOMMANDS)})",
                  file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return SUBCOMMANDS[argv[0]](argv[1:])
