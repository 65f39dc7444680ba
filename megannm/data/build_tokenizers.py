"""Your records -> a whole tokenizers folder (``megannm tokenizers build``), and the pictures for a learned image
tokenizer (``megannm tokenizers train-image``).

The folder is what ``preprocess``, ``train``, ``generate`` and ``evaluate`` take: ``text/`` (a byte-level BPE trained
on the records' texts, or a Hugging Face tokenizer folder copied as it is), the image tokenizer (any kind:
``patch_vq`` trained on the records' pictures, a ``learned`` VQ trained on them, a pretrained ``janus`` / ``emu3`` /
``chameleon`` VQ from a local folder, or any saved tokenizer, third-party kinds included) and ``vocab.json`` (the
unified vocabulary and its fingerprint). The build says how well the image tokenizer fits the pictures, because a
lossy tokenizer makes a model memorise codes instead of learning pictures (measured: 8,044 distinct 4x4 patches
for 2,048 codes gave a held-out image loss near ln 2048), and nothing else would tell.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from megannm.data.tokenize import RecordError, Tokenizers, load_image
from megannm.fileio import atomic_write_json, scratch_folder, write_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_SIZES = {"patch_vq": 32, "learned": 32, "pixels": 32}  # native side when --image-size is not given
IMAGE_BYTES = 1 << 30  # pictures held in memory to train an image tokenizer (--max-images caps the count too)


# ---------------------------------------------------------------------------------------------------------------------
# reading records


def _records(paths):
    """(record, "file:line", folder of the file) of every JSONL line; bad JSON is one RecordError line."""
    for path in (Path(p) for p in paths):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: records file not found")
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield json.loads(line), where, path.parent
                except json.JSONDecodeError as e:
                    raise RecordError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None


def collect(paths) -> tuple[list[str], list[tuple[Path, str]]]:
    """The texts and the image files (with the record that names them) of interleaved ``parts`` and chat
    ``messages`` records; images are paths relative to their JSONL file, each file listed once."""
    texts, images, seen = [], [], set()
    for record, where, base in _records(paths):
        if not isinstance(record, dict) or not ("parts" in record or "messages" in record):
            raise RecordError(f"{where}: a record is a JSON object with 'parts' or 'messages'")
        if "parts" in record:
            parts = record["parts"] if isinstance(record["parts"], list) else []
        else:
            parts = []
            for m in record["messages"] if isinstance(record["messages"], list) else []:
                c = m.get("content") if isinstance(m, dict) else None
                parts += [{"text": c}] if isinstance(c, str) else [
                    {"text": p.get("text")} if p.get("type") == "text" else {"image": p.get("image")}
                    for p in (c or []) if isinstance(p, dict)]
        for part in parts:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and "image" in part:
                if not isinstance(part["image"], str) or not part["image"]:
                    raise RecordError(f"{where}: an image part needs a file path (got {part['image']!r})")
                path = (base / part["image"]).resolve()
                if path not in seen:
                    seen.add(path)
                    images.append((path, where))
    return texts, images


def image_files(inputs) -> list[tuple[Path, str]]:
    """Pictures named by JSONL records, or found (recursively, sorted) in folders, or given as files."""
    out = []
    for p in (Path(i) for i in inputs):
        if p.is_dir():
            out += [(f, str(f)) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.suffix.lower() in (".jsonl", ".json"):
            out += collect([p])[1]
        elif p.is_file():
            out.append((p, str(p)))
        else:
            raise FileNotFoundError(f"{p}: not found (expected JSONL records, a folder of pictures or a picture)")
    return out


def load_pictures(files: list[tuple[Path, str]], size: tuple[int, int], policy: str, limit: int | None = None,
                  seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3] of (a seeded sample of at most ``limit`` of) ``files``, fitted by ``policy``."""
    if not files:
        raise ValueError("no images in the inputs (records need {'image': path} parts)")
    cap = max(1, IMAGE_BYTES // (size[0] * size[1] * 3))
    limit = min(limit or cap, cap)
    if len(files) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in pick]
    return np.stack([load_image(path, size, where, policy) for path, where in files])


# ---------------------------------------------------------------------------------------------------------------------
# the image tokenizer


def fit_diagnostic(tok, images: np.ndarray) -> tuple[dict, list[str]]:
    """(numbers, warnings) on how ``tok`` codes ``images``: for ``patch_vq`` distinct patches vs codes and the
    share of patches coded exactly; for tokenizers with a decoder, the reconstruction error."""
    from megannm.data.image_tokenizer.learned import reconstruction_error

    warnings = []
    if tok.kind == "patch_vq":
        fit = tok.fit_report(images)
        if fit["exact_share"] < 1.0:
            p, half = tok.patch, tok.patch // 2
            if half and fit.get("distinct_half_patches", 1 << 62) <= fit["codes"]:
                cure = (f"--patch {half} codes these pictures exactly ({fit['distinct_half_patches']} distinct "
                        f"{half}x{half} patches; {4 * tok.num_tokens} tokens per image)")
            else:
                cure = "--image-kind learned trains a VQ with an encoder and a decoder on your pictures"
            warnings.append(f"patch_vq is lossy here: {fit['distinct_patches']} distinct {p}x{p} patches for "
                            f"{fit['codes']} codes, {fit['exact_share']:.0%} of patches coded exactly; a model may "
                            f"memorise codes instead of learning pictures. Try: {cure}")
    elif tok.can_decode:
        fit = dict(reconstruction_error(tok, images), on="pictures of the records")
    else:
        codes = tok.encode(images)
        fit = {"images": len(images), "codes_used": int(len(np.unique(codes))), "codebook_size": tok.codebook_size,
               "decodes": False}
    return fit, warnings


def make_image_tokenizer(kind: str, images_from, out: Path, *, image_model=None, image_size: int | None = None,
                         resize: str = "crop", codebook_size: int | None = None, patch: int = 4,
                         train_options: dict | None = None, max_images: int | None = None, seed: int = 0,
                         progress: bool = False, say=print):
    """Build an image tokenizer of ``kind`` into ``out`` (a file or a folder, by kind) and return
    ``(tokenizer, path, fit, warnings)``. ``images_from``: the (file, where) list of the user's pictures."""
    from megannm.data.image_tokenizer import BUILTIN_KINDS, PatchVQ, kind_class, load_image_tokenizer

    if kind not in BUILTIN_KINDS:
        kind_class(kind, "--image-kind")  # a clear line if it does not even resolve
        raise ValueError(f"--image-kind {kind}: build it with its own package, save it, and pass the saved "
                         f"tokenizer with --image-tokenizer PATH")
    if kind in ("janus", "emu3", "chameleon"):
        if image_model is None:
            raise ValueError(f"--image-kind {kind} needs --image-model FOLDER (a local transformers folder: the VQ "
                             f"model alone or the whole model)")
        cls = kind_class(kind)
        tok = cls.from_pretrained(image_model, image_size=(image_size, image_size) if image_size else None,
                                  resize=resize)
        path = tok.save(out / "image_tokenizer")
        sample = load_pictures(images_from, tok.image_size, resize, limit=64, seed=seed)
        return (tok, path, *fit_diagnostic(tok, sample))
    if image_model is not None:
        raise ValueError(f"--image-model is for the pretrained kinds (janus, emu3, chameleon), not {kind}")
    side = image_size or DEFAULT_SIZES[kind]
    images = load_pictures(images_from, (side, side), resize, limit=max_images, seed=seed)
    if kind == "pixels":  # continuous images: pixel patches as latents, nothing to train, lossless
        from megannm.data.image_tokenizer.pixels import PixelPatches
        tok = PixelPatches((side, side), patch, resize)
        fit = {"latent_channels": tok.latent_channels, "lossless": True}
        return tok, tok.save(out / "image_tokenizer.npz"), fit, []
    if kind == "patch_vq":
        t = time.time()
        tok = PatchVQ.train(images, codebook_size=codebook_size or 1024, patch=patch, seed=seed, resize=resize)
        say(f"image tokenizer: patch_vq trained on {len(images)} pictures ({time.time() - t:.1f} s)")
        return (tok, tok.save(out / "image_tokenizer.npz"), *fit_diagnostic(tok, images))
    from megannm.data.image_tokenizer.learned import config_from, reconstruction_error, train_image_tokenizer
    opts = {"image_size": side, "resize": resize, "seed": seed, **(train_options or {})}
    if codebook_size:
        opts["codebook_size"] = codebook_size
    cfg = config_from(opts)
    result = train_image_tokenizer(images, out / "image_tokenizer", cfg, progress=progress, say=say)
    tok = load_image_tokenizer(out / "image_tokenizer")
    fit = dict(result["held_out"], steps=result["steps"], seconds=result["seconds"], on="held-out pictures")
    warnings = []
    if not fit.get("images"):  # too few pictures to hold any out: say so, and measure on what it trained on
        fit = dict(reconstruction_error(tok, images[:256]), steps=result["steps"], on="training pictures")
        warnings.append("no held-out pictures (too few images): the reconstruction error is on training pictures")
    return tok, out / "image_tokenizer", fit, warnings


def check_trained(path: Path) -> None:
    """Refuse an image tokenizer whose training stopped early (killed, or interrupted and not resumed): its codes
    would be those of an unfinished network, and every data set tokenised with it would carry them."""
    from megannm.data.image_tokenizer.base import META_FILE
    meta_file = path / META_FILE
    if not meta_file.is_file():
        return  # a file kind (patch_vq .npz) or a pretrained folder: no training of ours to finish
    try:
        training = json.loads(meta_file.read_text()).get("training") or {}
        done, total = int(training.get("steps", 0)), int((training.get("config") or {}).get("steps", 0))
    except (ValueError, TypeError, AttributeError):
        return  # loading it says what is wrong with the file
    if total and done < total:
        raise ValueError(f"--image-tokenizer {path}: its training stopped at step {done} of {total} (finish it: "
                         f"megannm tokenizers train-image --out {path} --input ... --resume)")


# ---------------------------------------------------------------------------------------------------------------------
# the whole folder


def build_tokenizers(inputs, out, *, text_tokenizer=None, text_vocab_size: int = 4096, image_tokenizer=None,
                     image_kind: str = "patch_vq", image_model=None, image_size: int | None = None,
                     resize: str = "crop", codebook_size: int | None = None, patch: int = 4,
                     train_options: dict | None = None, max_images: int | None = None, seed: int = 0,
                     overwrite: bool = False, progress: bool = False, say=print) -> dict:
    """JSONL ``inputs`` -> the tokenizers folder ``out``; returns the report (also printed through ``say``)."""
    from megannm.data.image_tokenizer import check_policy, load_image_tokenizer
    from megannm.data.text_tokenizer import load_text_tokenizer, train_text_tokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass --overwrite to replace it)")
    check_policy(resize, "--resize")
    if image_tokenizer is not None:
        check_trained(Path(image_tokenizer))
    t0 = time.time()
    texts, images = collect(inputs)
    if not texts:
        raise ValueError(f"{', '.join(str(p) for p in inputs)}: no text in the records (a text tokenizer needs some)")
    say(f"records: {len(texts)} text parts, {len(images)} distinct image files")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with scratch_folder(out) as staging:  # (a killed build's staging folder is reclaimed by the next build)
            if text_tokenizer is not None:
                text_dir = Path(text_tokenizer)
                load_text_tokenizer(text_dir)  # one clear line now if it is not a tokenizer folder
                text_source = str(text_dir)
            else:
                text_dir = train_text_tokenizer(texts, staging / "text", vocab_size=text_vocab_size)
                text_source = f"byte-level BPE trained on the records (at most {text_vocab_size} ids)"
            if image_tokenizer is not None:
                image_path = Path(image_tokenizer)
                tok = load_image_tokenizer(image_path)
                sample = load_pictures(images, tok.image_size, tok.resize, limit=256, seed=seed)
                fit, warnings = fit_diagnostic(tok, sample)
            else:
                tok, image_path, fit, warnings = make_image_tokenizer(
                    image_kind, images, staging, image_model=image_model, image_size=image_size, resize=resize,
                    codebook_size=codebook_size, patch=patch, train_options=train_options, max_images=max_images,
                    seed=seed, progress=progress, say=say)
            bundle = Tokenizers.build(text_dir, image_path)
            bundle.save(out)
    except OSError as e:
        if type(e) not in (OSError, PermissionError):  # (FileNotFoundError and the like: their own line)
            raise
        raise write_error(out, e, "tokenizers folder") from None
    v = bundle.vocab
    report = {"folder": str(out), "text": {"source": text_source, "ids": v.text_size},
              "image": tok.describe(), "fit": fit, "warnings": warnings,
              "vocab": {"size": v.size, "padded_size": v.padded_size(), "specials": len(v.specials),
                        "fingerprint": v.fingerprint},
              "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out / "build.json", report)
    for line in format_report(report):
        say(line)
    return report


def format_report(r: dict) -> list[str]:
    im, fit = r["image"], r["fit"]
    lines = [f"{r['folder']}: vocabulary {r['vocab']['size']} ids ({r['vocab']['padded_size']} padded), fingerprint "
             f"{r['vocab']['fingerprint']}",
             f"  text:   {r['text']['ids']} ids ({r['text']['source']})",
             f"  image:  {im['kind']}, {im['codebook_size']} codes, {im['tokens_per_image']} tokens per image "
             f"({im['grid'][0]}x{im['grid'][1]} at {im['image_size'][0]}x{im['image_size'][1]} px, "
             f"{im['resize']}{'' if im['decodes'] else ', encode only'})",
             f"  an image span is {im['tokens_per_image'] + 2} tokens: data.seq_len must be at least "
             f"{im['tokens_per_image'] + 1}"]
    if "exact_share" in fit:
        lines.append(f"  fit:    {fit['distinct_patches']} distinct {fit['patch']}x{fit['patch']} patches for "
                     f"{fit['codes']} codes; {fit['exact_share']:.1%} of patches coded exactly")
    elif "psnr" in fit:
        lines.append(f"  fit:    reconstruction on {fit['images']} {fit.get('on', 'held-out pictures')}: PSNR "
                     f"{fit['psnr']:.2f} dB "
                     f"(MSE {fit['mse']:.1f}), {fit['codes_used']} of {fit['codebook_size']} codes used")
    elif "codes_used" in fit:
        lines.append(f"  fit:    {fit['codes_used']} of {fit['codebook_size']} codes used on {fit['images']} pictures "
                     f"(no decoder: no reconstruction to measure)")
    lines += [f"warning: {w}" for w in r["warnings"]]
    return lines
