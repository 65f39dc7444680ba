"""The modality-aware embedding: the first pipeline stage.

One megatron-core ``VocabParallelEmbedding`` over the unified vocabulary (text | image codes | specials | padding);
each TP rank holds a contiguous block of rows. It returns the hidden states together with the modality of every
token and its position and document ids: these four tensors travel together through every block and across
pipeline stages (DeepSpeed passes tuples of tensors), so no stage needs the token ids again.

With continuous images (``ModelArgs.latent_channels``) an image slot's hidden state is its id's embedding plus its
latent patch's and timestep's (``latents.LatentInput``); the other tokens' are untouched.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from megatron.core.tensor_parallel import VocabParallelEmbedding

from megannm.model.latents import LatentInput

if TYPE_CHECKING:
    from megannm.model.args import ModelArgs
    from megannm.parallel import Layout


def modality_of_ids(ids: torch.Tensor, args: "ModelArgs") -> torch.Tensor:
    """0 text, 1 image: the same pure function of the id as ``megannm.vocab.Vocab.is_image``, from the model's own
    record of the image range (a checkpoint carries ``ModelArgs``, not the Vocab object)."""
    return ((ids >= args.image_start) & (ids < args.image_end)).long()


class EmbeddingStage(nn.Module):
    def __init__(self, args: "ModelArgs", layout: "Layout"):
        super().__init__()
        self.args = args
        # Rows beyond the real vocabulary (TP padding) start at zero and are never looked up.
        self.embed_tokens = VocabParallelEmbedding(args.padded_vocab_size, args.hidden,
                                                   init_method=args.vocab_init_method(),
                                                   config=args.megatron_config(layout.tp, layout.pp),
                                                   tp_group=layout.tp_group)
        if args.continuous:
            self.latents = LatentInput(args.latent_channels, args.hidden, args.init_std)

    def forward(self, input_ids, position_ids=None, document_ids=None, latents=None, timesteps=None):
        """ids [B, S] -> (hidden [B,S,D], modality [B,S], position_ids [B,S], document_ids [B,S]). Missing
        position ids count from 0; missing document ids put the whole row in one document. ``latents`` [B, S, C]
        (the noised patch x_t at each image slot; anything elsewhere) and ``timesteps`` [B, S] (t; 0 = clean)
        enter at the image slots (continuous images)."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).repeat(b, 1)
        if document_ids is None:
            document_ids = torch.zeros_like(input_ids)
        hidden = self.embed_tokens(input_ids)
        modality = modality_of_ids(input_ids, self.args)
        if self.args.continuous:
            if latents is None:
                latents = hidden.new_zeros(b, s, self.args.latent_channels)
                timesteps = hidden.new_zeros(b, s)
            # every slot computed (no host sync to find the image slots; C x D and a D x D time MLP per token)
            hidden = torch.where(modality[..., None].bool(), hidden + self.latents(latents, timesteps), hidden)
        return hidden, modality, position_ids, document_ids
