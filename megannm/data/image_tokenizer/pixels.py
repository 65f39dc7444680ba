"""``pixels``: continuous images as raw pixel patches, the simplest latent there is (no autoencoder).

Each non-overlapping ``patch x patch`` block of RGB pixels, scaled to [-1, 1], is one latent slot of
``3 * patch * patch`` numbers; decoding is the exact inverse (rounded to uint8). For small pictures (the toy world's
32 x 32 drawings) this is lossless and needs no training; for photographs a learned autoencoder (the ``vae`` kind)
gives far fewer slots per picture.

Like every continuous kind, it has ``latent_channels > 0`` and ``codebook_size == 1``: the vocabulary's image range
holds the one latent-slot id, and ``encode`` gives numbers, not codes.
"""
from __future__ import annotations

import numpy as np

from megannm.data.image_tokenizer.base import ImageTokenizer, register
from megannm.data.image_tokenizer.images import check_policy
from megannm.data.image_tokenizer.patch_vq import _check_patch_grid, _from_patches, _to_patches


@register
class PixelPatches(ImageTokenizer):
    kind = "pixels"
    codebook_size = 1  # the latent slot

    def __init__(self, image_size: tuple[int, int] = (32, 32), patch: int = 4, resize: str = "crop"):
        h, w = _check_patch_grid(image_size, patch)
        self.image_size, self.patch = (h, w), int(patch)
        self.grid = (h // patch, w // patch)
        self.latent_channels = 3 * patch * patch
        self.resize = check_policy(resize)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, slots, 3 p^2] in [-1, 1]."""
        images = self._check_images(images)
        return _to_patches(images, self.patch).astype(np.float32) / 127.5 - 1.0

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float [N, slots, 3 p^2] -> uint8 [N, H, W, 3] (values outside [-1, 1] are clipped)."""
        latents = self._check_latents(latents)
        pixels = np.rint((np.clip(latents, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
        return _from_patches(pixels, self.grid, self.patch)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"image_size": np.array(self.image_size), "patch": np.array(self.patch), "resize": np.array(self.resize)}

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], source: str) -> "PixelPatches":
        missing = {"image_size", "patch"} - set(arrays)
        if missing:
            raise ValueError(f"{source}: pixels tokenizer file lacks {', '.join(sorted(missing))}")
        try:
            return cls(tuple(int(v) for v in arrays["image_size"]), int(arrays["patch"]),
                       str(arrays.get("resize", "crop")))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
