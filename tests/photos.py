"""Real photographs for tests: crops of the colour photos that scikit-image ships inside its package (read from
its data folder, so nothing is downloaded). Training crops come from some photos, held-out crops from others."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

# photo file -> the caption our records give its crops
CAPTIONS = {"astronaut.png": "an astronaut", "coffee.png": "a cup of coffee", "rocket.jpg": "a rocket on its pad",
            "motorcycle_left.png": "a motorcycle", "retina.jpg": "a retina", "chelsea.png": "a cat",
            "ihc.png": "a stained tissue", "hubble_deep_field.jpg": "deep space"}
SPLITS = {"train": ["astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg"],
          "heldout": ["chelsea.png", "ihc.png", "hubble_deep_field.jpg"]}
SPLITS["all"] = SPLITS["train"] + SPLITS["heldout"]


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    import skimage
    with Image.open(Path(skimage.__file__).parent / "data" / name) as im:
        return np.asarray(im.convert("RGB"))


def _crop(rng, im: np.ndarray, lo: int = 48, hi: int = 192) -> np.ndarray:
    h, w = im.shape[:2]
    s = int(rng.integers(lo, min(h, w, hi)))
    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
    return im[y:y + s, x:x + s]


def photo_crops(n: int, size: int = 32, seed: int = 0, split: str = "all") -> np.ndarray:
    """uint8 [n, size, size, 3]: square crops of 48-192 px, resized down (photos seen at a small size)."""
    rng = np.random.default_rng(seed)
    names = SPLITS[split]
    return np.stack([np.asarray(Image.fromarray(_crop(rng, photo(names[i % len(names)]))).resize(
        (size, size), Image.BICUBIC)) for i in range(n)])


def write_photo_records(folder: Path, n: int, seed: int = 0, split: str = "all", image_first: float = 0.5) -> Path:
    """``folder/records.jsonl`` of caption pairs over photo crops saved as files of any size, shape and mode (RGB
    and greyscale PNG, RGBA PNG, JPEG; square and not), half of them image -> text."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = SPLITS[split]
    lines = []
    for i in range(n):
        name = names[i % len(names)]
        crop = _crop(rng, photo(name), 40, 160)
        if i % 4 == 1:
            crop = crop[:, : max(20, crop.shape[1] * 2 // 3)]  # not square
        im = Image.fromarray(np.ascontiguousarray(crop))
        fname, im = [(f"{i:03d}.png", im), (f"{i:03d}.jpg", im), (f"{i:03d}_grey.png", im.convert("L")),
                     (f"{i:03d}_rgba.png", im.convert("RGBA"))][i % 4]
        im.save(folder / "images" / fname)
        parts = [{"image": f"images/{fname}"}, {"text": CAPTIONS[name]}]
        lines.append(json.dumps({"parts": parts if rng.random() < image_first else parts[::-1]}))
    path = folder / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
