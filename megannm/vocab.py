"""The unified vocabulary shared by data and model: ``[text | image codes | specials | padding]``.

A token's modality is a pure function of its id (``Vocab.is_image``): image codes are modality 1, everything else
(text, specials, ``<boi>``/``<eoi>``, padding rows) is modality 0, as in Chameleon and the MoT paper. With continuous
images (``latent_channels > 0``) the image range holds one id, the latent slot: an image is ``<boi>``, a slot per
latent patch, ``<eoi>``, and each slot's ``latent_channels`` numbers travel beside the ids. The padded size
divides by ``tensor_parallel_size * pad_multiple`` (Megatron's convention, so each vocab-parallel shard is equal); the
model masks the padding rows out of the softmax, so the padding never changes a loss.

The fingerprint covers everything that gives an id its meaning (text tokenizer contents, range sizes, special
names), never the padding: shards, checkpoints and exports record it and refuse a mismatch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

TEXT, IMAGE = 0, 1
MODALITY_NAMES = ("text", "image")

# Specials every vocabulary has, in this order (their ids follow the image codes).
DEFAULT_SPECIALS = (
    "<pad>", "<bos>", "<eos>", "<boi>", "<eoi>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
)


class VocabMismatchError(ValueError):
    """Two artefacts were built with different vocabularies."""


@dataclass(frozen=True)
class Vocab:
    text_size: int
    image_codes: int
    specials: tuple[str, ...] = DEFAULT_SPECIALS
    text_digest: str = ""  # sha256 of the text tokenizer's tokenizer.json ("" when none)
    image_grid: int = 0  # image tokens per image (side * side), 0 if unknown
    pad_multiple: int = 128
    latent_channels: int = 0  # continuous images: numbers per latent slot (0: images are discrete codes)
    _special_ids: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.text_size <= 0 or self.image_codes <= 0:
            raise ValueError(f"vocab: text_size and image_codes must be positive (got {self.text_size}, "
                             f"{self.image_codes})")
        if self.latent_channels < 0 or (self.latent_channels and self.image_codes != 1):
            raise ValueError(f"vocab: continuous images have one image id, the latent slot (got image_codes="
                             f"{self.image_codes}, latent_channels={self.latent_channels})")
        if len(set(self.specials)) != len(self.specials):
            raise ValueError(f"vocab: duplicate special tokens in {self.specials}")
        object.__setattr__(self, "specials", tuple(self.specials))
        ids = {name: self.special_start + i for i, name in enumerate(self.specials)}
        object.__setattr__(self, "_special_ids", ids)

    # ranges -------------------------------------------------------------------------------------------------------
    @property
    def image_start(self) -> int:
        return self.text_size

    @property
    def image_end(self) -> int:
        return self.text_size + self.image_codes

    @property
    def special_start(self) -> int:
        return self.image_end

    @property
    def size(self) -> int:
        """Ids in use (unpadded)."""
        return self.image_end + len(self.specials)

    def padded_size(self, tensor_parallel_size: int = 1) -> int:
        m = self.pad_multiple * tensor_parallel_size
        return -(-self.size // m) * m

    def special(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"vocab: no special token {name!r} (have {', '.join(self.specials)})") from None

    @property
    def pad_id(self) -> int:
        return self.special("<pad>")

    @property
    def bos_id(self) -> int:
        return self.special("<bos>")

    @property
    def eos_id(self) -> int:
        return self.special("<eos>")

    @property
    def boi_id(self) -> int:
        return self.special("<boi>")

    @property
    def eoi_id(self) -> int:
        return self.special("<eoi>")

    # conversions --------------------------------------------------------------------------------------------------
    def image_ids(self, codes):
        """Codebook indices -> unified ids."""
        return codes + self.image_start

    def image_codes_of(self, ids):
        """Unified ids -> codebook indices (the caller guarantees they are image ids)."""
        return ids - self.image_start

    def is_image(self, ids):
        return (ids >= self.image_start) & (ids < self.image_end)

    @property
    def continuous(self) -> bool:
        return self.latent_channels > 0

    @property
    def slot_id(self) -> int:
        """The latent slot (continuous images)."""
        return self.image_start

    def token_dtype(self):
        """The narrowest unsigned numpy dtype that holds every id."""
        return np.uint16 if self.size <= np.iinfo(np.uint16).max + 1 else np.uint32

    # identity -----------------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        ident = {"text_size": self.text_size, "image_codes": self.image_codes, "specials": list(self.specials),
                 "text_digest": self.text_digest, "image_grid": self.image_grid}
        if self.latent_channels:  # (absent for discrete images: their fingerprints stay what they were)
            ident["latent_channels"] = self.latent_channels
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_special_ids", None)
        if not self.latent_channels:
            d.pop("latent_channels")
        d["specials"] = list(self.specials)
        d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "vocab") -> "Vocab":
        d = dict(d)
        expected = d.pop("fingerprint", None)
        v = cls(**{k: (tuple(x) if k == "specials" else x) for k, x in d.items()})
        if expected is not None and expected != v.fingerprint:
            raise VocabMismatchError(f"{source}: fingerprint {expected} does not match its contents ({v.fingerprint})")
        return v

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()), source=str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: vocabulary file not found") from None

    def check_same(self, other_fingerprint: str, here: str, there: str) -> None:
        """Raise one clear line if ``other_fingerprint`` (recorded in ``there``) differs from this vocabulary's."""
        if other_fingerprint != self.fingerprint:
            raise VocabMismatchError(
                f"vocabulary mismatch: {there} has fingerprint {other_fingerprint}, {here} has {self.fingerprint}")

