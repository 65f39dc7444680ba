"""megannm's native multimodal model (Mixture-of-Transformers, Liang et al. 2024) for Hugging Face ``transformers``.

Exported by ``megannm convert SRC DST --to hf`` beside ``configuration_megannm_mot.py`` and ``megannm_block.py``,
which is megannm's own block (``megannm/model/block.py``, copied as it is: the export runs the very code that was
trained, with ``nn.Linear`` projections); loaded with ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)``, no megannm install needed. This file adds what ``transformers`` needs around the blocks:

- every token's modality is a function of its id (image codes -> 1, everything else -> 0), which routes it to its
  weight set;
- the attention kernel the blocks call: SDPA over Hugging Face's KV cache, with its padding mask;
- untied embedding and output layer over the unified vocabulary, the final norm per weight set;
- continuous images (``latent_channels > 0``): megannm's latent modules (``megannm/model/latents.py``, copied as
  ``megannm_latents.py``): latent patches and timesteps in at the latent slots, a velocity out (``velocity`` of the
  output), attention bidirectional inside an image, and ``draw``, the Euler sampler with classifier-free guidance.

Parameter names are megannm's canonical ones under ``model.`` (``model.layers.0.attn.q_proj.1.weight`` is layer
0's image query projection), ``model.embed_tokens.weight``, ``model.norm.{m}.weight`` and ``lm_head.weight``.
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # relative imports when loaded as remote code, plain ones when the folder is on sys.path
    from .configuration_megannm_mot import MegannmMoTConfig
    from .megannm_block import Block, BlockShape, Context, Linears, PerModality, RMSNorm, Routing
    from .megannm_latents import LatentInput, VelocityHead, euler, image_spans
except ImportError:  # pragma: no cover
    from configuration_megannm_mot import MegannmMoTConfig
    from megannm_block import Block, BlockShape, Context, Linears, PerModality, RMSNorm, Routing
    from megannm_latents import LatentInput, VelocityHead, euler, image_spans


@dataclasses.dataclass
class MegannmOutput(CausalLMOutputWithPast):
    """The causal LM output, with the velocity [B, S, latent_channels] at every position (continuous images)."""
    velocity: torch.FloatTensor = None


def rotary(position_ids: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin [B, 1, S, hd]: computed in fp32 (as megannm and Llama), cast to the activations' dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device)
                                .float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def block_shape(config: MegannmMoTConfig) -> BlockShape:
    return BlockShape(hidden=config.hidden_size, heads=config.num_attention_heads,
                      kv_heads=config.num_key_value_heads, ffn=config.intermediate_size,
                      n_sets=config.num_weight_sets, qk_norm=config.qk_norm, norm_reorder=config.norm_reorder,
                      eps=config.rms_norm_eps)


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
        shape = block_shape(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(shape, Linears(), i) for i in range(config.num_hidden_layers))
        self.norm = PerModality(RMSNorm(config.hidden_size, config.rms_norm_eps)
                                for _ in range(config.num_weight_sets))
        if config.latent_channels:
            self.latents = LatentInput(config.latent_channels, config.hidden_size, config.initializer_range)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                latents=None, timesteps=None):
        """-> (final hidden states [B, S, D] after the per-set norm, the cache or None). Continuous images:
        ``latents`` [B, S, C] and ``timesteps`` [B, S] enter at the latent slots."""
        c = self.config
        b, s = input_ids.shape
        use_cache = c.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache else None
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:  # (generate passes them, counted from the attention mask for left padding)
            position_ids = torch.arange(past, past + s, device=input_ids.device).unsqueeze(0).expand(b, s)
        modality = ((input_ids >= c.image_token_start) & (input_ids < c.image_token_end)).long()
        routing = Routing(modality, c.num_weight_sets)
        h = self.embed_tokens(input_ids)
        spans = None
        if c.latent_channels:
            if latents is None:
                latents, timesteps = h.new_zeros(b, s, c.latent_channels), h.new_zeros(b, s)
            h = torch.where(modality[..., None].bool(), h + self.latents(latents, timesteps), h)
            spans = image_spans(modality, torch.zeros_like(modality))  # this chunk's images (cached ones are past)
        cos, sin = rotary(position_ids, c.head_dim, c.rope_theta, h.dtype)
        mask = self._mask(attention_mask, b, s, past, input_ids.device, spans)

        def attend(q, k, v, layer):
            if cache is not None:
                k, v = cache.update(k, v, layer)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
            return out.transpose(1, 2).flatten(2)

        ctx = Context(routing, cos, sin, attend)
        h = routing.group(h)
        for layer in self.layers:
            h = layer(h, ctx)
        return routing.ungroup(self.norm(h, routing.counts)), cache

    @staticmethod
    def _mask(attention_mask, b, s, past, device, spans=None):
        """Boolean [B, 1, S, past + S]: causal (and, with ``spans`` [B, S], every slot of the query's own image in
        this chunk), minus padded keys; a query with nothing left sees itself (its output is never used, but NaN
        from an empty softmax row would spread through the padded keys)."""
        t = past + s
        q_idx = torch.arange(past, t, device=device)
        k_idx = torch.arange(t, device=device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None].expand(b, 1, s, t)
        if spans is not None:
            key_spans = torch.cat([torch.full((b, past), -2, device=device, dtype=spans.dtype), spans], dim=1)
            mask = mask | ((spans[:, :, None] == key_spans[:, None, :]) & (spans[:, :, None] >= 0))[:, None]
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
        if config.latent_channels:
            self.velocity = VelocityHead(config.hidden_size, config.latent_channels)
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
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, latents=None,
                timesteps=None, **kwargs):
        # transformers <= 5.23 passes the KV cache as ``past_key_values``; 5.24 renamed it ``cache`` (in the
        # generation loop and in the output class): take whichever arrives, return it under the output's own name.
        past_key_values = cache if cache is not None else past_key_values
        if input_ids is None:
            raise ValueError("MegannmMoTForCausalLM needs input_ids: each token's modality is a function of its id "
                             "(inputs_embeds alone cannot route tokens to their weight set)")
        h, cache = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, latents, timesteps)
        velocity = self.velocity(h) if self.config.latent_channels else None
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)
        return MegannmOutput(loss=loss, logits=logits, velocity=velocity, **{_CACHE_FIELD: cache})

    @torch.no_grad()
    def draw(self, prompt_ids, slots: int, steps: int = 25, cfg_scale: float = 1.0, uncond_ids=None,
             generator=None):
        """Continuous images: the latents [B, slots, C] that ``prompt_ids`` [B, P] (each ending in the image-start
        token) ask for, by ``steps`` Euler steps from noise, the prompt cached once and the slots re-run over it
        each step; with ``cfg_scale != 1`` the unconditional prompts ``uncond_ids`` run beside (classifier-free
        guidance). Decode the latents with the image tokenizer the model was trained with."""
        c = self.config
        if not c.latent_channels:
            raise ValueError("draw: this model's images are discrete codes (generate them with generate())")
        b, dev = prompt_ids.shape[0], prompt_ids.device
        guided = cfg_scale != 1.0
        prompts = [prompt_ids] + ([uncond_ids] if guided else [])
        caches = []
        for ids in prompts:
            cache = DynamicCache()
            self(input_ids=ids, past_key_values=cache, use_cache=True)
            caches.append(cache)
        slot_ids = torch.full((b, slots), c.image_token_start, device=dev, dtype=prompt_ids.dtype)

        def velocity(x, t):
            out = []
            for ids, cache in zip(prompts, caches):
                p = ids.shape[1]
                pos = torch.arange(p, p + slots, device=dev).expand(b, slots)
                out.append(self(input_ids=slot_ids, position_ids=pos, past_key_values=cache, use_cache=True,
                                latents=x.to(self.dtype), timesteps=t.expand(b, slots)).velocity.float())
                cache.crop(-slots)  # forget the slots: the next step re-runs them over the same prompt
            return out[0] if not guided else out[1] + cfg_scale * (out[0] - out[1])

        noise = torch.randn(b, slots, c.latent_channels, generator=generator, device=dev)
        return euler(velocity, noise, steps)


# The output's cache field: ``past_key_values`` up to transformers 5.23, ``cache`` from 5.24.
_CACHE_FIELD = next((f.name for f in dataclasses.fields(CausalLMOutputWithPast)
                     if f.name in ("cache", "past_key_values")), "past_key_values")
