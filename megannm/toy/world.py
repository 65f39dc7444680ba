"""The embedded default world: small RGB pictures of one shape, captions from the same attributes, and a checker.

Every picture is drawn from four attributes (kind, colour, size, position): 4 x 6 x 2 x 5 = 240 combinations.
Because captions and pictures come from the same attributes, both directions have a ground truth:
``parse_caption`` reads attributes back from text and ``check_image`` reads them back from pixels. The checker is
the judge of every later evaluation and reward, so it works from pixels alone (no knowledge of how a picture was
made) and answers ``None`` for what it cannot read rather than guessing.

Drawing is exact (no anti-aliasing, a palette of six colours on black): an image tokenizer over 4x4 patches then
sees few distinct patches and can keep them all, which is what keeps shape kind recognisable (a k-means codebook
that has to merge patches rounds the corners of squares into circles).

A fixed set of 40 combinations (``HELDOUT``) never appears in training, so evaluation can ask whether a model
composes attribute values it has only seen apart. See ``_is_heldout`` for the rule.
"""
from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from megannm.fileio import atomic_write

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")
ATTRIBUTES = ("kind", "colour", "size", "position")
VALUES = {"kind": KINDS, "colour": COLOURS, "size": SIZES, "position": POSITIONS}

IMAGE_SIZE = 32
BACKGROUND = (0, 0, 0)
# Saturated, far apart in RGB (the closest pair, blue/cyan, is ~122 apart), every one bright on black.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (170, 60, 220),
    "cyan": (40, 210, 215),
}
SIDE = {"small": 8, "large": 14}  # bounding-box side in pixels: areas differ ~3x, so size never hinges on one pixel
JITTER = 1  # +-1 px on each axis, seeded
# Where a shape's centroid goes, in pixel-index coordinates (pixel i sits at i): symmetric about 15.5 and 8 px
# apart, a multiple of the tokenizer's 4 px patch, so a shape meets the patch grid in the same few alignments at
# every position. That keeps the distinct 4x4 patches of the whole world at 871 (7 px apart gave 1,045), which a
# 1,024-code book holds exactly.
CENTRES = {
    "top left": (7.5, 7.5), "top right": (7.5, 23.5), "center": (15.5, 15.5),
    "bottom left": (23.5, 7.5), "bottom right": (23.5, 23.5),
}


@dataclass(frozen=True)
class Attrs:
    kind: str
    colour: str
    size: str
    position: str

    def __post_init__(self):
        for name in ATTRIBUTES:
            if getattr(self, name) not in VALUES[name]:
                raise ValueError(f"toy: {name}={getattr(self, name)!r} is not one of {', '.join(VALUES[name])}")

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "colour": self.colour, "size": self.size, "position": self.position}


ALL_COMBOS = tuple(Attrs(k, c, s, p) for k in KINDS for c in COLOURS for s in SIZES for p in POSITIONS)


def _is_heldout(a: Attrs) -> bool:
    """The held-out rule: ``(kind + colour + 2*size + position) % 6 == 0`` over the values' indices.

    For each (kind, size, position) exactly one colour satisfies it, so 4*2*5 = 40 combinations are held out. No
    pair or triple of attribute values is held out whole (each triple loses at most one of its completions), so
    every value, every pair and every triple still occurs in training: only the four-way combinations are new.
    """
    k, c = KINDS.index(a.kind), COLOURS.index(a.colour)
    s, p = SIZES.index(a.size), POSITIONS.index(a.position)
    return (k + c + 2 * s + p) % 6 == 0


HELDOUT = frozenset(a for a in ALL_COMBOS if _is_heldout(a))
SEEN = tuple(a for a in ALL_COMBOS if a not in HELDOUT)
_SPLITS = {"seen": SEEN, "heldout": tuple(a for a in ALL_COMBOS if a in HELDOUT), "all": ALL_COMBOS}


def split_of(a: Attrs) -> str:
    return "heldout" if a in HELDOUT else "seen"


# ---------------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------------
def _shape_mask(kind: str, side: int) -> np.ndarray:
    """The shape as a boolean ``[side, side]`` mask filling its bounding box edge to edge."""
    y, x = np.mgrid[0:side, 0:side] + 0.5  # pixel centres
    half = side / 2
    if kind == "circle":
        return (y - half) ** 2 + (x - half) ** 2 <= half ** 2
    if kind == "square":
        return np.ones((side, side), bool)
    if kind == "triangle":  # apex up, base along the bottom row; widths grow in steps of 2 px
        return np.abs(x - half) <= np.ceil(y) / side * half
    if kind == "cross":  # a plus sign with arms about a third of the side thick (even, so it centres exactly)
        thick = 2 * round(side / 6)
        lo = (side - thick) // 2
        m = np.zeros((side, side), bool)
        m[lo:lo + thick, :] = True
        m[:, lo:lo + thick] = True
        return m
    raise ValueError(f"toy: unknown kind {kind!r}")


@lru_cache(maxsize=None)
def _template(kind: str, size: str) -> tuple[np.ndarray, tuple[float, float]]:
    """A shape's mask and its centroid (row, column) in the mask's own index coordinates."""
    m = _shape_mask(kind, SIDE[size])
    rows, cols = np.nonzero(m)
    m.setflags(write=False)
    return m, (float(rows.mean()), float(cols.mean()))


def _round(v: float) -> int:
    return int(np.floor(v + 0.5))  # half up, unlike numpy's half-to-even, so placement is symmetric and obvious


def _draw(a: Attrs, jy: int, jx: int) -> np.ndarray:
    mask, (cy, cx) = _template(a.kind, a.size)
    side = mask.shape[0]
    py, px = CENTRES[a.position]
    # Clamp so that no shape leaves the canvas. Only the large triangle at the top is ever clamped (its centroid
    # sits low in its box): it loses its upward jitter and stays at most 2 px below its centre.
    top = min(max(_round(py - cy) + jy, 0), IMAGE_SIZE - side)
    left = min(max(_round(px - cx) + jx, 0), IMAGE_SIZE - side)
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    img[top:top + side, left:left + side][mask] = PALETTE[a.colour]
    return img


def render(a: Attrs, rng: np.random.Generator) -> np.ndarray:
    """Draw ``a`` as a uint8 ``[32, 32, 3]`` image: the shape's centroid at its position's centre, +-1 px jitter."""
    jy, jx = rng.integers(-JITTER, JITTER + 1, size=2)
    return _draw(a, int(jy), int(jx))


def every_image() -> tuple[list[Attrs], np.ndarray]:
    """Every picture the world can draw: 240 combinations x 9 jitters (2,160 images, a few identical).

    An image tokenizer trained on these has seen every patch that ``render`` can produce.
    """
    shifts = range(-JITTER, JITTER + 1)
    keys = [(a, jy, jx) for a in ALL_COMBOS for jy in shifts for jx in shifts]
    return [a for a, _, _ in keys], np.stack([_draw(*k) for k in keys])


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------
# Only the frame varies; the attribute words are always the same words, so parsing never needs synonyms.
_TEMPLATES = (
    "a {size} {colour} {kind} {where}",
    "there is a {size} {colour} {kind} {where}",
    "a picture of a {size} {colour} {kind} {where}",
    "{where}, a {size} {colour} {kind}",
)


def where_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption(a: Attrs, rng: np.random.Generator | None = None) -> str:
    """A caption of ``a``: the canonical template without ``rng``, one of a few templates with it."""
    template = _TEMPLATES[0] if rng is None else _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return template.format(size=a.size, colour=a.colour, kind=a.kind, where=where_phrase(a.position))


_WORD_RES = {name: re.compile(r"\b(" + "|".join(VALUES[name]) + r")\b") for name in ("kind", "colour", "size")}
_CORNER_RE = re.compile(r"\b(top|bottom)\s+(left|right)\b")
_CENTER_RE = re.compile(r"\b(center|centre|middle)\b")


def _one(found: set[str]) -> str | None:
    return next(iter(found)) if len(found) == 1 else None


def parse_caption(text: str) -> dict[str, str | None]:
    """Attribute -> the value the text names, or None when it names none or more than one (ambiguous)."""
    text = text.lower()
    out = {name: _one(set(rx.findall(text))) for name, rx in _WORD_RES.items()}
    places = {f"{v} {h}" for v, h in _CORNER_RE.findall(text)}
    if _CENTER_RE.search(text):
        places.add("center")
    out["position"] = _one(places)
    return {name: out[name] for name in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------------------------
# The checker: attributes back from pixels
# ---------------------------------------------------------------------------------------------------------------
FOREGROUND_MIN = 80  # a pixel is foreground when its brightest channel exceeds this (every palette colour >= 200)
MIN_AREA, MAX_AREA = 12, 400  # smallest shape 28 px, largest 196 px: outside this band it is not one shape
PALETTE_MAX_DISTANCE = 100.0  # farther than this from every palette colour: off-palette, not counted for a colour
COLOUR_MIN_SHARE = 0.6  # the dominant colour must hold this share of the foreground
POSITION_MAX_SPREAD = 6.0  # RMS distance from the centroid; the large square has ~5.7, scattered noise ~13
IOU_MIN = 0.6  # below this best template overlap the blob is not any known shape
_WINDOW = 24  # template-matching window (> largest side + shifts)
_SHIFTS = (-1, 0, 1)

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], np.float32)
_CENTRE_YX = np.array([CENTRES[p] for p in POSITIONS], np.float32)


@lru_cache(maxsize=None)
def _template_bank() -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Every (kind, size) template at every small shift, centred on its centroid in a ``_WINDOW`` square.

    Returns (bank bool [T, W, W], areas [T], labels) with T = kinds * sizes * shifts; matching an image is then one
    vectorised intersection-over-union against the whole bank.
    """
    bank, labels = [], []
    c = _WINDOW // 2
    for kind in KINDS:
        for size in SIZES:
            mask, (cy, cx) = _template(kind, size)
            for dy in _SHIFTS:
                for dx in _SHIFTS:
                    w = np.zeros((_WINDOW, _WINDOW), bool)
                    top, left = _round(c - cy) + dy, _round(c - cx) + dx
                    w[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
                    bank.append(w)
                    labels.append((kind, size))
    bank = np.stack(bank)
    return bank, bank.reshape(len(bank), -1).sum(1), labels


def _nearest_colour(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour and its distance, per RGB pixel ``[n, 3]``."""
    d = np.linalg.norm(pixels[:, None, :].astype(np.float32) - _PALETTE_RGB[None], axis=2)
    idx = d.argmin(1)
    return idx, d[np.arange(len(idx)), idx]


def _match_shape(mask: np.ndarray, cy: float, cx: float) -> tuple[str | None, str | None]:
    """Kind and size by the best IoU against the template bank, aligned on the centroid; None if nothing fits."""
    bank, areas, labels = _template_bank()
    c = _WINDOW // 2
    padded = np.pad(mask, c)
    top, left = _round(cy), _round(cx)  # window origin in padded coordinates = centroid - c + c
    crop = padded[top:top + _WINDOW, left:left + _WINDOW]
    inter = (bank & crop).reshape(len(bank), -1).sum(1)
    iou = inter / (areas + mask.sum() - inter)
    best = int(iou.argmax())
    return labels[best] if iou[best] >= IOU_MIN else (None, None)


def check_image(img: np.ndarray) -> dict[str, str | None]:
    """Read (kind, colour, size, position) from a picture's pixels; None for any attribute it cannot read.

    colour: the dominant palette colour of the foreground; position: the centroid's nearest position centre;
    kind and size: the best-overlapping template. A blank, noisy, wrongly shaped or multi-coloured picture gives
    None where the evidence is missing, never an exception.
    """
    out: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    img = np.asarray(img)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        return out
    fg = img.max(axis=2) > FOREGROUND_MIN
    area = int(fg.sum())
    if not MIN_AREA <= area <= MAX_AREA:
        return out
    idx, dist = _nearest_colour(img[fg])
    idx = np.where(dist <= PALETTE_MAX_DISTANCE, idx, len(COLOURS))  # off-palette pixels vote for nobody
    votes = np.bincount(idx, minlength=len(COLOURS) + 1)[:len(COLOURS)]
    dominant = int(votes.argmax())
    if votes[dominant] >= COLOUR_MIN_SHARE * area:
        out["colour"] = COLOURS[dominant]
        mask = np.zeros_like(fg)
        mask[fg] = idx == dominant  # the shape is the dominant colour's pixels; stray pixels of others are noise
    else:
        mask = fg
    if mask.sum() < MIN_AREA:
        return out
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    if np.sqrt(((rows - cy) ** 2 + (cols - cx) ** 2).mean()) <= POSITION_MAX_SPREAD:
        out["position"] = POSITIONS[int(((_CENTRE_YX - (cy, cx)) ** 2).sum(1).argmin())]
    out["kind"], out["size"] = _match_shape(mask, cy, cx)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sampling and data sets
# ---------------------------------------------------------------------------------------------------------------
def sample_attrs(n: int, rng: np.random.Generator, split: str = "seen") -> list[Attrs]:
    """``n`` combinations drawn uniformly (with replacement) from one split: "seen", "heldout" or "all"."""
    try:
        pool = _SPLITS[split]
    except KeyError:
        raise ValueError(f"toy: split must be one of {', '.join(_SPLITS)}, got {split!r}") from None
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def _examples(n: int, rng: np.random.Generator, split: str) -> list[tuple[Attrs, np.ndarray, str]]:
    return [(a, render(a, rng), caption(a, rng)) for a in sample_attrs(n, rng, split)]


def make_examples(n: int, seed: int, split: str = "seen") -> list[tuple[Attrs, np.ndarray, str]]:
    """``n`` (attrs, image, caption) triples from ``split``; the same seed gives the same bytes."""
    return _examples(n, np.random.default_rng(seed), split)


def png_bytes(img: np.ndarray, cache: dict[bytes, bytes]) -> bytes:
    """PNG encoding of ``img``, memoised by pixel content: the world has only ~2,000 distinct pictures, and PNG
    encoding was 70% of the time of writing a data set before this cache."""
    key = img.tobytes()
    if key not in cache:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=9)
        cache[key] = buf.getvalue()
    return cache[key]


def attr_records(n: int, rng: np.random.Generator, split: str, image_to_text_fraction: float) -> list[dict]:
    """``n`` records of one split for ``write_toy_dataset``: exactly ``round(n * image_to_text_fraction)`` of them put
    the picture first (understanding), the others the caption first (generation); pictures as uint8 arrays."""
    examples = _examples(n, rng, split)
    image_first = np.zeros(n, bool)
    image_first[rng.permutation(n)[:round(n * image_to_text_fraction)]] = True
    return [{"parts": [{"image": img}, {"text": text}] if first else [{"text": text}, {"image": img}],
             "attrs": attrs.as_dict()} for (attrs, img, text), first in zip(examples, image_first)]


def image_first(record: dict) -> bool:
    """Whether a record asks for text about a picture (understanding): its first part is a picture, or (chat) its
    last assistant turn is text."""
    if "parts" in record:
        return "image" in record["parts"][0]
    answer = [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    return all(p["type"] == "text" for p in answer)


def _store_images(record: dict, out_dir: Path, counter: list, pngs: dict, digits: int) -> dict:
    """The record with every in-memory picture (a uint8 array, in ``parts`` or in chat ``messages``) written as a PNG
    under ``out_dir/images`` and replaced by its path relative to ``out_dir``."""
    def stored(img) -> str:
        rel = f"images/{counter[0]:0{digits}d}.png"
        counter[0] += 1
        atomic_write(out_dir / rel, png_bytes(img, pngs))
        return rel

    out = dict(record)
    if "parts" in record:
        out["parts"] = [{"image": stored(p["image"])} if isinstance(p.get("image"), np.ndarray) else p
                        for p in record["parts"]]
    if "messages" in record:
        out["messages"] = [{**m, "content": [{**p, "image": stored(p["image"])}
                                             if isinstance(p.get("image"), np.ndarray) else p for p in m["content"]]}
                           for m in record["messages"]]
    return out


def write_toy_dataset(out_dir, n_train: int, n_valid: int, seed: int, image_to_text_fraction: float = 0.35,
                      make=attr_records) -> dict:
    """Write the toy world as interleaved JSONL records plus PNG images.

    ``out_dir/train.jsonl`` holds seen combinations only; ``valid_seen.jsonl`` and ``valid_heldout.jsonl`` hold
    ``n_valid`` records each. A record is ``{"parts": [{"text": ...}, {"image": "images/000123.png"}],
    "attrs": {...}}`` with image paths relative to ``out_dir``. Exactly ``round(n * image_to_text_fraction)``
    records of each file put the image first (understanding); the others put the caption first (generation).
    ``make(n, rng, split, image_to_text_fraction) -> records`` (pictures as uint8 arrays, in ``parts`` or chat
    ``messages``) draws another world's records: the default is the single-shape world (``attr_records``), the
    compositional scenes are ``geneval.training_records``. Everything is a pure function of ``seed``. Returns a
    summary (counts, paths, seconds).
    """
    if not 0.0 <= image_to_text_fraction <= 1.0:
        raise ValueError(f"toy: image_to_text_fraction must be in [0, 1], got {image_to_text_fraction}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    plan = (("train", n_train, "seen"), ("valid_seen", n_valid, "seen"), ("valid_heldout", n_valid, "heldout"))
    rngs = np.random.default_rng(seed).spawn(len(plan))  # one independent stream per file: sizes don't interact
    digits = max(6, len(str(n_train + 2 * n_valid)))
    summary: dict = {"out_dir": str(out_dir), "seed": seed, "image_to_text_fraction": image_to_text_fraction}
    counter, pngs = [0], {}
    for (name, n, split), rng in zip(plan, rngs):
        records = [_store_images(r, out_dir, counter, pngs, digits)
                   for r in make(n, rng, split, image_to_text_fraction)]
        path = out_dir / f"{name}.jsonl"
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
        first = sum(image_first(r) for r in records)
        summary[name] = {"path": str(path), "records": n, "split": split,
                         "image_to_text": first, "text_to_image": n - first}
    summary["images"] = counter[0]
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
