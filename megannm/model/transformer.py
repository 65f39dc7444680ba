"""The whole model as a chain of stage-able modules: EmbeddingStage -> N x Block -> HeadStage, plus the loss.

Each stage takes and returns a tuple of tensors ``(hidden [B,S,D], modality [B,S], position_ids [B,S],
document_ids [B,S])`` (the head returns vocab-parallel logits), so the pipeline wraps these same classes as
DeepSpeed ``LayerSpec``s and ``NMMModel`` is only their composition for runs without a pipeline.

State-dict names (canonical; ``m`` = weight set: 0 text, 1 image under MoT; only 0 for the dense twin)::

    embedding.embed_tokens.weight              [V_pad, D]          Llama: model.embed_tokens.weight
    layers.{i}.attn.norm.{m}.weight            [D]                 input_layernorm (output norm if norm_reorder)
    layers.{i}.attn.{q,k,v}_proj.{m}.weight    [H*hd | Hkv*hd, D]  self_attn.{q,k,v}_proj (separate, not fused)
    layers.{i}.attn.{q,k}_norm.{m}.weight      [hd]                (qk_norm) over head_dim before RoPE, as Qwen3
    layers.{i}.attn.o_proj.{m}.weight          [D, H*hd]           self_attn.o_proj
    layers.{i}.ffn.norm.{m}.weight             [D]                 post_attention_layernorm
    layers.{i}.ffn.{gate,up,down}_proj.{m}.weight                  mlp.{gate,up,down}_proj
    head.norm.{m}.weight                       [D]                 model.norm
    head.output.weight                         [V_pad, D]          lm_head.weight (untied)

Tensor-parallel shards are all contiguous (no fused or strided weights): embedding, head, q/k/v and gate/up are
split along dim 0 (rank r holds rows [r*n/tp, (r+1)*n/tp): whole heads, in Hugging Face head order); o_proj and
down_proj along dim 1; norms are replicated. Rows >= vocab_size of the embedding and head are TP padding: zero at
init and never part of a softmax. RoPE is Hugging Face Llama's ``rotate_half`` form.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megannm import parallel
from megannm.model import flops
from megannm.model.attention import KVCache
from megannm.model.embedding import EmbeddingStage, modality_of_ids
from megannm.model.mot import Block, PerModality, RMSNorm, column, prepare, route
from megannm.vocab import MODALITY_NAMES

__all__ = ["ModelArgs", "EmbeddingStage", "Block", "HeadStage", "lm_loss", "NMMModel", "KVCache"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _megatron_config(tp: int, pp: int, dtype: str):
    from megatron.core import ModelParallelConfig
    d = _DTYPES[dtype]
    # use_cpu_initialization: every rank draws the FULL master weight from the torch RNG and keeps its slice, so
    # seeding all ranks alike gives every TP size the same effective weights (../shared/FACTS.md).
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
                   params_dtype={"fp32": "float32", "bf16": "bfloat16"}.get(params_dtype, params_dtype))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss_weights"] = list(self.loss_weights)  # JSON-native, so a reloaded dict compares equal
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
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
    def n_sets(self) -> int:
        """Weight sets per block: one per modality under MoT, one for the dense twin."""
        return self.n_modalities if self.mot else 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.params_dtype]

    def megatron_config(self):
        """megatron-core's ``ModelParallelConfig`` for the current parallel state (not a process group)."""
        if not ps.model_parallel_is_initialized():
            raise RuntimeError("model: megatron-core parallel state is not initialised: call "
                               "megannm.parallel.init_parallel(tp, pp) before building the model")
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
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


class HeadStage(nn.Module):
    """Final norm (per modality under MoT) and the untied output layer: vocab-parallel logits [B, S, V_pad/tp]."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.norm = PerModality(args.n_sets, lambda: RMSNorm(args.hidden, args.eps, args.torch_dtype))
        self.output = column(args, args.hidden, args.padded_vocab_size, init=args.vocab_init_method())

    def forward(self, x: tuple, routing=None) -> torch.Tensor:
        h, modality = x[0], x[1]
        routing = routing if routing is not None else route(modality, self.args.n_sets)
        b, s, d = h.shape
        return self.from_sorted(routing.sort(h.reshape(b * s, d)), routing, (b, s))

    def from_sorted(self, hs: torch.Tensor, routing, shape: tuple[int, int]) -> torch.Tensor:
        """Per-modality norm on the modality-grouped stream, back to sequence order, then the shared output layer."""
        h = routing.unsort(routing.join(self.norm(routing.parts(hs))))
        return self.output(h.view(*shape, -1))


# ---------------------------------------------------------------------------------------------------------------------
# the loss


def _tp_vocab_offset(local_vocab: int) -> int:
    return ps.get_tensor_model_parallel_rank() * local_vocab


def _vocab_parallel_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """log sum_v exp(logits) over the vocabulary split across TP ranks: all-reduce MAX of the shift, SUM of the
    exponentials. The shift is detached (it cancels mathematically); the sum goes through megatron-core's
    reduce-from-TP-region (all-reduce forward, identity backward: each rank owns the gradient of its own slice)."""
    shift = logits.max(dim=-1).values.detach()
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=parallel.tensor_group())
    total = reduce_from_tensor_model_parallel_region(torch.exp(logits - shift[..., None]).sum(-1),
                                                     group=parallel.tensor_group())
    return total.log() + shift


def lm_loss(logits_parallel: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
            args: ModelArgs):
    """Next-token loss of one micro-batch from vocab-parallel logits [B, S, V_pad/tp]; ``labels`` are the target ids
    (already shifted), ``loss_mask`` 1 where a target counts (None = everywhere).

        loss = sum_t w[modality(label_t)] * CE_t * mask_t / sum_t mask_t  +  z_loss * sum_t lse_t^2 mask_t / sum_t mask_t

    i.e. the per-modality weight (by the modality of the TARGET token) scales each token's term, and the divisor is
    the micro-batch's count of loss tokens whatever the weights: a weight scales its modality's gradient linearly and
    a weight of 0 removes it without scaling the other modality up. lse is the log partition over the real
    vocabulary; the z-loss is not modality-weighted.

    Returns (loss, stats) with stats = text_loss, image_loss (unweighted mean CE over that modality's targets),
    text_tokens, image_tokens (counts) and z_loss (the added term), all detached 0-d tensors.
    """
    v_local = logits_parallel.shape[-1]
    offset = _tp_vocab_offset(v_local)
    logits = logits_parallel.float()
    if offset + v_local > args.vocab_size:
        # TP padding rows out of the softmax, so a different padding (another TP size) gives the same loss.
        vocab_ids = torch.arange(v_local, device=logits_parallel.device) + offset
        logits = logits.masked_fill(vocab_ids >= args.vocab_size, torch.finfo(torch.float32).min)
    elif logits is logits_parallel:
        logits = logits.clone()  # megatron-core's cross entropy works in place; keep the caller's logits intact
    if loss_mask is None:
        loss_mask = torch.ones_like(labels)
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    # the log partition first: megatron-core's vocab_parallel_cross_entropy overwrites its input in place
    lse = _vocab_parallel_logsumexp(logits) if args.z_loss > 0 else None
    ce = vocab_parallel_cross_entropy(logits, labels)
    modality = modality_of_ids(labels, args)
    weight = torch.tensor(args.loss_weights, dtype=ce.dtype, device=ce.device)[modality]
    loss = (weight * ce * mask).sum() / count
    stats = {}
    for m, name in enumerate(MODALITY_NAMES):
        sel = mask * (modality == m)
        tokens = sel.sum()
        stats[f"{name}_loss"] = ((ce * sel).sum() / tokens.clamp(min=1.0)).detach()
        stats[f"{name}_tokens"] = tokens.detach()
    z = torch.zeros((), device=loss.device)
    if lse is not None:
        z = args.z_loss * (lse.pow(2) * mask).sum() / count
        loss = loss + z
    stats["z_loss"] = z.detach()
    return loss, stats


# ---------------------------------------------------------------------------------------------------------------------
# the model


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension over the TP group; the backward keeps this rank's slice. (megatron-core's
    gather_from_tensor_model_parallel_region allocates its buffer on ``torch.cuda.current_device()``, so it cannot
    run on the CPU.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        mine = grad.chunk(dist.get_world_size(ctx.group), dim=-1)[dist.get_rank(ctx.group)]
        return mine.contiguous(), None


def gather_vocab(logits_parallel: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits [..., V_pad/tp] -> full [..., V_pad] on every TP rank (differentiable)."""
    if ps.get_tensor_model_parallel_world_size() == 1:
        return logits_parallel
    return _GatherLastDim.apply(logits_parallel, parallel.tensor_group())


def draw_init_seed() -> int:
    """The base of the per-layer init seeds, drawn from the torch RNG: ``torch.manual_seed(s)`` before building fixes
    every layer's weights, whoever builds them (``NMMModel``, or a pipeline stage that builds only its own layers)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


@contextlib.contextmanager
def seeded(seed: int):
    """Run under ``torch.manual_seed(seed)`` and give the caller's RNG stream back untouched afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class NMMModel(nn.Module):
    """EmbeddingStage -> N x Block -> HeadStage. Chain position c (0 embedding, 1 + i block i, N + 1 head) is built
    under the seed ``seed + c``, so a pipeline stage that builds only positions [a, b) gets the same weights
    (``megannm.model.pipeline``); ``seed`` None draws it from the torch RNG (``draw_init_seed``)."""

    def __init__(self, args: ModelArgs, seed: Optional[int] = None):
        super().__init__()
        self.args = args
        seed = draw_init_seed() if seed is None else seed
        with seeded(seed):
            self.embedding = EmbeddingStage(args)
        self.layers = nn.ModuleList()
        for i in range(args.layers):
            with seeded(seed + 1 + i):
                self.layers.append(Block(args, i))
        with seeded(seed + args.layers + 1):
            self.head = HeadStage(args)

    def forward(self, input_ids, position_ids=None, document_ids=None, labels=None, loss_mask=None,
                cache: Optional[KVCache] = None):
        """Logits [B, S, vocab_size] (gathered over TP, real vocabulary only) when ``labels`` is None, else
        ``lm_loss``'s (loss, stats). With ``cache`` the ids are a continuation: keys/values are appended and the
        chunk attends to everything cached; position ids then default to continuing from the cache length."""
        if cache is not None and position_ids is None:
            b, s = input_ids.shape
            position_ids = torch.arange(cache.length, cache.length + s, device=input_ids.device).repeat(b, 1)
        x = self.embedding(input_ids, position_ids, document_ids)
        ctx = prepare(self.args, *x[1:], cache=cache)  # routing, mask, RoPE: once per micro-batch
        b, s, d = x[0].shape
        hs = ctx.routing.sort(x[0].reshape(b * s, d))  # grouped by modality until the head
        for i, block in enumerate(self.layers):
            hs = block.run_sorted(hs, ctx, (b, s), cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        logits = self.head.from_sorted(hs, ctx.routing, (b, s))
        if labels is None:
            return gather_vocab(logits)[..., :self.args.vocab_size]
        return lm_loss(logits, labels, loss_mask, self.args)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.args.max_seq_len:
            raise ValueError(f"KV cache: max_len {max_len} exceeds the model's max_seq_len={self.args.max_seq_len}")
        p = next(self.parameters())
        tp = ps.get_tensor_model_parallel_world_size()
        return KVCache(self.args.layers, batch, self.args.kv_heads // tp, max_len, self.args.head_dim, p.dtype,
                       p.device)

    # counts -------------------------------------------------------------------------------------------------------
    @staticmethod
    def flops_per_token_of(args: ModelArgs, seq_len: int) -> float:
        return flops.flops_per_token(args, seq_len)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward); see ``megannm.model.flops``."""
        return flops.flops_per_token(self.args, seq_len)

    def num_params(self, active_only: bool = False, embeddings: bool = True) -> int:
        """Whole-model parameters (all TP ranks, padding rows excluded); see ``megannm.model.flops.num_params``."""
        return flops.num_params(self.args, active_only=active_only, embeddings=embeddings)
