"""From request bodies to token ids and back: chat messages with pictures, completion prompts, the tokenizer
endpoints' text <-> ids (megannm's specials included, so that ``<eos>`` round-trips), and pictures in and out."""
from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import Optional

import numpy as np

from megannm.serve.protocol import HTTPProblem

# A picture's decoded size beyond this is refused (413) before it is decoded: a decompression bomb never expands.
MAX_IMAGE_PIXELS = 4096 * 4096


def encode_text(tok, text: str) -> list[int]:
    """Text -> unified ids; megannm's special tokens written out (``<eos>``, ``<|user|>``) become their ids."""
    v = tok.vocab
    pattern = "(" + "|".join(re.escape(s) for s in v.specials) + ")"
    ids: list[int] = []
    for piece in re.split(pattern, text):
        if not piece:
            continue
        ids += [v.special(piece)] if piece in v.specials else tok.text_ids(piece)
    return ids


def decode_ids(tok, ids: list[int]) -> str:
    """Unified ids -> text: text ids through the text tokenizer, specials by name, image codes as ``<image:N>``."""
    v = tok.vocab
    out, run = [], []
    for i in ids:
        if i < v.text_size:
            run.append(i)
            continue
        if run:
            out.append(tok.text.decode(run))
            run = []
        out.append(v.specials[i - v.special_start] if i >= v.special_start else f"<image:{i - v.image_start}>")
    if run:
        out.append(tok.text.decode(run))
    return "".join(out)


def token_string(tok, i: int) -> str:
    return decode_ids(tok, [i])


def check_ids(tok, ids: list[int], param: str) -> None:
    bad = next((i for i in ids if not 0 <= i < tok.vocab.size), None)
    if bad is not None:
        raise HTTPProblem(400, f"token id {bad} is outside the vocabulary [0, {tok.vocab.size})", param)


# ---------------------------------------------------------------------------------------------------------------------
# pictures


def picture_bytes(url: str, param: str, media_root: Optional[Path]) -> bytes:
    """The bytes of an ``image_url``: a ``data:`` URL (base64), or a local file under ``--allowed-local-media-path``
    (a path or ``file://`` URL); anything else is a 400 naming ``param``."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise HTTPProblem(400, "image data URLs must be base64 (data:image/png;base64,...)", param)
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPProblem(400, "the image data URL is not valid base64", param) from None
    if url.startswith(("http://", "https://")):
        raise HTTPProblem(400, "remote image URLs are not fetched: send a data URL (base64) or a local path", param)
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if media_root is None:
        raise HTTPProblem(400, "local image paths are refused: start the server with --allowed-local-media-path DIR "
                               "(or send a data URL)", param)
    try:
        resolved = path.resolve()
        resolved.relative_to(media_root)
    except (ValueError, OSError):
        raise HTTPProblem(400, f"{path}: outside --allowed-local-media-path {media_root}", param) from None
    if not resolved.is_file():
        raise HTTPProblem(400, f"{path}: image file not found", param)
    return resolved.read_bytes()


def picture(tok, data: bytes, param: str) -> np.ndarray:
    """Encoded picture bytes -> uint8 [H, W, 3] at the image tokenizer's size (its resize policy); an undecodable
    picture is a 400, an oversized one a 413, each naming ``param``."""
    from PIL import Image, UnidentifiedImageError

    from megannm.data.image_tokenizer import ImageError, read_image
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError):
        raise HTTPProblem(400, "the image cannot be decoded (expected PNG, JPEG, WebP, ...)", param) from None
    if w * h > MAX_IMAGE_PIXELS:
        raise HTTPProblem(413, f"the image is {w}x{h} px, more than {MAX_IMAGE_PIXELS} pixels", param)
    size = tok.image_size()
    try:
        return read_image(data, size, tok.image.resize, param)
    except ImageError as e:
        raise HTTPProblem(400, str(e), param) from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise HTTPProblem(400, f"the image cannot be decoded ({e})", param) from None


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


# ---------------------------------------------------------------------------------------------------------------------
# chat


def chat_messages(tok, messages, media_root: Optional[Path]) -> list[dict]:
    """Request messages -> ``megannm.generate.chat_prompt``'s form: parts ``{"type": "text"|"image", ...}`` with
    pictures decoded and fitted (not yet encoded to codes)."""
    out = []
    for i, m in enumerate(messages):
        if m.content is None or isinstance(m.content, str):
            parts = [{"type": "text", "text": m.content or ""}]
        else:
            parts = []
            for j, p in enumerate(m.content):
                if p.type == "text":
                    parts.append({"type": "text", "text": p.text})
                else:
                    where = f"messages[{i}].content[{j}].image_url"
                    parts.append({"type": "image", "image": picture(tok, picture_bytes(p.image_url.url, where,
                                                                                        media_root), where)})
        out.append({"role": m.role, "content": parts})
    return out
