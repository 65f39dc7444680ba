"""``emu3``: Emu3's vision tokenizer (32,768 codes, 8x spatial downsampling) through transformers' ``Emu3VQVAE``.

Emu3 itself tokenises images at their own aspect ratio; a megannm vocabulary has one grid for every image, so
the tokenizer works at one native size: the ``image_size`` recorded in its folder, else the side of the
processor's ``min_pixels`` (512 px for Emu3: 64 x 64 = 4,096 tokens), else 512. A still image is repeated over the
model's temporal window, as ``Emu3VQVAE.encode`` does for 4-d input.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from megannm.data.image_tokenizer.base import register
from megannm.data.image_tokenizer.hf import HFVQ

DEFAULT_SIDE = 512


@register
class Emu3VQ(HFVQ):
    kind = "emu3"
    vq_model_type = "emu3_vqgan"
    full_model_type = "emu3"

    def __init__(self, model, image_size=None, default_side: int = DEFAULT_SIDE, **kw):
        self._default_side = default_side
        super().__init__(model, image_size=image_size, **kw)

    @classmethod
    def _classes(cls):
        from transformers import Emu3VQVAE, Emu3VQVAEConfig
        return Emu3VQVAE, Emu3VQVAEConfig

    def _codebook_size(self) -> int:
        return self.model.config.codebook_size

    def _native_size(self, image_size) -> tuple[int, int]:
        if image_size is not None:
            return int(image_size[0]), int(image_size[1])
        side = max(self.factor, round(self._default_side / self.factor) * self.factor)
        return side, side

    @classmethod
    def _processor_options(cls, folder: Path) -> dict:
        path = folder / "preprocessor_config.json"
        if path.is_file():
            p = json.loads(path.read_text())
            if "min_pixels" in p:
                return {"default_side": int(math.sqrt(p["min_pixels"]))}
        return {}

    def _encode_pixels(self, x):
        import torch
        sizes = torch.tensor([list(self.image_size)] * x.shape[0], device=x.device)
        tokens = self.model.encode(x, sizes).image_tokens  # a list of [h, w] grids
        return torch.stack(list(tokens)).view(x.shape[0], -1)

    def _decode_codes(self, codes):
        return self.model.decode(codes.view(codes.shape[0], *self.grid))
