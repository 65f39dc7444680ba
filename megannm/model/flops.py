"""Parameter and FLOP counts from the model's own dimensions (no module needed, so a pipeline stage can count the
whole model).

FLOPs per token of training, PaLM's model-FLOPs count (Chowdhery et al. 2022, appendix B):

    6 * N_matmul  +  12 * layers * seq_len * heads * head_dim

``N_matmul`` is the matmul weights ONE token passes through: per layer its modality's q, k, v, o, gate, up and
down projections, plus the output head over the real vocabulary. 6 = 2 (multiply-add) x 3 (forward + backward
for inputs and weights). The attention term is the QK^T and AV products over the full S x S (PaLM's convention; a
causal mask halves the useful part). Embedding lookups, norms, RoPE and softmax are not counted. Under MoT each
token passes exactly one set of weights of the dense sizes, so MoT and its dense twin give the SAME number.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megannm.model.args import ModelArgs


def block_matmul_params(args: "ModelArgs") -> int:
    """Matmul weights of ONE set of one block: q, k, v, o, gate, up, down."""
    d, hd = args.hidden, args.head_dim
    attn = d * args.heads * hd * 2 + d * args.kv_heads * hd * 2
    return attn + 3 * d * args.ffn


def block_norm_params(args: "ModelArgs") -> int:
    return 2 * args.hidden + (2 * args.head_dim if args.qk_norm else 0)


def latent_params(args: "ModelArgs") -> tuple[int, int]:
    """Continuous images' parameters (weights and biases): (embedding side: patch projection and timestep MLP, head
    side: velocity projection); (0, 0) for discrete images."""
    if not args.continuous:
        return 0, 0
    from megannm.model.latents import FREQUENCIES
    c, d = args.latent_channels, args.hidden
    return c * d + d + FREQUENCIES * d + d + d * d + d, d * c + c


def num_params(args: "ModelArgs", active_only: bool = False, embeddings: bool = True) -> int:
    """Parameters of the whole model (all TP ranks together, vocabulary padding rows excluded).

    ``active_only``: one weight set per block (what a token passes through); ``embeddings=False`` leaves out the
    embedding table and the output head.
    """
    sets = 1 if active_only else args.n_sets
    n = args.layers * sets * (block_matmul_params(args) + block_norm_params(args)) + sets * args.hidden
    if embeddings:
        n += 2 * args.vocab_size * args.hidden  # untied embedding and head
    return n + sum(latent_params(args))


def flops_per_token(args: "ModelArgs", seq_len: int) -> float:
    # continuous images: every token passes the latent and velocity projections (computed at every slot)
    n_matmul = args.layers * block_matmul_params(args) + args.hidden * args.vocab_size + sum(latent_params(args))
    return float(6 * n_matmul + 12 * args.layers * seq_len * args.heads * args.head_dim)
