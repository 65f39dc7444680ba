"""ONE global causal self-attention over the interleaved sequence: RoPE, the document mask and the KV cache.

Modality never enters here. Under MoT each modality has its own projections (``block.py``), but every query attends
to every earlier key of its document whatever the modalities: that is how image tokens read the caption and text
tokens read the image.

Tensors are ``[batch, heads, seq, head_dim]`` inside, the layout ``F.scaled_dot_product_attention`` takes. One
``attend`` function, the backend chosen by where the tensors live and what the mask is:

- CPU: SDPA with a boolean causal + document mask: the reference (flex_attention has no backward on the CPU).
- GPU, packed rows (several documents per row, no cache): ``flex_attention`` (compiled) with a ``BlockMask`` built
  from the document ids, so fully masked blocks are skipped and no dense [B, S, S] mask is ever made.
- GPU otherwise (one document per row; the KV-cached decoding of ``megannm.generate``): SDPA restricted to its fused
  kernels (flash, memory-efficient, cuDNN); the math kernel, which materialises the scores, is refused.

RoPE tables are computed in fp32 (positions up to max_seq_len exceed bf16's 8 bits of mantissa) and cast to the
activation dtype for the product, as Hugging Face Llama and Megatron do; SDPA and flex accumulate the softmax in fp32.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Union

import torch
import torch.nn.functional as F

try:  # torch >= 2.5: block-sparse attention for packed documents on a GPU
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: SDPA everywhere
    BlockMask = create_block_mask = flex_attention = None

# How many micro-batches chose each backend in this process ("sdpa-cpu", "sdpa-fused", "flex"): what the GPU check
# reports. Counted where a micro-batch's ``Attender`` is made, outside the (possibly compiled) blocks.
BACKENDS_USED: Counter = Counter()


# ---------------------------------------------------------------------------------------------------------------------
# rotary position embedding, in Hugging Face Llama's ``rotate_half`` convention so that exported logits match


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B, S, head_dim] for integer positions [B, S] (reset to 0 at every document start),
    computed in fp32 whatever the params dtype (as HF does), then cast to ``dtype``, the activations' dtype (a
    module cast after it was built, such as an engine's bf16 copy, must not get q and k promoted to fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ---------------------------------------------------------------------------------------------------------------------
# masks and the cache


def attention_mask(query_docs: torch.Tensor, key_docs: torch.Tensor, start: int,
                   query_spans: Optional[torch.Tensor] = None, key_spans: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Boolean [B, 1, S, T], True = may attend: causal by sequence index AND the same document; with image spans
    (continuous images, ``latents.image_spans``: -1 for text), also every key of the query's own image.

    ``start`` is the index of the first query in the key sequence (the cache length before this chunk), so query i
    sees keys 0 .. start + i. Causality is by index, not by position id: positions restart in every document.
    """
    s, t = query_docs.shape[1], key_docs.shape[1]
    q_idx = torch.arange(start, start + s, device=query_docs.device)
    k_idx = torch.arange(t, device=query_docs.device)
    visible = (k_idx[None, :] <= q_idx[:, None])[None]  # [1, S, T]
    if query_spans is not None:
        visible = visible | ((query_spans[:, :, None] == key_spans[:, None, :]) & (query_spans[:, :, None] >= 0))
    same_doc = query_docs[:, :, None] == key_docs[:, None, :]  # [B, S, T]
    return (visible & same_doc)[:, None]


def document_block_mask(document_ids: torch.Tensor, spans: Optional[torch.Tensor] = None):
    """flex_attention's ``BlockMask`` for rows [B, S] (no cache): the same rule as ``attention_mask`` (causal by
    index or the same image, AND the same document), evaluated per 128 x 128 block so that blocks across documents
    are skipped."""
    b, s = document_ids.shape

    def causal_same_document(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    def causal_or_same_image(batch, head, q_idx, kv_idx):
        same_image = (spans[batch, q_idx] == spans[batch, kv_idx]) & (spans[batch, q_idx] >= 0)
        return ((kv_idx <= q_idx) | same_image) & (document_ids[batch, q_idx] == document_ids[batch, kv_idx])

    rule = causal_same_document if spans is None else causal_or_same_image
    return create_block_mask(rule, b, None, s, s, device=document_ids.device)


def use_flex(device: torch.device) -> bool:
    """flex_attention for packed rows where it has a backward and fused kernels: on a GPU."""
    return flex_attention is not None and device.type == "cuda"


class LayerCache:
    """One layer's keys and values (this rank's tensor-parallel heads only), written in place."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def store(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write the new chunk at ``start`` and return every key/value up to its end."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of every layer plus the document id of every cached position; ``length`` tokens so far.

    ``NMMModel.forward(new_ids, position_ids, cache=cache)`` appends the chunk and attends over everything cached
    (causal inside the chunk). Make one with ``model.new_cache(batch, max_len)``.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.layers = [LayerCache(batch, kv_heads, max_len, head_dim, dtype, device) for _ in range(num_layers)]
        self.docs = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0

    def extend(self, document_ids: torch.Tensor) -> torch.Tensor:
        """Record the new chunk's document ids; return the document ids of every key the chunk will see."""
        end = self.length + document_ids.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache: {end} tokens do not fit the cache's max_len={self.max_len}")
        self.docs[:, self.length:end] = document_ids
        return self.docs[:, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, length: int) -> None:
        """Forget every position from ``length`` on (their keys are overwritten by the next chunk): a denoising
        step re-runs an image's slots over the same cached prefix."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KV cache: cannot rewind to {length} (holds {self.length})")
        self.length = length

    def rows_view(self, r0: int, r1: int, offset: int) -> "KVCache":
        """Rows [r0, r1) from position ``offset`` on, as an empty cache whose tensors are views of this one's: a
        group of left-padded prompts prefills there, right-aligned, and its keys and values land in this cache."""
        view = KVCache.__new__(KVCache)
        view.layers = []
        for layer in self.layers:
            part = LayerCache.__new__(LayerCache)
            part.k, part.v = layer.k[r0:r1, :, offset:], layer.v[r0:r1, :, offset:]
            view.layers.append(part)
        view.docs, view.max_len, view.length = self.docs[r0:r1, offset:], self.max_len - offset, 0
        return view

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Only ``rows`` (batch indices) stay: one copy of their keys and values (finished rows leave a batch)."""
        for layer in self.layers:
            layer.k, layer.v = layer.k[rows], layer.v[rows]
        self.docs = self.docs[rows]


Mask = Union[torch.Tensor, "BlockMask", None]


class Attender:
    """The attention kernel of one micro-batch, as ``block.Context.attend``: its mask (or none), and the KV cache
    whose layer ``layer`` stores the new keys and values first when decoding. ``spans`` (continuous images): each
    token's image, whose slots see each other both ways."""

    def __init__(self, document_ids: torch.Tensor, cache: Optional[KVCache] = None,
                 spans: Optional[torch.Tensor] = None):
        self.cache, self.start = cache, 0 if cache is None else cache.length
        if cache is not None:
            key_docs = cache.extend(document_ids)
            key_spans = None
            if spans is not None:  # cached keys are all earlier than the chunk (the last keys): causality shows
                key_spans = torch.full_like(key_docs, -2)  # them, so their spans never match (-2)
                key_spans[:, key_docs.shape[1] - spans.shape[1]:] = spans
            self.mask: Mask = attention_mask(document_ids, key_docs, self.start, spans, key_spans)
        elif spans is None and bool((document_ids == document_ids[:, :1]).all()):
            self.mask = None  # one document per row: SDPA's causal fast path, no [B, S, S] mask to build or read
        elif use_flex(document_ids.device):
            self.mask = document_block_mask(document_ids, spans)
        else:
            self.mask = attention_mask(document_ids, document_ids, 0, spans, spans)
        BACKENDS_USED[backend(self.mask, document_ids.device)] += 1

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        if self.cache is not None:
            k, v = self.cache.layers[layer].store(k, v, self.start)
        return attend(q, k, v, self.mask)


_compiled_flex = None


def _flex(q, k, v, block_mask) -> torch.Tensor:
    """flex_attention, compiled on first use (eager flex materialises the scores; compiled, it is a fused kernel)."""
    global _compiled_flex
    if q.device.type != "cuda":  # the CPU (tests of the mask): eager, forward only
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def _sdpa_fused(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA on a GPU through its fused kernels only. Grouped-query attention is fused only by the flash kernel
    (half precision, no mask); elsewhere the key/value heads are repeated first (Hugging Face's ``repeat_kv``
    order) so that the memory-efficient kernel takes them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    gqa = q.shape[1] != k.shape[1]
    if gqa and (mask is not None or q.dtype == torch.float32):
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


def backend(mask: Mask, device: torch.device) -> str:
    """The kernel ``attend`` uses for this mask on this device (see the module docstring)."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return "flex"
    return "sdpa-fused" if device.type == "cuda" else "sdpa-cpu"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Softmax attention; q [B, Hq, S, hd], k/v [B, Hkv, T, hd] with Hq a multiple of Hkv (grouped-query:
    query head h reads key/value head h // (Hq / Hkv), Hugging Face's ``repeat_kv`` order). Returns [B, S, Hq*hd].
    ``mask``: from ``attention_inputs`` (the backend follows from it and the device; see the module docstring)."""
    which = backend(mask, q.device)
    if which == "flex":
        out = _flex(q, k, v, mask)
    elif which == "sdpa-fused":
        out = _sdpa_fused(q, k, v, mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=q.shape[1] != k.shape[1])
    b, h, s, d = out.shape
    return out.transpose(1, 2).reshape(b, s, h * d)
