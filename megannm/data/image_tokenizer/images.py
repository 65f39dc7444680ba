"""Any picture -> the tokenizer's native size: the one resize policy that preprocessing, tokenizer training,
generation and evaluation all use (so a model never sees an image framed differently from its training data).

* ``crop`` (default): cut the largest centred box of the target aspect ratio, then resize. Nothing is stretched
  and nothing is invented, at the price of the borders of a non-square picture.
* ``pad``: resize so that the whole picture fits, then pad the rest with a flat grey (Janus's processor pads the
  same way, with its mean colour). Nothing is lost, at the price of tokens spent on the padding.

Greyscale, palette and 16-bit pictures become RGB; a picture with transparency is composited over white (what a
viewer shows). A picture whose shorter side is below ``min_side`` (8 px, or an eighth of the target side) is
refused: upscaling it further only spreads a few pixels into blur that the model would learn as "an image".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

RESIZE_POLICIES = ("crop", "pad")
PAD_COLOR = (127, 127, 127)


class ImageError(ValueError):
    """A picture that cannot be used; the message is one line naming the file (and the record's line)."""


def min_side(size: tuple[int, int]) -> int:
    """The shortest side a picture may have for a tokenizer of this native ``(height, width)``."""
    return max(8, -(-max(size) // 8))


def check_policy(policy: str, where: str = "resize") -> str:
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"{where}: resize policy must be one of {', '.join(RESIZE_POLICIES)} (got {policy!r})")
    return policy


def to_rgb(im):
    """A PIL image in any mode -> mode RGB (alpha over white, 16-bit scaled down, palette expanded)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / float scans: scale to 8 bits, do not clip
        a = np.asarray(im, dtype=np.float64)
        hi = float(a.max()) or 1.0
        im = Image.fromarray(np.clip(a * (255.0 / (65535.0 if hi > 255 else 255.0)), 0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def fit_image(im, size: tuple[int, int], policy: str = "crop", where: str = "image"):
    """A PIL image (any mode, any size) or a uint8 array ``[H, W]``/``[H, W, 1|3|4]`` -> uint8 ``[h, w, 3]``."""
    from PIL import Image

    if isinstance(im, np.ndarray):
        im = _from_array(im, where)
    h, w = (int(v) for v in size)
    sw, sh = im.size
    if min(sw, sh) < min_side((h, w)):
        raise ImageError(f"{where}: image is {sw}x{sh} px, too small for a {w}x{h} tokenizer (shorter side must be "
                         f">= {min_side((h, w))} px)")
    im = to_rgb(im)
    if (sw, sh) == (w, h):
        return np.asarray(im, dtype=np.uint8)
    if check_policy(policy, where) == "crop":
        scale = min(sw / w, sh / h)
        cw, ch = round(w * scale), round(h * scale)
        left, top = (sw - cw) // 2, (sh - ch) // 2
        return np.asarray(im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC), dtype=np.uint8)
    scale = min(w / sw, h / sh)
    rw, rh = max(1, round(sw * scale)), max(1, round(sh * scale))
    canvas = Image.new("RGB", (w, h), PAD_COLOR)
    canvas.paste(im.resize((rw, rh), Image.BICUBIC), ((w - rw) // 2, (h - rh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def _from_array(a: np.ndarray, where: str):
    from PIL import Image

    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{where}: expected a uint8 picture [H, W] or [H, W, 1|3|4], got {a.dtype} {list(a.shape)}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    return Image.fromarray(a)


def read_image(source, size: tuple[int, int], policy: str = "crop", where: str | None = None) -> np.ndarray:
    """A picture -> uint8 ``[h, w, 3]`` by ``fit_image``. ``source``: a file path, encoded bytes (a WebDataset member,
    a Parquet cell) or a uint8 array. A missing, unreadable or tiny picture is one ``ImageError`` line naming
    ``where`` (e.g. ``records.jsonl:12``) and the file."""
    import io

    from PIL import Image, UnidentifiedImageError

    prefix = f"{where}: " if where else ""
    if isinstance(source, np.ndarray):
        return fit_image(source, size, policy, where=where or "image")
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, opener = "image bytes", lambda: Image.open(io.BytesIO(bytes(source)))
    else:
        path = Path(source)
        name, opener = str(path), lambda: Image.open(path)
    try:
        with opener() as im:
            im.load()  # decode now: a truncated file fails here, inside the try
            return fit_image(im, size, policy, where=f"{prefix}{name}")
    except FileNotFoundError:
        raise ImageError(f"{prefix}image file not found: {name}") from None
    except IsADirectoryError:
        raise ImageError(f"{prefix}image path is a folder, not a file: {name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{prefix}image cannot be read: {name} ({type(e).__name__}: {e})") from None
