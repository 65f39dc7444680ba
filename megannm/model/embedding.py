"""The modality-aware embedding: the first pipeline stage.

One megatron-core ``VocabParallelEmbedding`` over the unified vocabulary (text | image codes | specials | padding);
each TP rank holds a contiguous block of rows. It returns the hidden states together with the modality of every
token and its position and document ids: these four tensors travel together through every block and across
pipeline stages (DeepSpeed passes tuples of tensors), so no stage needs the token ids again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from megatron.core.tensor_parallel import VocabParallelEmbedding

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

    def forward(self, input_ids, position_ids=None, document_ids=None):
        """ids [B, S] -> (hidden [B,S,D], modality [B,S], position_ids [B,S], document_ids [B,S]). Missing
        position ids count from 0; missing document ids put the whole row in one document."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).repeat(b, 1)
        if document_ids is None:
            document_ids = torch.zeros_like(input_ids)
        hidden = self.embed_tokens(input_ids)
        return hidden, modality_of_ids(input_ids, self.args), position_ids, document_ids
