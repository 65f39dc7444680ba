"""What the transformers-backed kinds (``janus``, ``emu3``, ``chameleon``, ``learned``) share: loading a VQ model
offline from a local folder, the model's own pixel normalisation, batched encode/decode on the model's device.

A folder may be what ``save_pretrained`` wrote for the VQ model alone (``config.json`` with model_type
``janus_vqgan`` / ``emu3_vqgan`` / ``chameleon_vqgan``) or a whole downloaded model (``JanusForConditionalGeneration``
and the like: a ``config.json`` with a ``vq_config``, weights under ``...vqmodel.``): then only the VQ model's
weights are read. A ``preprocessor_config.json`` beside them gives the normalisation (``rescale_factor``,
``image_mean``, ``image_std``), as the model's image processor applies it; without one, pixels map to [-1, 1], the
range these VQ decoders are trained on. Resizing follows megannm's own policy (``images.py``) to the model's native
resolution, because a sequence model needs the same number of tokens for every image.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from megannm.data.image_tokenizer.base import META_FILE, ImageTokenizer, read_hf_config
from megannm.data.image_tokenizer.images import check_policy
from megannm.fileio import atomic_output, atomic_write_json

def quiet_transformers():
    """transformers' loading chatter (unused weights of a whole model, per-file progress bars) says nothing a user
    of a tokenizer can act on."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


class HFVQ(ImageTokenizer):
    """A transformers VQ model behind the ``ImageTokenizer`` interface. Subclasses name the classes and say how
    their model encodes and decodes a batch of normalised pixels."""

    storage = "folder"
    vq_model_type = ""  # e.g. "janus_vqgan"
    full_model_type = ""  # e.g. "janus": a whole model whose config.json holds a vq_config of the type above
    pixels_default = {"rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

    def __init__(self, model, image_size=None, resize: str = "crop", pixels: dict | None = None,
                 batch_size: int | None = None, where: str = ""):
        import torch

        self.model = model.eval()
        self.where = where or type(self).__name__
        cfg = model.config
        self.factor = 2 ** (len(cfg.channel_multiplier) - 1)  # spatial downsampling of the encoder
        self.image_size = self._native_size(image_size)
        h, w = self.image_size
        if h % self.factor or w % self.factor:
            raise ValueError(f"{self.where}: image size {h}x{w} is not a multiple of the model's downsampling "
                             f"factor {self.factor}")
        self.grid = (h // self.factor, w // self.factor)
        self.codebook_size = int(self._codebook_size())
        self.resize = check_policy(resize, f"{self.where}: resize")
        p = {**self.pixels_default, **(pixels or {})}
        self.pixels = {"rescale_factor": float(p["rescale_factor"]), "image_mean": [float(v) for v in p["image_mean"]],
                       "image_std": [float(v) for v in p["image_std"]]}
        self.batch_size = int(batch_size or max(1, min(256, (1 << 21) // (h * w))))
        self.device = torch.device("cpu")

    # what a subclass says -------------------------------------------------------------------------------------------
    @classmethod
    def _classes(cls):
        """(model class, config class) from transformers."""
        raise NotImplementedError

    def _codebook_size(self) -> int:
        return self.model.config.num_embeddings

    def _native_size(self, image_size) -> tuple[int, int]:
        raise NotImplementedError

    def _encode_pixels(self, x):
        """float [n, 3, H, W] (normalised) -> long [n, num_tokens]."""
        raise NotImplementedError

    def _decode_codes(self, codes):
        """long [n, num_tokens] -> float [n, 3, H, W] (normalised)."""
        raise NotImplementedError

    # pixels ---------------------------------------------------------------------------------------------------------
    def _stats(self, like):
        import torch
        mean = torch.tensor(self.pixels["image_mean"], dtype=torch.float32, device=like.device).view(1, 3, 1, 1)
        std = torch.tensor(self.pixels["image_std"], dtype=torch.float32, device=like.device).view(1, 3, 1, 1)
        return mean, std

    def to_pixels(self, images: np.ndarray):
        """uint8 [n, H, W, 3] -> the model's input: float [n, 3, H, W] on its device, normalised as its processor
        does."""
        import torch
        x = torch.from_numpy(np.require(images, requirements=["C", "W"])).to(self.device)  # writable: torch asks
        x = x.permute(0, 3, 1, 2).float()
        mean, std = self._stats(x)
        return (x * self.pixels["rescale_factor"] - mean) / std

    def from_pixels(self, x) -> np.ndarray:
        """The model's output float [n, 3, H, W] -> uint8 [n, H, W, 3] (the processor's postprocess)."""
        import torch
        mean, std = self._stats(x)
        x = (x.float() * std + mean) / self.pixels["rescale_factor"]
        return x.round().clamp(0, 255).to("cpu", dtype=torch.uint8).permute(0, 2, 3, 1).numpy()

    # the interface --------------------------------------------------------------------------------------------------
    def to(self, device) -> "HFVQ":
        import torch
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def encode(self, images: np.ndarray) -> np.ndarray:
        import torch
        images = self._check_images(images)
        out = [np.empty((0, self.num_tokens), np.int64)]
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                codes = self._encode_pixels(self.to_pixels(images[s:s + self.batch_size]))
                out.append(codes.reshape(codes.shape[0], -1).to("cpu", torch.int64).numpy())
        return np.concatenate(out)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import torch
        codes = self._check_codes(codes)
        h, w = self.image_size
        out = [np.empty((0, h, w, 3), np.uint8)]
        with torch.inference_mode():
            for s in range(0, len(codes), self.batch_size):
                c = torch.as_tensor(np.asarray(codes[s:s + self.batch_size], np.int64), device=self.device)
                out.append(self.from_pixels(self._decode_codes(c)))
        return np.concatenate(out)

    def describe(self) -> dict:
        n = sum(p.numel() for p in self.model.parameters())
        return {**super().describe(), "parameters": int(n), "model_type": self.vq_model_type}

    # saving and loading ---------------------------------------------------------------------------------------------
    def extra_meta(self) -> dict:
        """Kind-specific entries of image_tokenizer.json."""
        return {}

    def save(self, folder, overwrite: bool = True) -> Path:
        """``folder/``: the VQ model as transformers saves it (config.json, model.safetensors) and
        ``image_tokenizer.json``; written beside and renamed into place."""
        folder = Path(folder)
        with atomic_output(folder, overwrite=overwrite) as tmp:
            self.model.save_pretrained(tmp)
            atomic_write_json(tmp / META_FILE, self.meta(pixels=self.pixels, **self.extra_meta()))
        return folder

    @classmethod
    def load(cls, folder: Path, meta: dict) -> "HFVQ":
        size = meta.get("image_size")
        return cls.from_pretrained(folder, image_size=tuple(size) if size else None,
                                   resize=meta.get("resize", "crop"), pixels=meta.get("pixels"))

    @classmethod
    def from_pretrained(cls, folder, image_size=None, resize: str = "crop", pixels: dict | None = None) -> "HFVQ":
        """Load offline from a local folder (the VQ model alone, or a whole model holding one)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: image tokenizer folder not found")
        cfg = read_hf_config(folder)
        mt = cfg.get("model_type")
        quiet_transformers()
        try:
            model_cls, config_cls = cls._classes()
        except ImportError as e:  # Janus's VQ arrived in transformers 4.51, Emu3's in 4.47
            import transformers
            raise ValueError(f"{folder}: the {cls.kind} tokenizer needs a newer transformers than "
                             f"{transformers.__version__} ({e})") from None
        if mt == cls.vq_model_type:
            try:
                model = model_cls.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError, RuntimeError) as e:
                raise ValueError(f"{folder}: cannot load the {cls.kind} VQ model ({type(e).__name__}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        elif mt == cls.full_model_type and isinstance(cfg.get("vq_config"), dict):
            model = _vq_from_whole_model(folder, cfg["vq_config"], model_cls, config_cls)
        else:
            expected = f"{cls.vq_model_type!r} (or a {cls.full_model_type!r} model with a vq_config)"
            raise ValueError(f"{folder / 'config.json'}: model_type {mt!r} is not a {cls.kind} image tokenizer "
                             f"(expected {expected})")
        if pixels is None:
            pixels = _processor_pixels(folder)
        return cls(model, image_size=image_size, resize=resize, pixels=pixels, where=str(folder),
                   **cls._processor_options(folder))

    @classmethod
    def _processor_options(cls, folder: Path) -> dict:
        return {}


def _processor_pixels(folder: Path) -> dict | None:
    """rescale_factor / image_mean / image_std of a preprocessor_config.json, as its image processor applies them."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        p = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    out = {}
    if p.get("do_rescale", True) and "rescale_factor" in p:
        out["rescale_factor"] = p["rescale_factor"]
    if p.get("do_normalize", True) and "image_mean" in p and "image_std" in p:
        as3 = lambda v: [float(v)] * 3 if np.isscalar(v) else [float(x) for x in v]
        out["image_mean"], out["image_std"] = as3(p["image_mean"]), as3(p["image_std"])
    if p.get("do_normalize", True) is False:
        out["image_mean"], out["image_std"] = [0.0] * 3, [1.0] * 3
    return out or None


def _vq_from_whole_model(folder: Path, vq_config: dict, model_cls, config_cls):
    """Only the VQ model out of a whole model's safetensors (the tensors named ``...vqmodel.<name>``)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({f for k, f in weight_map.items() if "vqmodel." in k})
    else:
        files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights holding a vqmodel (model.safetensors or "
                                f"model.safetensors.index.json)")
    state = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for k in f.keys():
                if "vqmodel." in k:
                    state[k.split("vqmodel.", 1)[1]] = f.get_tensor(k)
    model = model_cls(config_cls.from_dict(vq_config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        what = f"missing {len(missing)} (first {missing[0]})" if missing else f"unexpected {len(unexpected)} " \
                                                                              f"(first {unexpected[0]})"
        raise ValueError(f"{folder}: the vqmodel weights do not match its vq_config: {what}")
    return model.eval()
