"""The pretraining objective: next token over every token, per-modality loss weights (applied by the model's loss).

A phase supplies batches and a loss over the one engine and model; the loop (``megannm.train.loop``) does the rest.
SFT (``phases/sft.py``) subclasses this phase: same batches and model loss, normalised per token over the global
batch instead of per micro-batch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megannm import parallel

# Order of the accumulated statistics vector (summed over micro-batches and data-parallel ranks).
STAT_KEYS = ("loss", "text_loss_sum", "text_tokens", "image_loss_sum", "image_tokens", "z_loss", "micro_batches")


class PretrainPhase:
    name = "pretrain"

    def __init__(self, recipe, layout, vocab):
        self.recipe, self.layout, self.vocab = recipe, layout, vocab

    # data ---------------------------------------------------------------------------------------------------------
    def _datasets(self, refs):
        return [(str(Path(r.path)), r.weight) for r in refs]

    def train_batches(self, consumed_samples: int):
        from megannm.data.loader import build_train_iterator
        d = self.recipe.data
        return build_train_iterator(self._datasets(d.train), self.vocab, seq_len=d.seq_len,
                                    micro_batch_size=d.micro_batch_size, global_batch_size=d.global_batch_size,
                                    dp_rank=self.layout.dp_rank, dp_size=self.layout.dp, seed=d.seed,
                                    consumed_samples=consumed_samples, pack=d.pack,
                                    caption_dropout=d.caption_dropout)

    def eval_batches(self) -> list[dict]:
        d = self.recipe.data
        if not d.valid:
            return []
        from megannm.data.loader import build_eval_batches
        return list(build_eval_batches(self._datasets(d.valid), self.vocab, seq_len=d.seq_len,
                                       micro_batch_size=d.micro_batch_size, dp_rank=self.layout.dp_rank,
                                       dp_size=self.layout.dp, num_batches=self.recipe.logging.eval_batches,
                                       pack=d.pack, seed=d.seed))

    # objective ----------------------------------------------------------------------------------------------------
    def micro_loss(self, engine, batch: dict):
        """Loss of one micro-batch and its statistics vector (see STAT_KEYS)."""
        loss, stats = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             document_ids=batch["document_ids"], labels=batch["labels"],
                             loss_mask=batch["loss_mask"])
        return loss, stats_vector(loss, stats)


def stats_vector(loss, stats: dict) -> torch.Tensor:
    f = lambda k: torch.as_tensor(stats.get(k, 0.0), dtype=torch.float64).detach().cpu()
    return torch.stack([loss.detach().double().cpu(), f("text_loss") * f("text_tokens"), f("text_tokens"),
                        f("image_loss") * f("image_tokens"), f("image_tokens"), f("z_loss"),
                        torch.tensor(1.0, dtype=torch.float64)])


def reduce_stats(vec: torch.Tensor) -> dict:
    """Sum the statistics over data-parallel ranks and turn them into means."""
    vec = vec.to(parallel.device())
    parallel.all_reduce(vec, group=parallel.data_group())
    vec = vec.cpu()
    s = dict(zip(STAT_KEYS, vec.tolist()))
    n = max(s["micro_batches"], 1.0)
    out = {"loss": s["loss"] / n, "z_loss": s["z_loss"] / n}
    if s["text_tokens"]:
        out["text_loss"] = s["text_loss_sum"] / s["text_tokens"]
    if s["image_tokens"]:
        out["image_loss"] = s["image_loss_sum"] / s["image_tokens"]
    out["text_tokens"] = s["text_tokens"]
    out["image_tokens"] = s["image_tokens"]
    return out
