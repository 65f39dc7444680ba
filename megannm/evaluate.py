"""Evaluation of a checkpoint: a registered benchmark, or losses and caption exact match over your own records.

    megannm evaluate CKPT --tokenizers TOK --benchmark NAME [its options]
    megannm evaluate CKPT --tokenizers TOK --data valid=records.jsonl [--data other.jsonl ...]

``--data`` reads JSONL records in the layout of ``megannm.data.tokenize`` (interleaved ``parts`` or chat
``messages``; image paths relative to the file), one split per file (named ``NAME=`` or by the file's stem), and
reports per split: the mean text and image loss (chat records: on the assistant's tokens only), the exact-match rate
of captions generated for the records that are one image then its text, and a grid of a few of those captions
(``samples.png``). Every report is ``OUT/report.json``, written atomically.

A benchmark is a ``Benchmark`` that a package installs as an entry point of the ``megannm.benchmarks`` group
(``[project.entry-points."megannm.benchmarks"] mine = "my_pkg.bench:BENCHMARK"``), or ``package.module:object``;
megannm's toy world registers ``toy`` and ``toy-chat`` this way. The helpers below (``modality_losses``,
``exact_match``, ``sample_grid``, ``write_report``) are for benchmarks to build on.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch

from megannm.fileio import atomic_write, atomic_write_json
from megannm.generate import (DEFAULT_CFG_SCALE, SamplingConfig, caption_prompt, codes_to_images, generate,
                              image_prompt, png_bytes, text_of)

if TYPE_CHECKING:
    import argparse

ENTRY_POINT_GROUP = "megannm.benchmarks"


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


@torch.no_grad()
def modality_losses(model, vocab, docs: list, batch_size: int = 64, latents: list | None = None) -> dict:
    """Mean next-token loss per modality, ``{"text_loss", "image_loss"}`` (NaN for a modality without tokens), over
    whole documents: token lists, or (tokens, loss mask or None) pairs as ``encode_records`` gives (a 0 in the
    mask: that token is not scored). No packing, no dropout; documents are padded, never truncated. Continuous
    images: ``latents`` gives each document's slot latents (clean); only the text loss is scored."""
    dev = next(model.parameters()).device
    docs = [(d, None) if not isinstance(d, tuple) else d for d in docs]
    docs = [([int(t) for t in d], m) for d, m in docs]
    sums = {"text": [0.0, 0.0], "image": [0.0, 0.0]}
    for s in range(0, len(docs), batch_size):
        chunk = docs[s:s + batch_size]
        n = max(len(d) for d, _ in chunk)
        ids = torch.full((len(chunk), n), vocab.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), n - 1)
        for i, (d, m) in enumerate(chunk):
            ids[i, :len(d)] = torch.tensor(d)
            mask[i, :len(d) - 1] = 1 if m is None else torch.as_tensor(np.asarray(m[1:], np.float32))
        ids, mask = ids.to(dev), mask.to(dev)
        pos = torch.arange(n - 1, device=dev).expand(len(chunk), n - 1)
        extra = {}
        if latents is not None:  # each document's pictures at its slots, clean
            lat = torch.zeros(len(chunk), n - 1, vocab.latent_channels, device=dev)
            for i, d in enumerate(latents[s:s + batch_size]):
                if d is not None:
                    lat[i, ids[i, :-1] == vocab.slot_id] = torch.as_tensor(d, device=dev).float()
            extra = {"latents": lat, "timesteps": torch.zeros_like(pos, dtype=torch.float32)}
        _, st = model(ids[:, :-1], position_ids=pos, document_ids=torch.zeros_like(pos), labels=ids[:, 1:],
                      loss_mask=mask, **extra)
        for m in ("text", "image"):
            k = float(st[f"{m}_tokens"])
            sums[m][0] += float(st[f"{m}_loss"]) * k
            sums[m][1] += k
    return {f"{m}_loss": (s / k if k else float("nan")) for m, (s, k) in sums.items()}


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference, ignoring surrounding white space and case."""
    pairs = list(zip(predictions, references))
    return sum(p.strip().lower() == r.strip().lower() for p, r in pairs) / max(len(pairs), 1)


def sample_grid(rows: list[list[tuple]], path, per_row: int = 8, scale: int = 3) -> Path:
    """A picture of rows of (image uint8 [H, W, 3], label, text) cells: each image enlarged ``scale`` times, the
    label in grey, then up to three lines of text; written atomically as a PNG."""
    from PIL import Image, ImageDraw
    cell_w, cell_h = 150, 152
    canvas = Image.new("RGB", (cell_w * per_row, cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        for c, (img, label, text) in enumerate(row[:per_row]):
            x, y = c * cell_w, r * cell_h
            pic = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            if pic.width > cell_w - 4:  # a real-size picture (256 px and up): shrink it into its cell
                pic = Image.fromarray(img).resize((cell_w - 54, (cell_w - 54) * img.shape[0] // img.shape[1]),
                                                  Image.LANCZOS)
            canvas.paste(pic, (x + (cell_w - pic.width) // 2, y + 2))
            lines, cur = [], ""
            for w in text.split():  # wrap at ~24 characters, the width of a cell
                if len(cur) + len(w) + 1 > 24:
                    lines.append(cur)
                    cur = w
                else:
                    cur = f"{cur} {w}".strip()
            lines.append(cur)
            draw.text((x + 4, y + pic.height + 4), label, fill=(90, 90, 90))
            for k, line in enumerate(lines[:3]):
                draw.text((x + 4, y + pic.height + 16 + 11 * k), line, fill=(0, 0, 0))
    return atomic_write(Path(path), png_bytes(np.asarray(canvas)))


def write_report(report: dict, out_dir) -> Path:
    """``OUT/report.json``, complete or absent."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(out / "report.json", report)


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark registry


@dataclass(frozen=True)
class Benchmark:
    """An evaluation a package registers under a name (an entry point of the ``megannm.benchmarks`` group)."""
    run: Callable[..., dict]  # run(model, tok, args, out: Path) -> report; it may write pictures into out
    format: Callable[[dict], str]  # the report as a human-readable table
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None  # its own command-line options
    description: str = ""


def benchmarks() -> dict:
    """Installed benchmarks by name (entry points, not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_benchmark(name: str) -> Benchmark:
    """A benchmark by installed name, or ``package.module:object``."""
    eps = benchmarks()
    if name not in eps and ":" not in name:
        raise ValueError(f"--benchmark: unknown benchmark {name!r} (registered: {', '.join(sorted(eps)) or 'none'}; "
                         f"or name one as package.module:object)")
    where = eps[name].value if name in eps else name
    try:
        if name in eps:
            bench = eps[name].load()
        else:
            module, _, attr = name.partition(":")
            bench = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--benchmark: cannot import {where!r} ({type(e).__name__}: {e})") from None
    if not isinstance(bench, Benchmark):
        raise ValueError(f"--benchmark: {where!r} is not a megannm.evaluate.Benchmark (got {type(bench).__name__})")
    return bench


# ---------------------------------------------------------------------------------------------------------------------
# your own records


def record_splits(specs: list[str]) -> dict[str, Path]:
    """``--data`` values (``[NAME=]RECORDS.jsonl``) -> split name -> file, each file checked to exist."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        path = Path(path if sep else name)
        name = name if sep else path.stem
        if not path.exists():
            raise FileNotFoundError(f"--data: {path}: file not found")
        if name in out:
            raise ValueError(f"--data: split {name!r} given twice (name them: --data NAME=PATH)")
        out[name] = path
    return out


def _read_records(path: Path, n: Optional[int]) -> tuple[list[dict], list[str]]:
    records, wheres = [], []
    for k, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{k}: not valid JSON ({e.msg})") from None
        wheres.append(f"{path}:{k}")
        if n is not None and len(records) >= n:
            break
    if not records:
        raise ValueError(f"{path}: no records in the file")
    return records, wheres


def _caption_pair(record: dict) -> Optional[tuple[str, str, bool]]:
    """(image, text, image first?) of a record that is one image and its text, in either order, else None."""
    parts = record.get("parts")
    if not (isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, dict) for p in parts)):
        return None
    if "image" in parts[0] and "text" in parts[1]:
        return parts[0]["image"], parts[1]["text"], True
    if "text" in parts[0] and "image" in parts[1]:
        return parts[1]["image"], parts[0]["text"], False
    return None


def _direction_docs(tok, codes: np.ndarray, texts: list[str]) -> tuple[list, list]:
    """Both layouts of every caption pair: ``<bos> <boi> image <eoi> text <eos>`` (its text loss is the image ->
    text loss) and ``<bos> text <boi> image <eoi> <eos>`` (its image loss is the text -> image loss)."""
    v, i2t, t2i = tok.vocab, [], []
    for c, text in zip(codes, texts):
        span = [v.boi_id, *v.image_ids(c).tolist(), v.eoi_id]
        ids = tok.text_ids(text)
        i2t.append([v.bos_id, *span, *ids, v.eos_id])
        t2i.append([v.bos_id, *ids, *span, v.eos_id])
    return i2t, t2i


def evaluate_records(model, tok, splits: dict[str, Path], n: Optional[int] = None,
                     sampling: SamplingConfig = SamplingConfig(), max_new_tokens: int = 32, out_dir=None,
                     cfg_scale: float = DEFAULT_CFG_SCALE, n_shown: int = 8) -> dict:
    """Per split: ``loss`` (text and image, over the records as they are), over the caption pairs (one image and its
    text, either order) ``image_to_text_loss``, ``text_to_image_loss`` and ``caption_exact_match`` (with their count,
    ``captioned``). ``samples.png`` in ``out_dir`` shows, per split, up to ``n_shown`` pictures with their generated
    captions and, when the image tokenizer decodes, pictures generated from their captions. Every picture is fitted
    by the image tokenizer's resize policy, as ``megannm preprocess`` fits them."""
    from megannm.data.tokenize import check_answer_room, encode_records, load_image
    t0 = time.time()
    report = {"data": {s: str(p) for s, p in splits.items()}, "records": {}, "loss": {}, "image_to_text_loss": {},
              "text_to_image_loss": {}, "caption_exact_match": {}, "captioned": {}, "cfg_scale": cfg_scale}
    grid = []
    for split, path in splits.items():
        records, wheres = _read_records(path, n)
        report["records"][split] = len(records)
        report["loss"][split] = modality_losses(model, tok.vocab, encode_records(records, tok, path.parent, wheres))
        pairs = [(p, w) for p, w in ((_caption_pair(r), w) for r, w in zip(records, wheres)) if p]
        images = [load_image(path.parent / img, tok.image_size(), w, tok.image.resize) for (img, _, _), w in pairs]
        texts = [t for (_, t, _), _ in pairs]
        report["captioned"][split] = len(pairs)
        # None, not 0, for a split without caption pairs: nothing was measured
        report["image_to_text_loss"][split] = report["text_to_image_loss"][split] = None
        report["caption_exact_match"][split] = None
        if not pairs:
            continue
        i2t, t2i = _direction_docs(tok, tok.image.encode(np.stack(images)), texts)
        report["image_to_text_loss"][split] = modality_losses(model, tok.vocab, i2t)["text_loss"]
        report["text_to_image_loss"][split] = modality_losses(model, tok.vocab, t2i)["image_loss"]
        check_answer_room(tok.vocab.image_grid + 3, max_new_tokens, model.args.max_seq_len)
        rows = generate(model, tok.vocab, [caption_prompt(tok, im) for im in images], "text",
                        max_new_tokens=max_new_tokens, sampling=sampling)
        captions = [text_of(tok, r) for r in rows]
        report["caption_exact_match"][split] = exact_match(captions, texts)
        grid.append([(im, f"caption ({split}):", c) for im, c in list(zip(images, captions))[:n_shown]])
        if tok.image.can_decode:
            shown = texts[:n_shown]
            drawn = codes_to_images(tok, generate(model, tok.vocab, [image_prompt(tok, t) for t in shown], "image",
                                                  sampling=sampling, cfg_scale=cfg_scale))
            grid.append([(im, f"drawn ({split}):", t) for im, t in zip(drawn, shown)])
    report["wall_seconds"] = round(time.time() - t0, 1)
    if out_dir is not None and grid:
        sample_grid(grid, Path(out_dir) / "samples.png")
    return report


def format_records(report: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"
    lines = []
    for split, lo in report["loss"].items():
        em = report["caption_exact_match"][split]
        lines.append(f"{split:12s} {report['records'][split]:6d} records  text loss {lo['text_loss']:.3f}  "
                     f"image loss {lo['image_loss']:.3f}  image->text loss {f(report['image_to_text_loss'][split])}  "
                     f"text->image loss {f(report['text_to_image_loss'][split])}  caption exact match "
                     f"{'-' if em is None else f'{em:.2f}'} of {report['captioned'][split]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# a checkpoint, evaluated


def evaluate_checkpoint(checkpoint, tokenizers, out, benchmark: Optional[Benchmark] = None, options=None,
                        data: Optional[list[str]] = None, n: Optional[int] = None, seed: Optional[int] = None,
                        temperature: float = 0.0, cfg_scale: float = DEFAULT_CFG_SCALE,
                        max_new_tokens: int = 32) -> tuple[dict, str, Path]:
    """What ``megannm evaluate`` runs: ``benchmark`` (given ``options``, the namespace of its own command-line
    options) or losses and captions over ``data`` (records files, ``[NAME=]RECORDS.jsonl``: one split each), on
    the checkpoint; returns (the report, its table, the path of ``OUT/report.json``)."""
    if (benchmark is None) == (not data):
        raise ValueError(f"give either --benchmark (registered: {', '.join(sorted(benchmarks())) or 'none'})"
                         f" or --data RECORDS.jsonl")
    splits = record_splits(data or [])
    from megannm.checkpoint.opened import open_checkpoint
    out = Path(out)
    with open_checkpoint(checkpoint, tokenizers) as ck:
        out.mkdir(parents=True, exist_ok=True)
        if benchmark is not None:
            report = benchmark.run(ck.model, ck.tok, options, out)
            table = benchmark.format(report)
        else:
            sampling = SamplingConfig.from_options(temperature=temperature, seed=seed or 0)
            ck.tok.image.to(next(ck.model.parameters()).device)
            report = evaluate_records(ck.model, ck.tok, splits, n, sampling, max_new_tokens, out, cfg_scale)
            table = format_records(report)
        path = write_report(report, out)
    return report, table, path
