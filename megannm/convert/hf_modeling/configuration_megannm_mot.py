"""Configuration of megannm's native multimodal model for Hugging Face ``transformers`` (remote code).

Exported by ``megannm convert SRC DST --to hf``; self-contained (no megannm import). The unified vocabulary is
``[text | image codes | specials]``: ids in ``[image_token_start, image_token_end)`` are image tokens (modality 1),
every other id is text (modality 0). Under Mixture-of-Transformers (``num_weight_sets=2``) every non-embedding
weight exists once per modality; ``num_weight_sets=1`` is the dense twin. ``latent_channels > 0``: images are
continuous latents (one image id, the latent slot, with that many numbers a slot) drawn by a flow (``draw``).
"""
from transformers import PretrainedConfig


class MegannmMoTConfig(PretrainedConfig):
    model_type = "megannm_mot"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=None, head_dim=None, num_weight_sets=2,
                 image_token_start=0, image_token_end=0, qk_norm=True, norm_reorder=False, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=512, initializer_range=0.02, use_cache=True,
                 bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
                 latent_channels=0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_weight_sets = num_weight_sets  # 2: one set per modality (text, image); 1: the dense twin
        self.image_token_start = image_token_start
        self.image_token_end = image_token_end
        self.qk_norm = qk_norm  # RMSNorm over head_dim on queries and keys, before RoPE (per weight set)
        self.norm_reorder = norm_reorder  # Chameleon: normalise each sub-layer's output instead of its input
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.latent_channels = latent_channels
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
