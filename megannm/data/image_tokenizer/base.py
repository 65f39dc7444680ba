"""The ``ImageTokenizer`` interface, the registry of kinds, and loading a saved tokenizer whatever its kind.

A tokenizer is saved either as one ``.npz`` file (array-only kinds: ``patch_vq``) or as a folder holding
``image_tokenizer.json`` (``{"format": ..., "kind": ..., "image_size": ..., "resize": ...}`` plus what the kind
needs) beside its own files (for the transformers kinds: ``config.json`` and ``model.safetensors``, so the folder
also loads with transformers alone). Both record their ``kind``; ``load_image_tokenizer`` dispatches on it.

Kinds resolve, in this order: classes registered with ``@register``; megannm's own (imported only when used, so
that loading ``patch_vq`` never imports torch); an entry point of the ``megannm.image_tokenizers`` group that an
installed package declares; ``package.module:Class`` written as the kind itself. A saved tokenizer is data that
passes between people, so the kind its file names imports a module only where an installed package registered it
(an entry point, by name or by its ``module:Class``) or this process already imported that module; any other
``module:Class`` is refused with one line naming the file and the kind, unless ``--trust-code`` was given
(``megannm.trust``). A kind the user names on the command line (``tokenizers build --image-kind``) is theirs to
choose.
"""
from __future__ import annotations

import importlib
import io
import json
import sys
import zipfile
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np

from megannm.data.image_tokenizer.images import PAD_COLOR, check_policy, fit_image
from megannm import trust
from megannm.fileio import atomic_write

FORMAT_VERSION = 1  # of the .npz files and of image_tokenizer.json
FOLDER_FORMAT = "megannm-image-tokenizer"
META_FILE = "image_tokenizer.json"
ENTRY_POINT_GROUP = "megannm.image_tokenizers"

# megannm's own kinds: "module:Class" and how they are stored ("file": one .npz; "folder": image_tokenizer.json + files)
BUILTIN_KINDS: dict[str, tuple[str, str]] = {
    "patch_vq": ("megannm.data.image_tokenizer.patch_vq:PatchVQ", "file"),
    "pixels": ("megannm.data.image_tokenizer.pixels:PixelPatches", "file"),
    "learned": ("megannm.data.image_tokenizer.learned:LearnedVQ", "folder"),
    "janus": ("megannm.data.image_tokenizer.janus:JanusVQ", "folder"),
    "emu3": ("megannm.data.image_tokenizer.emu3:Emu3VQ", "folder"),
    "chameleon": ("megannm.data.image_tokenizer.chameleon:ChameleonVQ", "folder"),
}


class ImageTokenizer(ABC):
    """Maps uint8 images ``[N, H, W, 3]`` to int64 codes ``[N, num_tokens]`` (raster order) and back; a continuous
    kind (``latent_channels > 0``) to float32 latents ``[N, num_tokens, latent_channels]`` instead, one latent slot
    per token."""

    kind: str = ""  # written into the file or folder; ``load_image_tokenizer`` dispatches on it
    storage: str = "file"  # "file": one .npz (``_arrays``); "folder": ``save`` writes image_tokenizer.json + files
    can_decode: bool = True  # False for encode-only tokenizers (understanding data only)
    image_size: tuple[int, int]  # (height, width): the native resolution every picture is fitted to
    grid: tuple[int, int]  # (rows, columns) of tokens
    codebook_size: int
    resize: str = "crop"  # the resize policy (images.py): "crop" or "pad"
    latent_channels: int = 0  # continuous kinds: numbers per latent slot (codebook_size is then 1: the slot id)

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def default_name(self) -> str:
        """Its name inside a tokenizer bundle."""
        return "image_tokenizer.npz" if self.storage == "file" else "image_tokenizer"

    @abstractmethod
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` -> int64 ``[N, num_tokens]`` in raster order."""

    @abstractmethod
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int ``[N, num_tokens]`` -> uint8 ``[N, H, W, 3]``; a code outside ``[0, codebook_size)`` is a ValueError."""

    def fit(self, image, where: str = "image") -> np.ndarray:
        """Any picture (PIL image or uint8 array, any size or mode) -> uint8 ``[H, W, 3]`` by this tokenizer's
        policy."""
        return fit_image(image, self.image_size, self.resize, where)

    def to(self, device) -> "ImageTokenizer":
        """Move the tokenizer's model to ``device`` (a no-op for tokenizers without one)."""
        return self

    def describe(self) -> dict:
        """Sizes for people: kind, native size, grid, codebook, policy."""
        out = {"kind": self.kind, "image_size": list(self.image_size), "grid": list(self.grid),
               "tokens_per_image": self.num_tokens, "codebook_size": int(self.codebook_size), "resize": self.resize,
               "decodes": self.can_decode}
        if self.latent_channels:
            out["latent_channels"] = int(self.latent_channels)
        return out

    # saving ---------------------------------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        """File kinds: everything needed to rebuild this tokenizer, as named arrays (``kind`` and version added)."""
        raise NotImplementedError(f"{type(self).__name__}: a folder kind saves with save(folder)")

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray], source: str) -> "ImageTokenizer":
        """Inverse of ``_arrays``; ``source`` names the file for error messages."""
        raise NotImplementedError(f"{cls.__name__}: not stored as a .npz file")

    @classmethod
    def load(cls, folder: Path, meta: dict) -> "ImageTokenizer":
        """Folder kinds: rebuild from ``folder`` and its parsed ``image_tokenizer.json``."""
        raise NotImplementedError(f"{cls.__name__}: not stored as a folder")

    def save(self, path, overwrite: bool = True) -> Path:
        """File kinds: one ``.npz`` written atomically (temporary name, then rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"kind": np.array(self.kind), "format_version": np.array(FORMAT_VERSION), **self._arrays()}
        buf = io.BytesIO()  # a file object, so numpy does not append ".npz" to the name (arrays: a codebook's size)
        np.savez(buf, **arrays)
        return atomic_write(path, buf.getvalue())

    def meta(self, **extra) -> dict:
        """The ``image_tokenizer.json`` of a folder kind."""
        return {"format": FOLDER_FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
                "image_size": list(self.image_size), "grid": list(self.grid), "codebook_size": int(self.codebook_size),
                "resize": self.resize, **extra}

    # shared checks ------------------------------------------------------------------------------------------------
    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        h, w = self.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (h, w, 3):
            raise ValueError(f"{type(self).__name__}.encode: expected uint8 images [N, {h}, {w}, 3], "
                             f"got {images.dtype} {list(images.shape)} (fit pictures with .fit first)")
        return images

    def _check_latents(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents)
        if latents.ndim != 3 or latents.shape[1:] != (self.num_tokens, self.latent_channels) or \
                not np.issubdtype(latents.dtype, np.floating):
            raise ValueError(f"{type(self).__name__}.decode: expected float latents [N, {self.num_tokens}, "
                             f"{self.latent_channels}], got {latents.dtype} {list(latents.shape)}")
        return latents

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        if not self.can_decode:
            raise ValueError(f"image tokenizer kind {self.kind!r} encodes only (no decoder): it can tokenise images "
                             f"for understanding, not turn codes back into pictures")
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


# ---------------------------------------------------------------------------------------------------------------------
# the registry

_REGISTRY: dict[str, type[ImageTokenizer]] = {}


def register(cls: type[ImageTokenizer]) -> type[ImageTokenizer]:
    """Class decorator: make ``cls`` loadable by ``load_image_tokenizer`` under ``cls.kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def known_kinds() -> dict[str, str]:
    """Every kind name this process can resolve -> its storage ("file" or "folder"; "?" for entry points not yet
    imported)."""
    kinds = {k: s for k, (_, s) in BUILTIN_KINDS.items()}
    kinds.update({ep.name: "?" for ep in entry_points(group=ENTRY_POINT_GROUP)})
    kinds.update({k: c.storage for k, c in _REGISTRY.items()})
    return kinds


def kind_class(kind: str, where: str = "image tokenizer") -> type[ImageTokenizer]:
    """The class of a kind name (see the module docstring for the order), or one ValueError line naming ``where``."""
    if kind in _REGISTRY:
        return _REGISTRY[kind]
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if kind in BUILTIN_KINDS:
        target = BUILTIN_KINDS[kind][0]
    elif kind in eps:
        target = eps[kind].value
    elif ":" in kind:
        target = kind
    else:
        raise ValueError(f"{where}: unknown image tokenizer kind {kind!r} (known: {', '.join(sorted(known_kinds()))}; "
                         f"or package.module:Class)")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: image tokenizer kind {kind!r}: cannot import {target} "
                         f"({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, ImageTokenizer)):
        raise ValueError(f"{where}: image tokenizer kind {kind!r}: {target} is not an ImageTokenizer subclass")
    return cls


def check_saved_kind(kind: str, where: str) -> None:
    """A kind read from a saved tokenizer (``where``) may import a module only if an installed package registered it
    or the user said ``--trust-code`` (see the module docstring); else one line naming ``where`` and the kind. Names
    without a module (built in, registered, entry points by name, or unknown: ``kind_class`` says so) pass."""
    if ":" not in kind or trust.trusted() or kind in _REGISTRY or kind in BUILTIN_KINDS:
        return
    target = kind.replace(" ", "")
    registered = {t for t, _ in BUILTIN_KINDS.values()}
    registered |= {ep.value.replace(" ", "") for ep in entry_points(group=ENTRY_POINT_GROUP)}
    registered |= {f"{c.__module__}:{c.__qualname__}" for c in _REGISTRY.values()}
    if target in registered or target.partition(":")[0] in sys.modules:
        return  # an installed package's own class, or a module this process imported already: nothing new runs
    raise trust.refusal(where, f"image tokenizer kind {kind!r} would import module {target.partition(':')[0]}, "
                               f"which no installed package registers as an image tokenizer (entry point group "
                               f"{ENTRY_POINT_GROUP})")


# ---------------------------------------------------------------------------------------------------------------------
# loading


def load_image_tokenizer(path, device=None) -> ImageTokenizer:
    """Load a tokenizer written by ``ImageTokenizer.save`` (a ``.npz`` file or a folder), whatever its kind.

    A folder without ``image_tokenizer.json`` that transformers wrote (``config.json`` of an Emu3, Janus or
    Chameleon VQ model, or of a whole such model with its ``vq_config``) loads as that kind, at its native size and
    with the centre-crop policy. ``device``: where a model-backed tokenizer runs (default: the CPU)."""
    path = Path(path)
    if path.is_dir():
        tok = _load_folder(path)
    elif path.is_file():
        tok = _load_file(path)
    else:
        raise FileNotFoundError(f"{path}: image tokenizer file not found")
    return tok.to(device) if device is not None else tok


def _load_file(path: Path) -> ImageTokenizer:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable image tokenizer file ({type(e).__name__}: {e})") from None
    if "kind" not in arrays:
        raise ValueError(f"{path}: not an image tokenizer file (no 'kind' entry)")
    kind = str(arrays.pop("kind"))
    version = int(arrays.pop("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: image tokenizer format version {version}, this megannm reads {FORMAT_VERSION}")
    kinds = known_kinds()
    if kind not in kinds and ":" not in kind:
        files = sorted(k for k, s in kinds.items() if s == "file")
        folders = sorted(k for k, s in kinds.items() if s != "file")
        raise ValueError(f"{path}: unknown image tokenizer kind {kind!r} (known: {', '.join(files)}) for a .npz file; "
                         f"folder kinds: {', '.join(folders)}")
    check_saved_kind(kind, str(path))
    cls = kind_class(kind, str(path))
    if cls.storage != "file":
        raise ValueError(f"{path}: kind {kind!r} is stored as a folder (with {META_FILE}), not as a .npz file")
    return cls._from_arrays(arrays, source=str(path))


def read_meta(folder: Path) -> dict:
    """A folder's ``image_tokenizer.json``, checked for format and version."""
    mpath = folder / META_FILE
    try:
        meta = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT or "kind" not in meta:
        raise ValueError(f"{mpath}: not an image tokenizer description (expected format {FOLDER_FORMAT!r} and a kind)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{mpath}: image tokenizer format version {meta.get('format_version')}, this megannm reads "
                         f"{FORMAT_VERSION}")
    if "resize" in meta:
        check_policy(meta["resize"], f"{mpath}: resize")
    return meta


# transformers' model_type -> megannm kind, for folders without image_tokenizer.json
MODEL_TYPES = {"janus_vqgan": "janus", "janus": "janus", "emu3_vqgan": "emu3", "emu3": "emu3",
               "chameleon_vqgan": "chameleon", "chameleon": "chameleon"}


def read_hf_config(folder: Path) -> dict:
    """The ``config.json`` transformers wrote into ``folder``, or one line saying why not."""
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an image tokenizer folder (no {META_FILE} and no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def infer_kind(folder: Path) -> str:
    """The kind of a folder transformers wrote, from its config.json's model_type."""
    mt = read_hf_config(folder).get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"{folder / 'config.json'}: model_type {mt!r} is not an image tokenizer (expected an Emu3, "
                         f"Janus or Chameleon VQ model: {', '.join(sorted(MODEL_TYPES))})")
    return MODEL_TYPES[mt]


def _load_folder(folder: Path) -> ImageTokenizer:
    if (folder / META_FILE).is_file():
        meta = read_meta(folder)
    else:  # a folder straight from transformers' save_pretrained (or a whole downloaded model)
        meta = {"kind": infer_kind(folder)}
    check_saved_kind(str(meta["kind"]), str(folder / META_FILE))
    cls = kind_class(str(meta["kind"]), str(folder / META_FILE))
    if cls.storage != "folder":
        raise ValueError(f"{folder}: kind {meta['kind']!r} is stored as a .npz file, not as a folder")
    return cls.load(folder, meta)


__all__ = ["ImageTokenizer", "register", "load_image_tokenizer", "kind_class", "known_kinds", "read_meta",
           "BUILTIN_KINDS", "ENTRY_POINT_GROUP", "META_FILE", "PAD_COLOR"]
