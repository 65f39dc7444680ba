"""Image tokenizers: pictures <-> grids of codebook indices, the image half of the unified vocabulary.

``ImageTokenizer`` is the interface the rest of megannm sees (sizes, ``encode``, ``decode``, ``save``); a tokenizer
file records its ``kind`` and ``load_image_tokenizer`` dispatches on it, so a pretrained VQGAN can be added later as
one more subclass registered under its own kind without touching any caller.

``PatchVQ`` is the tokenizer of the embedded toy world: each non-overlapping ``patch x patch`` block of pixels is
replaced by its nearest codeword. We measured that k-means over patches rounds the corners of squares into
circles (shape kind 0.76-0.94 on reconstructions) while a codebook holding every distinct patch is lossless. So
training keeps the distinct patches themselves, most frequent first; only when there are more distinct patches than
codes does k-means summarise the rare tail, with the frequent patches held fixed as exact codewords.
"""
from __future__ import annotations

import os
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

_FORMAT_VERSION = 1
_CHUNK = 16384  # patches per distance-matrix chunk: 16k x 1024 float32 = 64 MiB at most


class ImageTokenizer(ABC):
    """Maps uint8 images ``[N, H, W, 3]`` to int64 codes ``[N, num_tokens]`` (raster order) and back."""

    kind: str = ""  # written into the file; ``load_image_tokenizer`` dispatches on it
    image_size: tuple[int, int]  # (height, width)
    grid: tuple[int, int]  # (rows, columns) of tokens
    codebook_size: int

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> int64 ``[N, num_tokens]`` in raster order."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int ``[N, num_tokens]`` -> uint8 ``[N, H, W, 3]``; a code outside ``[0, codebook_size)`` is a ValueError."""

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild this tokenizer, as named arrays (``kind`` and version are added)."""

    @classmethod
    @abstractmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], source: str) -> "ImageTokenizer":
        """Inverse of ``_arrays``; ``source`` names the file for error messages."""

    def save(self, path) -> Path:
        """Write one ``.npz`` file atomically (temporary name, then rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"kind": np.array(self.kind), "format_version": np.array(_FORMAT_VERSION), **self._arrays()}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temporary name
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return path

    # shared checks ------------------------------------------------------------------------------------------------
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        h, w = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(f"{type(self).__name__}.encode: expected uint8 images [N, {h}, {w}, 3], "
                             f"got {images.dtype} {list(images.shape)}")
        return images

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_tokens or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"{type(self).__name__}.decode: expected integer codes [N, {self.num_tokens}], "
                             f"got {codes.dtype} {list(codes.shape)}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            n, t = np.argwhere(bad)[0]
            raise ValueError(f"{type(self).__name__}.decode: code {int(codes[n, t])} at image {n}, token {t} is "
                             f"outside the codebook [0, {self.codebook_size})")
        return codes


_REGISTRY: dict[str, type[ImageTokenizer]] = {}


def register(cls: type[ImageTokenizer]) -> type[ImageTokenizer]:
    """Class decorator: make ``cls`` loadable by ``load_image_tokenizer`` under ``cls.kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def load_image_tokenizer(path) -> ImageTokenizer:
    """Load a tokenizer written by ``ImageTokenizer.save``, whatever its kind."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image tokenizer file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable image tokenizer file ({type(e).__name__}: {e})") from None
    if "kind" not in arrays:
        raise ValueError(f"{path}: not an image tokenizer file (no 'kind' entry)")
    kind = str(arrays.pop("kind"))
    version = int(arrays.pop("format_version", -1))
    if version != _FORMAT_VERSION:
        raise ValueError(f"{path}: image tokenizer format version {version}, this megannm reads {_FORMAT_VERSION}")
    if kind not in _REGISTRY:
        raise ValueError(f"{path}: unknown image tokenizer kind {kind!r} (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[kind]._from_arrays(arrays, source=str(path))


# -------------------------------------------------------------------------------------------------------------------
# PatchVQ
# -------------------------------------------------------------------------------------------------------------------
def _check_patch_grid(image_size, patch: int) -> tuple[int, int]:
    h, w = (int(v) for v in image_size)
    if patch <= 0 or h % patch or w % patch:
        raise ValueError(f"PatchVQ: image size {h}x{w} is not a multiple of the patch size {patch}")
    return h, w


def _to_patches(images: np.ndarray, patch: int) -> np.ndarray:
    """``[N, H, W, C]`` -> ``[N, (H/p)*(W/p), p*p*C]``, patches in raster order, pixels raster order within."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def _from_patches(patches: np.ndarray, grid: tuple[int, int], patch: int) -> np.ndarray:
    """Inverse of ``_to_patches``."""
    n = patches.shape[0]
    (gh, gw), c = grid, patches.shape[-1] // (patch * patch)
    x = patches.reshape(n, gh, gw, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, gh * patch, gw * patch, c)


def _distinct(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct rows of a uint8 matrix with their counts and the inverse map, via one sort of byte strings."""
    rows = np.ascontiguousarray(rows)
    keys = rows.view(np.dtype((np.void, rows.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    return rows[first], counts, inverse.ravel()


def _nearest(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword (squared L2) for every row of ``x``, chunked so memory stays bounded.

    Centred on 128 before the float32 products so that the squared norms stay small enough for float32 to
    separate an exact match (distance 0) from a one-level difference.
    """
    c = codebook.astype(np.float32) - 128.0
    c_sq = (c * c).sum(1)
    out = np.empty(len(x), np.int64)
    for start in range(0, len(x), _CHUNK):
        xc = x[start:start + _CHUNK].astype(np.float32) - 128.0
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every codeword, so it is dropped.
        out[start:start + len(xc)] = (c_sq[None, :] - 2.0 * xc @ c.T).argmin(1)
    return out


def _kmeans_tail(points: np.ndarray, weights: np.ndarray, fixed: np.ndarray, k: int, iters: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Weighted Lloyd iterations for ``k`` free centroids while the ``fixed`` codewords stay as they are.

    Every point is assigned to its nearest codeword among fixed + free, so the free ones settle where the fixed
    ones serve badly; a free centroid that loses all its points is re-seeded on a random point.
    """
    pts = points.astype(np.float64)
    free = pts[rng.choice(len(pts), size=k, replace=False)]
    for _ in range(iters):
        assign = _nearest(points, np.concatenate([fixed, np.rint(free).clip(0, 255).astype(np.uint8)]))
        slot = assign - len(fixed)
        mine = slot >= 0
        w_sum = np.bincount(slot[mine], weights=weights[mine], minlength=k)
        for ch in range(pts.shape[1]):  # weighted means, one channel at a time (no [k, n] one-hot matrix)
            free[:, ch] = np.bincount(slot[mine], weights=weights[mine] * pts[mine, ch], minlength=k)
        empty = w_sum == 0
        free[~empty] /= w_sum[~empty, None]
        free[empty] = pts[rng.choice(len(pts), size=int(empty.sum()), replace=False)]
    return np.rint(free).clip(0, 255).astype(np.uint8)


@register
class PatchVQ(ImageTokenizer):
    """Nearest-codeword vector quantisation of non-overlapping square patches (no learned encoder/decoder)."""

    kind = "patch_vq"

    def __init__(self, codebook: np.ndarray, image_size: tuple[int, int] = (32, 32), patch: int = 4):
        codebook = np.asarray(codebook)
        h, w = _check_patch_grid(image_size, patch)
        if codebook.dtype != np.uint8 or codebook.ndim != 2 or codebook.shape[1] != patch * patch * 3:
            raise ValueError(f"PatchVQ: codebook must be uint8 [K, {patch * patch * 3}], "
                             f"got {codebook.dtype} {list(codebook.shape)}")
        self.codebook = codebook
        self.patch = int(patch)
        self.image_size = (int(h), int(w))
        self.grid = (h // patch, w // patch)
        self.codebook_size = len(codebook)

    @classmethod
    def train(cls, images: np.ndarray, codebook_size: int = 1024, patch: int = 4, seed: int = 0,
              iters: int = 10, kmeans_share: float = 0.25) -> "PatchVQ":
        """Build a codebook from ``images`` (uint8 ``[N, H, W, 3]``).

        If the distinct patches fit in ``codebook_size``, the codebook is exactly those patches, most frequent
        first, and ``codebook_size`` shrinks to their number (encode/decode are then lossless on these images;
        unused codes would only be dead rows in the vocabulary). Otherwise the most frequent
        ``(1 - kmeans_share) * codebook_size`` patches are kept exactly and ``iters`` rounds of weighted k-means
        place the remaining codes over the rare tail. Deterministic for a given ``seed``.
        """
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"PatchVQ.train: expected uint8 images [N, H, W, 3] with N > 0, "
                             f"got {images.dtype} {list(images.shape)}")
        image_size = _check_patch_grid(images.shape[1:3], patch)
        distinct, counts, _ = _distinct(_to_patches(images, patch).reshape(-1, patch * patch * 3))
        # Most frequent first; ties by byte order (np.unique's order), so the result never depends on chance.
        order = np.argsort(-counts, kind="stable")
        distinct, counts = distinct[order], counts[order]
        if len(distinct) <= codebook_size:
            return cls(distinct, image_size, patch)
        n_free = max(1, int(round(kmeans_share * codebook_size)))
        fixed = distinct[:codebook_size - n_free]
        tail_pts, tail_w = distinct[codebook_size - n_free:], counts[codebook_size - n_free:].astype(np.float64)
        free = _kmeans_tail(tail_pts, tail_w, fixed, n_free, iters, np.random.default_rng(seed))
        return cls(np.concatenate([fixed, free]), image_size, patch)

    def encode(self, images: np.ndarray) -> np.ndarray:
        images = self._check_images(images)
        flat = _to_patches(images, self.patch).reshape(-1, self.codebook.shape[1])
        # Pictures repeat patches massively (background, flat interiors): search only the distinct ones.
        distinct, _, inverse = _distinct(flat)
        codes = _nearest(distinct, self.codebook)[inverse]
        return codes.reshape(len(images), self.num_tokens)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self._check_codes(codes)
        return _from_patches(self.codebook[codes], self.grid, self.patch)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"codebook": self.codebook, "image_size": np.array(self.image_size), "patch": np.array(self.patch)}

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], source: str) -> "PatchVQ":
        missing = {"codebook", "image_size", "patch"} - set(arrays)
        if missing:
            raise ValueError(f"{source}: patch_vq tokenizer file lacks {', '.join(sorted(missing))}")
        try:
            return cls(arrays["codebook"], tuple(int(v) for v in arrays["image_size"]), int(arrays["patch"]))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
