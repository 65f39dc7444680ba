"""The whole model as a chain of stage-able modules: EmbeddingStage -> N x Block -> HeadStage, plus the loss.

Each stage takes and returns a tuple of tensors ``(hidden [B,S,D], modality [B,S], position_ids [B,S],
document_ids [B,S])`` (the head returns vocab-parallel logits), so the pipeline wraps these same classes as
DeepSpeed ``LayerSpec``s and ``NMMModel`` is only their composition for runs without a pipeline.

Canonical names (consolidated folders, resharding, the Hugging Face export; ``m`` = weight set: 0 text, 1 image
under MoT; only 0 for the dense twin)::

    embedding.embed_tokens.weight              [V_pad, D]          Llama: model.embed_tokens.weight
    layers.{i}.attn.norm.{m}.weight            [D]                 input_layernorm (output norm if norm_reorder)
    layers.{i}.attn.{q,k,v}_proj.{m}.weight    [H*hd | Hkv*hd, D]  self_attn.{q,k,v}_proj
    layers.{i}.attn.{q,k}_norm.{m}.weight      [hd]                (qk_norm) over head_dim before RoPE, as Qwen3
    layers.{i}.attn.o_proj.{m}.weight          [D, H*hd]           self_attn.o_proj
    layers.{i}.ffn.norm.{m}.weight             [D]                 post_attention_layernorm
    layers.{i}.ffn.{gate,up,down}_proj.{m}.weight                  mlp.{gate,up,down}_proj
    head.norm.{m}.weight                       [D]                 model.norm
    head.output.weight                         [V_pad, D]          lm_head.weight (untied)

The module itself computes q, k, v in ONE GEMM and gate, up in one more: its state dict has
``layers.{i}.attn.qkv_proj.{m}.weight`` and ``layers.{i}.ffn.gate_up_proj.{m}.weight`` in their place, each stacking
this rank's rows of its parts (``megannm.model.fused``: the one adapter between the two namings, applied wherever
a rank's weights become canonical names and back). Every other name is the same in both.

Tensor-parallel shards of the canonical tensors are all contiguous (no strided weights): embedding, head, q/k/v
and gate/up are split along dim 0 (rank r holds rows [r*n/tp, (r+1)*n/tp): whole heads, in Hugging Face head
order); o_proj and down_proj along dim 1; norms are replicated. Rows >= vocab_size of the embedding and head are TP
padding: zero at init and never part of a softmax. RoPE is Hugging Face Llama's ``rotate_half`` form.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from megannm import parallel
from megannm.model import flops, vocab_parallel
from megannm.model.args import ModelArgs
from megannm.model.attention import KVCache
from megannm.model.embedding import EmbeddingStage, modality_of_ids
from megannm.model.mot import Block, PerModality, RMSNorm, attached_context, column, prepare, route
from megannm.parallel import Layout
from megannm.vocab import MODALITY_NAMES

__all__ = ["ModelArgs", "EmbeddingStage", "Block", "HeadStage", "lm_loss", "NMMModel", "KVCache"]

class HeadStage(nn.Module):
    """Final norm (per modality under MoT) and the untied output layer: vocab-parallel logits [B, S, V_pad/tp]."""

    def __init__(self, args: ModelArgs, layout: Layout):
        super().__init__()
        self.args = args
        self.norm = PerModality(args.n_sets, lambda: RMSNorm(args.hidden, args.eps, args.torch_dtype,
                                                             compiled=args.compile_elementwise))
        self.output = column(args, layout, args.hidden, args.padded_vocab_size, init=args.vocab_init_method())

    def forward(self, x: tuple, routing=None) -> torch.Tensor:
        h, modality = x[0], x[1]
        if routing is None:  # the stage's blocks' routing when they ran on these tensors (mot.stage_context)
            ctx = attached_context(self.args, *x[1:4]) if len(x) >= 4 else None
            routing = ctx.routing if ctx is not None else route(modality, self.args.n_sets)
        b, s, d = h.shape
        return self.from_split(routing.split(h.reshape(b * s, d)), routing, (b, s))

    def from_split(self, parts: list[torch.Tensor], routing, shape: tuple[int, int]) -> torch.Tensor:
        """Per-modality norm on the stream split by modality, back to sequence order, then the shared output layer."""
        h = routing.merge(self.norm(parts))
        return self.output(h.view(*shape, -1))


# ---------------------------------------------------------------------------------------------------------------------
# the loss


def lm_loss(logits_parallel: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
            args: ModelArgs, layout: Layout):
    """Next-token loss of one micro-batch from vocab-parallel logits [B, S, V_pad/tp]; ``labels`` are the target ids
    (already shifted), ``loss_mask`` 1 where a target counts (None = everywhere). ``logits_parallel`` is consumed:
    fp32 logits are overwritten by the cross entropy.

        loss = sum_t w[modality(label_t)] * CE_t * mask_t / sum_t mask_t  +  z_loss * sum_t lse_t^2 mask_t / sum_t mask_t

    i.e. the per-modality weight (by the modality of the TARGET token) scales each token's term, and the divisor is
    the micro-batch's count of loss tokens whatever the weights: a weight scales its modality's gradient linearly and
    a weight of 0 removes it without scaling the other modality up. lse is the log partition over the real
    vocabulary; the z-loss is not modality-weighted.

    Returns (loss, stats) with stats = text_loss, image_loss (unweighted mean CE over that modality's targets),
    text_tokens, image_tokens (counts) and z_loss (the added term), all detached 0-d tensors.
    """
    # the head's output serves the loss only: used in place (``consume``) rather than copied
    logits = vocab_parallel.mask_padding(logits_parallel, args.vocab_size, layout.tp_rank, consume=True)
    if loss_mask is None:
        loss_mask = torch.ones_like(labels)
    mask = loss_mask.float()
    count = mask.sum().clamp(min=1.0)
    # one pass set for the cross entropy and the log partition (the z-loss's), which consumes the logits
    ce, lse = vocab_parallel.cross_entropy(logits, labels, layout)
    lse = lse if args.z_loss > 0 else None
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
    (``megannm.model.pipeline``); ``seed`` None draws it from the torch RNG (``draw_init_seed``).

    ``layout`` carries the tensor-parallel group every layer splits over. ``checkpoint_activations`` recomputes each
    block in the backward instead of keeping its activations (``torch.utils.checkpoint``, non-reentrant): the same
    losses and gradients for one block's activations of memory instead of all of them."""

    def __init__(self, args: ModelArgs, layout: Layout, seed: Optional[int] = None,
                 checkpoint_activations: bool = False):
        super().__init__()
        self.args, self.layout = args, layout
        self.checkpoint_activations = checkpoint_activations
        seed = draw_init_seed() if seed is None else seed
        with seeded(seed):
            self.embedding = EmbeddingStage(args, layout)
        self.layers = nn.ModuleList()
        for i in range(args.layers):
            with seeded(seed + 1 + i):
                self.layers.append(Block(args, layout, i))
        with seeded(seed + args.layers + 1):
            self.head = HeadStage(args, layout)

    def forward(self, input_ids, position_ids=None, document_ids=None, labels=None, loss_mask=None,
                cache: Optional[KVCache] = None, parallel_logits: bool = False):
        """Logits [B, S, vocab_size] (gathered over TP, real vocabulary only) when ``labels`` is None, else
        ``lm_loss``'s (loss, stats); ``parallel_logits`` returns the head's vocab-parallel logits [B, S, V_pad/tp]
        instead (what ``megannm.model.vocab_parallel`` takes). With ``cache`` the ids are a continuation:
        keys/values are appended and the chunk attends to everything cached; position ids then default to
        continuing from the cache length."""
        if cache is not None and position_ids is None:
            b, s = input_ids.shape
            position_ids = torch.arange(cache.length, cache.length + s, device=input_ids.device).repeat(b, 1)
        x = self.embedding(input_ids, position_ids, document_ids)
        ctx = prepare(self.args, *x[1:], cache=cache)  # routing, mask, RoPE: once per micro-batch
        b, s, d = x[0].shape
        parts = ctx.routing.split(x[0].reshape(b * s, d))  # split by modality until the head
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.layers):
            if recompute:
                parts = checkpoint(block.run_split, parts, ctx, (b, s), use_reentrant=False)
            else:
                parts = block.run_split(parts, ctx, (b, s), cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        logits = self.head.from_split(parts, ctx.routing, (b, s))
        if parallel_logits:
            return logits
        if labels is None:
            return parallel.gather_last_dim(logits, self.layout.tp_group)[..., :self.args.vocab_size]
        return lm_loss(logits, labels, loss_mask, self.args, self.layout)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.args.max_seq_len:
            raise ValueError(f"KV cache: max_len {max_len} exceeds the model's max_seq_len={self.args.max_seq_len}")
        p = next(self.parameters())
        return KVCache(self.args.layers, batch, self.args.kv_heads // self.layout.tp, max_len, self.args.head_dim, p.dtype,
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
