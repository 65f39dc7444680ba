"""Image tokenizers: pictures <-> grids of codebook indices, the image half of the unified vocabulary.

One module per kind behind the ``ImageTokenizer`` interface (``base.py``: sizes, ``encode``, ``decode``, ``fit``,
``save``; the registry and ``load_image_tokenizer``):

- ``patch_vq``   the toy world's nearest-codeword lookup on raw pixel patches (``patch_vq.py``; no torch)
- ``learned``    a VQ trained on your pictures, saved as a transformers ``JanusVQVAE`` folder (``learned.py``)
- ``janus``      Janus / Janus-Pro's VQ through transformers' ``JanusVQVAE`` (``janus.py``)
- ``emu3``       Emu3's vision tokenizer through transformers' ``Emu3VQVAE`` (``emu3.py``)
- ``chameleon``  Chameleon's VQ through ``ChameleonVQVAE``: encode only (``chameleon.py``)
- ``pixels``     continuous images: raw pixel patches as latents (``pixels.py``; no torch)

Third-party kinds: a class deriving from ``ImageTokenizer``, named in a tokenizer's ``image_tokenizer.json`` as
``package.module:Class`` or by the name of an entry point in the ``megannm.image_tokenizers`` group.
``images.py`` holds the resize policy every command shares.
"""
from megannm.data.image_tokenizer.base import (BUILTIN_KINDS, ENTRY_POINT_GROUP, META_FILE, ImageTokenizer,
                                               kind_class, known_kinds, load_image_tokenizer, read_meta, register)
from megannm.data.image_tokenizer.images import (RESIZE_POLICIES, ImageError, check_policy, fit_image, min_side,
                                                 read_image)
from megannm.data.image_tokenizer.patch_vq import PatchVQ

__all__ = ["ImageTokenizer", "PatchVQ", "load_image_tokenizer", "register", "kind_class", "known_kinds", "read_meta",
           "BUILTIN_KINDS", "ENTRY_POINT_GROUP", "META_FILE", "RESIZE_POLICIES", "ImageError", "check_policy",
           "fit_image", "min_side", "read_image"]
