"""``chameleon``: Chameleon's image tokenizer (8,192 codes, 16x downsampling: 1,024 tokens at 512 px) through
transformers' ``ChameleonVQVAE``, which has an encoder only: fine for understanding data (image -> text), and
every attempt to decode (``megannm generate`` an image, a sample grid) is refused with one line.

Its normalisation defaults to Chameleon's processor (``x * 0.0078 - 1``: [-1, 1]).
"""
from __future__ import annotations

from megannm.data.image_tokenizer.base import register
from megannm.data.image_tokenizer.hf import HFVQ


@register
class ChameleonVQ(HFVQ):
    kind = "chameleon"
    vq_model_type = "chameleon_vqgan"
    full_model_type = "chameleon"
    can_decode = False
    pixels_default = {"rescale_factor": 0.0078, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]}

    @classmethod
    def _classes(cls):
        from transformers import ChameleonVQVAE, ChameleonVQVAEConfig
        return ChameleonVQVAE, ChameleonVQVAEConfig

    def _native_size(self, image_size) -> tuple[int, int]:
        side = int(self.model.config.resolution)
        if image_size is not None and tuple(int(v) for v in image_size) != (side, side):
            raise ValueError(f"{self.where}: a chameleon tokenizer works at its configured resolution {side}x{side} "
                             f"px only; got image size {list(image_size)}")
        return side, side

    def _encode_pixels(self, x):
        return self.model.encode(x).image_tokens.view(x.shape[0], -1)

    def _decode_codes(self, codes):
        raise ValueError("chameleon: encode-only tokenizer")
