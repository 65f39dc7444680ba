"""``janus``: the VQ tokenizer of Janus / Janus-Pro (LlamaGen's VQ-16 design) through transformers' ``JanusVQVAE``.

Its native size is fixed by the config: ``num_patches`` tokens a side (the decoder's grid), each covering
``2 ** (levels - 1)`` pixels (Janus-Pro: 24 x 16 = 384 px, 576 tokens, 16,384 codes).
"""
from __future__ import annotations

from megannm.data.image_tokenizer.base import register
from megannm.data.image_tokenizer.hf import HFVQ


@register
class JanusVQ(HFVQ):
    kind = "janus"
    vq_model_type = "janus_vqgan"
    full_model_type = "janus"

    @classmethod
    def _classes(cls):
        from transformers import JanusVQVAE, JanusVQVAEConfig
        return JanusVQVAE, JanusVQVAEConfig

    def _native_size(self, image_size) -> tuple[int, int]:
        side = int(self.model.config.num_patches) * self.factor
        if image_size is not None and tuple(int(v) for v in image_size) != (side, side):
            raise ValueError(f"{self.where}: a {self.kind} tokenizer works at {side}x{side} px only (its decoder "
                             f"expects {self.model.config.num_patches}x{self.model.config.num_patches} tokens); "
                             f"got image size {list(image_size)}")
        return side, side

    def _encode_pixels(self, x):
        return self.model.encode(x).image_tokens.view(x.shape[0], -1)

    def _decode_codes(self, codes):
        return self.model.decode(codes)
