"""The whole model as a chain: EmbeddingStage -> N x Block -> HeadStage, plus the loss.

``run_chain`` runs any contiguous part of the chain, the whole of it (``NMMModel``) or one pipeline stage's part
(``megannm.model.pipeline``). Between pipeline stages the carried activations are the tensors ``(hidden [B,S,D] in
sequence order, modality [B,S], position_ids [B,S], document_ids [B,S])``; at the start of its part of the chain a
stage builds the micro-batch's ``block.Context`` (routing, RoPE tables, attention mask) from them once and passes it
to each of its blocks and the head as an argument.

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

and with continuous images (``latents.py``; replicated on every tensor-parallel rank, C = latent_channels)::

    embedding.latents.patch.{weight,bias}      [D, C], [D]         a latent patch -> the hidden state
    embedding.latents.time.{0,2}.{weight,bias} [D, 256], [D, D]    the timestep's sinusoidal features -> MLP
    head.velocity.proj.{weight,bias}           [C, D], [C]         the image-normed hidden state -> velocity

These are the module's own state-dict names: checkpoints, conversion and the export use them as they are.

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
from megannm.model import flops, layers, vocab_parallel
from megannm.model.args import ModelArgs
from megannm.model.attention import Attender, KVCache, rotary
from megannm.model.block import Block, Context, Routing, per_modality
from megannm.model.embedding import EmbeddingStage, modality_of_ids
from megannm.model.latents import VelocityHead, flow_loss, image_spans
from megannm.parallel import Layout
from megannm.vocab import MODALITY_NAMES

__all__ = ["ModelArgs", "EmbeddingStage", "Block", "HeadStage", "lm_loss", "model_loss", "NMMModel", "KVCache",
           "run_chain"]


class HeadStage(nn.Module):
    """Final norm (per modality under MoT) and the untied output layer: vocab-parallel logits [B, S, V_pad/tp]; with
    continuous images also the velocity [B, S, C] at every position (read at the image slots)."""

    def __init__(self, args: ModelArgs, layout: Layout):
        super().__init__()
        spec = layers.linears(args, layout)
        self.norm = per_modality(args.n_sets, lambda: spec.make_norm(args.hidden, args.eps))
        self.output = layers.column(args, layout, args.hidden, args.padded_vocab_size, init=args.vocab_init_method())
        if args.continuous:
            self.velocity = VelocityHead(args.hidden, args.latent_channels)

    def forward(self, h: torch.Tensor, ctx: Context):
        """h [N, D] grouped by modality -> logits [B, S, V_pad / tp] in sequence order (and the velocity)."""
        normed = ctx.routing.ungroup(self.norm(h, ctx.routing.counts))
        if hasattr(self, "velocity"):
            return self.output(normed), self.velocity(normed)
        return self.output(normed)


def context(args: ModelArgs, hidden: torch.Tensor, modality, position_ids, document_ids,
            cache: Optional[KVCache] = None) -> Context:
    """The micro-batch's ``block.Context``: routing, RoPE tables in the activations' dtype, the attention kernel
    (which lets an image's slots see each other both ways under continuous images)."""
    cos, sin = rotary(position_ids, args.head_dim, args.rope_theta, hidden.dtype)
    spans = image_spans(modality, document_ids) if args.continuous else None
    return Context(Routing(modality, args.n_sets), cos[:, None], sin[:, None], Attender(document_ids, cache, spans))


def run_chain(args: ModelArgs, modules, x: tuple, recompute: bool = False, cache: Optional[KVCache] = None):
    """Run a contiguous part of the chain on ``x``: the ids ``(input_ids, position_ids, document_ids)`` (and, under
    continuous images, ``latents, timesteps``) when it starts with the embedding, else the carried activations.
    Returns the head's output (the logits; and the velocity) when it ends with the head, else the carried
    activations. ``recompute``: each block's activations are recomputed in the backward
    (``torch.utils.checkpoint``, non-reentrant) instead of kept."""
    modules = list(modules)
    if isinstance(modules[0], EmbeddingStage):
        x = modules.pop(0)(*x)
    hidden, modality, position_ids, document_ids = x
    ctx = context(args, hidden, modality, position_ids, document_ids, cache)
    h = ctx.routing.group(hidden)  # grouped by modality until the head (or the end of this stage)
    for module in modules:
        if isinstance(module, HeadStage):
            return module(h, ctx)
        h = checkpoint(module, h, ctx, use_reentrant=False) if recompute else module(h, ctx)
    return ctx.routing.ungroup(h), modality, position_ids, document_ids


# ---------------------------------------------------------------------------------------------------------------------
# the loss


def lm_loss(logits_parallel: torch.Tensor, labels: torch.Tensor, loss_mask: Optional[torch.Tensor],
            args: ModelArgs, layout: Layout):
    """Next-token loss of one micro-batch from vocab-parallel logits [B, S, V_pad/tp]; ``labels`` are the target ids
    (already shifted), ``loss_mask`` 1 where a target counts (None = everywhere). ``logits_parallel`` is consumed:
    fp32 logits are overwritten by the cross entropy.

        loss = sum_t w[modality(label_t)] * CE_t * mask_t / sum_t mask_t
               + z_loss * sum_t lse_t^2 mask_t / sum_t mask_t

    i.e. the per-modality weight (by the modality of the TARGET token) scales each token's term, and the divisor is
    the micro-batch's count of loss tokens whatever the weights: a weight scales its modality's gradient linearly and
    a weight of 0 removes it without scaling the other modality up. lse is the log partition over the real
    vocabulary; the z-loss is not modality-weighted. Under continuous images an image slot is no target of the
    cross entropy (its loss is the flow loss, ``model_loss``): only text targets count.

    Returns (loss, stats) with stats = text_loss, image_loss (unweighted mean CE over that modality's targets),
    text_tokens, image_tokens (counts) and z_loss (the added term), all detached 0-d tensors.
    """
    # the head's output serves the loss only: used in place (``consume``) rather than copied
    logits = vocab_parallel.mask_padding(logits_parallel, args.vocab_size, layout.tp_rank, consume=True)
    if loss_mask is None:
        loss_mask = torch.ones_like(labels)
    modality = modality_of_ids(labels, args)
    mask = loss_mask.float()
    if args.continuous:
        mask = mask * (modality == 0)
    count = mask.sum().clamp(min=1.0)
    # one pass set for the cross entropy and the log partition (the z-loss's), which consumes the logits
    ce, lse = vocab_parallel.cross_entropy(logits, labels, layout)
    lse = lse if args.z_loss > 0 else None
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


def model_loss(output, labels: torch.Tensor, loss_mask: Optional[torch.Tensor], args: ModelArgs, layout: Layout,
               flow_target: Optional[torch.Tensor] = None, flow_mask: Optional[torch.Tensor] = None):
    """The head's output -> (loss, stats). Discrete images: ``lm_loss``. Continuous images: the text targets' cross
    entropy plus ``loss_weights``' image entry times the flow loss over the slots where ``flow_mask`` [B, S] is 1
    (``latents.flow_loss`` against ``flow_target`` [B, S, C] = noise - x_0); ``image_loss`` / ``image_tokens``
    then report the flow loss and its slot count. Text and image terms are each a mean over their own targets
    (Transfusion's ``L_LM + lambda * L_flow``)."""
    if not args.continuous:
        return lm_loss(output, labels, loss_mask, args, layout)
    logits, velocity = output
    loss, stats = lm_loss(logits, labels, loss_mask, args, layout)
    if flow_target is None:  # text only: the velocity head still takes part (zero gradient), as every module does
        flow, slots = velocity.sum() * 0.0, torch.zeros((), device=velocity.device)
    else:
        flow, slots = flow_loss(velocity, flow_target, flow_mask)
    stats["image_loss"], stats["image_tokens"] = flow.detach(), slots.detach()
    return loss + args.loss_weights[1] * flow, stats


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
    block in the backward instead of keeping its activations: the same losses and gradients for one block's
    activations of memory instead of all of them. ``args.compile`` compiles each block (``layers.compile_blocks``)."""

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
                self.layers.append(layers.block(args, layout, i))
        with seeded(seed + args.layers + 1):
            self.head = HeadStage(args, layout)
        if args.compile:
            layers.compile_blocks(self.layers)

    def forward(self, input_ids, position_ids=None, document_ids=None, labels=None, loss_mask=None,
                cache: Optional[KVCache] = None, parallel_logits: bool = False, latents=None, timesteps=None,
                flow_target=None, flow_mask=None):
        """Logits [B, S, vocab_size] (gathered over TP, real vocabulary only) when ``labels`` is None, else
        ``model_loss``'s (loss, stats); ``parallel_logits`` returns the head's vocab-parallel logits [B, S, V_pad/tp]
        instead (what ``megannm.model.vocab_parallel`` takes). With ``cache`` the ids are a continuation:
        keys/values are appended and the chunk attends to everything cached; position ids then default to
        continuing from the cache length. Continuous images: ``latents`` [B, S, C] and ``timesteps`` [B, S] enter
        at the image slots (``EmbeddingStage``), the logits come with the velocity [B, S, C] as a pair, and the loss
        takes ``flow_target`` / ``flow_mask`` (``model_loss``)."""
        if cache is not None and position_ids is None:
            b, s = input_ids.shape
            position_ids = torch.arange(cache.length, cache.length + s, device=input_ids.device).repeat(b, 1)
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        x = (input_ids, position_ids, document_ids) + ((latents, timesteps) if self.args.continuous else ())
        out = run_chain(self.args, [self.embedding, *self.layers, self.head], x, recompute=recompute, cache=cache)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        if labels is not None:
            return model_loss(out, labels, loss_mask, self.args, self.layout, flow_target, flow_mask)
        logits, velocity = out if self.args.continuous else (out, None)
        if not parallel_logits:
            logits = parallel.gather_last_dim(logits, self.layout.tp_group)[..., :self.args.vocab_size]
        return logits if velocity is None else (logits, velocity)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        if max_len > self.args.max_seq_len:
            raise ValueError(f"KV cache: max_len {max_len} exceeds the model's max_seq_len={self.args.max_seq_len}")
        p = next(self.parameters())
        return KVCache(self.args.layers, batch, self.args.kv_heads // self.layout.tp, max_len, self.args.head_dim,
                       p.dtype,
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
