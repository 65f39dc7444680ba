"""megannm's native multimodal model (Mixture-of-Transformers, Liang et al. 2024) for Hugging Face ``transformers``.

Exported by ``megannm convert SRC DST --to hf`` beside ``configuration_megannm_mot.py``; self-contained (no megannm
import), loaded with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``. Numerically the same
function as ``megannm.model.NMMModel``:

- every token's modality is a function of its id (image codes -> 1, everything else -> 0);
- per weight set (one per modality under MoT, one for the dense twin): attention pre-norm, q/k/v/o projections,
  optional QK-norm over head_dim before RoPE, FFN pre-norm and SwiGLU FFN, final norm; each token passes through its
  own modality's set;
- ONE causal self-attention over the whole interleaved sequence (Llama's RoPE ``rotate_half`` form, grouped-query
  attention in Hugging Face's ``repeat_kv`` order);
- untied embedding and output layer over the unified vocabulary.

Parameter names follow Llama's with the weight-set index appended (``model.layers.0.self_attn.q_proj.1.weight`` is
layer 0's image query projection).
"""
import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # a relative import when loaded as remote code, a plain one when the folder is on sys.path
    from .configuration_megannm_mot import MegannmMoTConfig
except ImportError:  # pragma: no cover
    from configuration_megannm_mot import MegannmMoTConfig


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 (as Llama and megannm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class PerModality(nn.ModuleList):
    """One module per weight set; ``forward(x, groups)`` applies set m to the rows ``groups[m]`` of x [N, ...]."""

    def forward(self, x: torch.Tensor, groups: Optional[list]) -> torch.Tensor:
        if groups is None:  # the dense twin: one set for every token
            return self[0](x)
        out = None
        for module, index in zip(self, groups):
            y = module(x.index_select(0, index))
            if out is None:
                out = y.new_empty((x.shape[0],) + tuple(y.shape[1:]))
            out.index_copy_(0, index, y)
        return out


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class MegannmMoTAttention(nn.Module):
    def __init__(self, config: MegannmMoTConfig, layer_idx: int):
        super().__init__()
        n, d, hd = config.num_weight_sets, config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q_proj = PerModality(nn.Linear(d, self.heads * hd, bias=False) for _ in range(n))
        self.k_proj = PerModality(nn.Linear(d, self.kv_heads * hd, bias=False) for _ in range(n))
        self.v_proj = PerModality(nn.Linear(d, self.kv_heads * hd, bias=False) for _ in range(n))
        self.o_proj = PerModality(nn.Linear(self.heads * hd, d, bias=False) for _ in range(n))
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = PerModality(RMSNorm(hd, config.rms_norm_eps) for _ in range(n))
            self.k_norm = PerModality(RMSNorm(hd, config.rms_norm_eps) for _ in range(n))

    def forward(self, x, groups, cos, sin, mask, cache: Optional[Cache]):
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        q, k, v = self.q_proj(flat, groups), self.k_proj(flat, groups), self.v_proj(flat, groups)
        q, k, v = (q.view(b * s, -1, self.head_dim), k.view(b * s, -1, self.head_dim),
                   v.view(b * s, -1, self.head_dim))
        if self.qk_norm:
            q, k = self.q_norm(q, groups), self.k_norm(k, groups)
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        c, sn = cos[:, None], sin[:, None]
        q, k = q * c + rotate_half(q) * sn, k * c + rotate_half(k) * sn
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:  # query head h reads key/value head h // (heads / kv_heads)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b * s, self.heads * self.head_dim)
        return self.o_proj(out, groups).view(b, s, d)


class MegannmMoTMLP(nn.Module):
    def __init__(self, config: MegannmMoTConfig):
        super().__init__()
        n, d, f = config.num_weight_sets, config.hidden_size, config.intermediate_size
        self.gate_proj = PerModality(nn.Linear(d, f, bias=False) for _ in range(n))
        self.up_proj = PerModality(nn.Linear(d, f, bias=False) for _ in range(n))
        self.down_proj = PerModality(nn.Linear(f, d, bias=False) for _ in range(n))

    def forward(self, x, groups):
        b, s, d = x.shape
        flat = x.reshape(b * s, d)
        h = F.silu(self.gate_proj(flat, groups)) * self.up_proj(flat, groups)
        return self.down_proj(h, groups).view(b, s, d)


class MegannmMoTDecoderLayer(nn.Module):
    def __init__(self, config: MegannmMoTConfig, layer_idx: int):
        super().__init__()
        n = config.num_weight_sets
        self.norm_reorder = config.norm_reorder
        self.self_attn = MegannmMoTAttention(config, layer_idx)
        self.mlp = MegannmMoTMLP(config)
        self.input_layernorm = PerModality(RMSNorm(config.hidden_size, config.rms_norm_eps) for _ in range(n))
        self.post_attention_layernorm = PerModality(RMSNorm(config.hidden_size, config.rms_norm_eps)
                                                    for _ in range(n))

    def _norm(self, norm, x, groups):
        b, s, d = x.shape
        return norm(x.reshape(b * s, d), groups).view(b, s, d)

    def forward(self, h, groups, cos, sin, mask, cache):
        if self.norm_reorder:  # Chameleon: the sub-layer's output is normalised before it joins the residual
            h = h + self._norm(self.input_layernorm, self.self_attn(h, groups, cos, sin, mask, cache), groups)
            return h + self._norm(self.post_attention_layernorm, self.mlp(h, groups), groups)
        h = h + self.self_attn(self._norm(self.input_layernorm, h, groups), groups, cos, sin, mask, cache)
        return h + self.mlp(self._norm(self.post_attention_layernorm, h, groups), groups)


class MegannmMoTPreTrainedModel(PreTrainedModel):
    config_class = MegannmMoTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MegannmMoTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MegannmMoTModel(MegannmMoTPreTrainedModel):
    def __init__(self, config: MegannmMoTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MegannmMoTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = PerModality(RMSNorm(config.hidden_size, config.rms_norm_eps)
                                for _ in range(config.num_weight_sets))
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def groups(self, input_ids: torch.Tensor) -> Optional[list]:
        """Flat token indices of each weight set (None for the dense twin)."""
        if self.config.num_weight_sets == 1:
            return None
        c = self.config
        modality = ((input_ids >= c.image_token_start) & (input_ids < c.image_token_end)).long().reshape(-1)
        return [(modality == m).nonzero().squeeze(1) for m in range(c.num_weight_sets)]

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        b, s = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:  # (generate passes them, counted from the attention mask for left padding)
            position_ids = torch.arange(past, past + s, device=input_ids.device).unsqueeze(0).expand(b, s)
        groups = self.groups(input_ids)
        h = self.embed_tokens(input_ids)
        cos, sin = rotary(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        mask = self._mask(attention_mask, b, s, past, input_ids.device)
        for layer in self.layers:
            h = layer(h, groups, cos, sin, mask, past_key_values if use_cache else None)
        return h, groups, past_key_values if use_cache else None

    @staticmethod
    def _mask(attention_mask, b, s, past, device):
        """Boolean [B, 1, S, past + S]: causal, minus padded keys; a query with nothing left sees itself (its
        output is never used, but NaN from an empty softmax row would spread through the padded keys)."""
        t = past + s
        q_idx = torch.arange(past, t, device=device)
        k_idx = torch.arange(t, device=device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None].expand(b, 1, s, t)
        if attention_mask is not None:
            keys = attention_mask[:, -t:].bool() if attention_mask.shape[1] >= t else F.pad(
                attention_mask.bool(), (t - attention_mask.shape[1], 0), value=True)
            mask = mask & keys[:, None, None, :]
            empty = ~mask.any(-1, keepdim=True)
            mask = mask | (empty & (k_idx[None, :] == q_idx[:, None])[None, None])
        return mask


class MegannmMoTForCausalLM(MegannmMoTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MegannmMoTConfig):
        super().__init__(config)
        self.model = MegannmMoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
        # transformers <= 5.23 passes the KV cache as ``past_key_values``; 5.24 renamed it ``cache`` (in the
        # generation loop and in the output class): take whichever arrives, return it under the output's own name.
        past_key_values = cache if cache is not None else past_key_values
        if input_ids is None:
            raise ValueError("MegannmMoTForCausalLM needs input_ids: each token's modality is a function of its id "
                             "(inputs_embeds alone cannot route tokens to their weight set)")
        h, groups, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        b, s, d = h.shape
        norm = self.model.norm
        h = norm(h.reshape(b * s, d), groups).view(b, s, d)  # the final norm, per modality
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


# The output's cache field: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24.
_CACHE_FIELD = next((f.name for f in dataclasses.fields(CausalLMOutputWithPast)
                     if f.name in ("cache", "past_key_values")), "past_key_values")
