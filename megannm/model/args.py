"""The model's shape: ``ModelArgs`` (from a recipe's ``model:`` section, the vocabulary and the TP size), stored in
checkpoints and exports, and ``STRUCTURAL``, the one list of the fields that must agree for weights to move from one
model into another (checkpoints, ``init_from`` and conversion all use it)."""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from megannm.model.block import BlockShape
from megannm.vocab import MODALITY_NAMES

# ModelArgs fields that decide which parameters exist and what they mean: they must agree when weights move into a
# model built from a recipe. Training settings (z_loss, loss_weights, init_std, max_seq_len, rope_theta, dtype,
# compile) and the TP-dependent vocabulary padding may change from one stage to the next.
STRUCTURAL = ("hidden", "layers", "heads", "kv_heads", "ffn", "vocab_size", "image_start", "image_end", "mot",
              "n_modalities", "qk_norm", "norm_reorder", "eps", "latent_channels")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def dtype_name(precision: str) -> str:
    """A recipe's ``precision`` (fp32 | bf16 | fp16) or a torch dtype name -> the torch dtype name ModelArgs keeps."""
    if precision not in _DTYPES:
        raise ValueError(f"precision: unknown dtype {precision!r} (expected fp32, bf16 or fp16)")
    return str(_DTYPES[precision]).removeprefix("torch.")


@functools.lru_cache(maxsize=None)
def _megatron_config(tp: int, pp: int, dtype: str):
    from megatron.core import ModelParallelConfig
    d = _DTYPES[dtype]
    # use_cpu_initialization: every rank draws the FULL master weight from the torch RNG and keeps its slice, so
    # seeding all ranks alike gives every TP size the same effective weights .
    return ModelParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               use_cpu_initialization=True, params_dtype=d,
                               pipeline_dtype=d if pp > 1 else None)


@dataclass(frozen=True)
class ModelArgs:
    """Everything that shapes the model: from the recipe's ``model:`` section plus the vocabulary and TP size.
    Stored in checkpoints (``to_dict``) and compared on load."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab_size: int  # real ids (Vocab.size)
    padded_vocab_size: int  # Vocab.padded_size(tp): divides by tp * 128, so each vocab shard is equal
    image_start: int
    image_end: int
    mot: bool = True
    n_modalities: int = 2
    qk_norm: bool = True
    z_loss: float = 0.0
    norm_reorder: bool = False
    rope_theta: float = 10000.0
    eps: float = 1e-5
    init_std: float = 0.02
    max_seq_len: int = 512
    loss_weights: tuple = (1.0, 1.0)  # per modality, in MODALITY_NAMES order (text, image)
    params_dtype: str = "float32"
    compile: bool = False  # each block compiled by torch.compile (``layers.compile_blocks``)
    # continuous images (``megannm.model.latents``): numbers per latent slot (a patch of an autoencoder's latent);
    # 0: images are discrete codes. The image loss (weighted by loss_weights' image entry) is then the flow loss.
    latent_channels: int = 0

    @classmethod
    def from_config(cls, model_cfg, vocab, tp: int = 1, params_dtype: str = "float32") -> "ModelArgs":
        unknown = set(model_cfg.loss_weights) - set(MODALITY_NAMES)
        if unknown:
            raise ValueError(f"model.loss_weights: unknown modality {sorted(unknown)[0]!r} (expected "
                             f"{', '.join(MODALITY_NAMES)})")
        m = model_cfg
        return cls(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads,
                   kv_heads=m.num_kv_heads or m.num_heads, ffn=m.ffn_hidden_size, vocab_size=vocab.size,
                   padded_vocab_size=vocab.padded_size(tp), image_start=vocab.image_start,
                   image_end=vocab.image_end, mot=m.mot, n_modalities=len(MODALITY_NAMES), qk_norm=m.qk_norm,
                   z_loss=m.z_loss, norm_reorder=m.norm_reorder, rope_theta=m.rope_theta, eps=m.norm_eps,
                   init_std=m.init_std, max_seq_len=m.max_seq_len,
                   loss_weights=tuple(float(m.loss_weights.get(n, 1.0)) for n in MODALITY_NAMES),
                   params_dtype=dtype_name(params_dtype), compile=m.compile,
                   latent_channels=getattr(vocab, "latent_channels", 0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)  # JSON-native, so a reloaded dict compares equal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        # a training setting of earlier versions (hand-written element-wise kernels), replaced by ``compile``:
        # consolidated folders written then still load
        d = {k: v for k, v in d.items() if k != "compile_elementwise"}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"model_args: unknown key {sorted(unknown)[0]!r} (expected {', '.join(sorted(known))})")
        d = dict(d)
        if "loss_weights" in d:
            d["loss_weights"] = tuple(float(x) for x in d["loss_weights"])
        return cls(**d)

    # derived ------------------------------------------------------------------------------------------------------
    @property
    def continuous(self) -> bool:
        """Images are latent slots with a flow objective (``latent_channels > 0``), not discrete codes."""
        return self.latent_channels > 0

    @property
    def n_sets(self) -> int:
        """Weight sets per block: one per modality under MoT, one for the dense twin."""
        return self.n_modalities if self.mot else 1

    @property
    def block_shape(self) -> BlockShape:
        return BlockShape(hidden=self.hidden, heads=self.heads, kv_heads=self.kv_heads, ffn=self.ffn,
                          n_sets=self.n_sets, qk_norm=self.qk_norm, norm_reorder=self.norm_reorder, eps=self.eps)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def megatron_config(self, tp: int, pp: int):
        """megatron-core's ``ModelParallelConfig`` for a model split over ``tp`` x ``pp`` ranks (sizes only: the
        process groups themselves are handed to each layer)."""
        for name, n in (("heads", self.heads), ("kv_heads", self.kv_heads), ("ffn", self.ffn),
                        ("padded_vocab_size", self.padded_vocab_size)):
            if n % tp:
                raise ValueError(f"model: {name} must divide by the tensor-parallel size (got {name}={n}, "
                                 f"tensor_parallel={tp})")
        return _megatron_config(tp, pp, self.params_dtype)

    def init_method(self):
        return functools.partial(nn.init.normal_, mean=0.0, std=self.init_std)

    def output_init_method(self):
        return functools.partial(nn.init.normal_, mean=0.0, std=self.init_std / math.sqrt(2.0 * self.layers))

    def vocab_init_method(self):
        """normal(0, std) for the real rows and zero for the padding rows of a [V_pad, D] master weight. The draw
        covers exactly ``vocab_size`` rows, so the RNG stream (and every later layer's weights) is the same whatever
        the padding, i.e. whatever the TP size."""
        def init(w: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                w.zero_()
                w[:self.vocab_size].normal_(0.0, self.init_std)
            return w
        return init


