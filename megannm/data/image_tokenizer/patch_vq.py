"""``patch_vq``: the tokenizer of the embedded toy world, with no learned encoder or decoder.

Each non-overlapping ``patch x patch`` block of pixels is replaced by its nearest codeword. We measured that k-means
over patches rounds the corners of squares into circles (shape kind 0.76-0.94 on reconstructions) while a codebook
holding every distinct patch is lossless. So training keeps the distinct patches themselves, most frequent first;
only when there are more distinct patches than codes does k-means summarise the rare tail, with the frequent
patches held fixed as exact codewords. That suits flat-coloured drawings; photographs have far more distinct
patches than any codebook (``fit_report`` says how lossy it is, and ``megannm tokenizers build`` warns).
"""
from __future__ import annotations

import numpy as np

from megannm.data.image_tokenizer.base import ImageTokenizer, register
from megannm.data.image_tokenizer.images import check_policy

_CHUNK = 16384  # patches per distance-matrix chunk: 16k x 1024 float32 = 64 MiB at most


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

    def __init__(self, codebook: np.ndarray, image_size: tuple[int, int] = (32, 32), patch: int = 4,
                 resize: str = "crop"):
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
        self.resize = check_policy(resize)

    @classmethod
    def train(cls, images: np.ndarray, codebook_size: int = 1024, patch: int = 4, seed: int = 0,
              iters: int = 10, kmeans_share: float = 0.25, resize: str = "crop") -> "PatchVQ":
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
            return cls(distinct, image_size, patch, resize)
        n_free = max(1, int(round(kmeans_share * codebook_size)))
        fixed = distinct[:codebook_size - n_free]
        tail_pts, tail_w = distinct[codebook_size - n_free:], counts[codebook_size - n_free:].astype(np.float64)
        free = _kmeans_tail(tail_pts, tail_w, fixed, n_free, iters, np.random.default_rng(seed))
        return cls(np.concatenate([fixed, free]), image_size, patch, resize)

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
        return {"codebook": self.codebook, "image_size": np.array(self.image_size), "patch": np.array(self.patch),
                "resize": np.array(self.resize)}

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], source: str) -> "PatchVQ":
        missing = {"codebook", "image_size", "patch"} - set(arrays)
        if missing:
            raise ValueError(f"{source}: patch_vq tokenizer file lacks {', '.join(sorted(missing))}")
        try:
            # files written before the resize policy was recorded were always centre-cropped
            return cls(arrays["codebook"], tuple(int(v) for v in arrays["image_size"]), int(arrays["patch"]),
                       str(arrays.get("resize", "crop")))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def fit_report(self, images: np.ndarray) -> dict:
        """How well the codebook covers ``images``: distinct patches vs codes, and the share of patch occurrences
        that come back exactly (1.0: lossless on these images). Also the distinct patches at half the patch size,
        because that is the usual cure (measured on greyscale scans: 8,044 distinct 4x4 patches for 2,048 codes made
        a model memorise; 17 distinct 2x2 patches were lossless and learned both directions)."""
        images = self._check_images(images)
        flat = _to_patches(images, self.patch).reshape(-1, self.codebook.shape[1])
        distinct, counts, inverse = _distinct(flat)
        exact = np.all(self.codebook[_nearest(distinct, self.codebook)] == distinct, axis=1)
        report = {"patch": self.patch, "codes": int(self.codebook_size), "distinct_patches": int(len(distinct)),
                  "exact_share": float(counts[exact].sum() / max(len(flat), 1))}
        if self.patch % 2 == 0:
            half = _to_patches(images, self.patch // 2).reshape(-1, (self.patch // 2) ** 2 * 3)
            report["distinct_half_patches"] = int(len(_distinct(half)[0]))
        return report
