"""The SFT objective: next token on the assistant's turns only, averaged per token over the whole global batch.

Data. Chat records (``{"messages": [...]}``, ``megannm preprocess``) become documents with a per-token loss mask:
1 on assistant content (text and image spans alike) and the assistant's ``<|end|>``, 0 on role markers, system and
user turns (``megannm.data.tokenize``). The loader turns it into ``loss_mask`` over the labels and, with
``data.pack: true``, packs several conversations into one sequence with position ids reset at every conversation
and a block-diagonal document mask (``document_ids``), so no token attends across conversations. Batches, model,
engine (TP, PP, ZeRO) and loop are the pretraining ones; only the normalisation differs.

Normalisation: Megatron-LM's ``--calculate-per-token-loss``. There the loss function returns the micro-batch's
summed loss and its token count, the schedule does not divide by the number of micro-batches, and
``finalize_model_grads`` all-reduces the token count over the data-parallel ranks (after broadcasting it from the
last pipeline stage) and scales the gradients by ``1 / count``. Every loss token of the global batch then weighs
``1 / N`` with N the loss tokens of the whole global batch. The pretraining path divides per micro-batch instead
(``lm_loss``: sum / count of that micro-batch; DeepSpeed then averages micro-batches and ranks), which weighs a token
by ``1 / (count_m * accum * dp)``: a micro-batch holding one short answer counts as much as one holding three
images, and packing the same conversations differently changes the gradient. In SFT, where a response is either
one word or 66 image tokens, that matters.

We get Megatron's weighting without touching gradients. The Trainer hands the phase every micro-batch of an update
up front (``Phase.prepare``), so N is known before the first forward: one all-reduce of the local
counts over the data-parallel group. Each micro-batch then gets ``loss_scale = accum * dp / N`` and its loss becomes
``lm_loss * count_m * loss_scale = sum_m * accum * dp / N``; DeepSpeed's backward divides by
``gradient_accumulation_steps`` (accum) and its gradient all-reduce averages over the dp ranks, which leaves exactly
``sum over the global batch / N``. The z-loss term is normalised the same way. The logged ``loss`` (mean of the
micro-batches' scaled losses over micro-batches and ranks) is then the per-token mean of the global batch.

Pipeline parallelism: the pipeline's last stage computes ``lm_loss`` (per micro-batch), not this normalisation, so
the recipe schema refuses SFT with ``parallel.pipeline_parallel > 1`` before any process starts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megannm import parallel
from megannm.phases.pretrain import PretrainPhase


def global_loss_tokens(batches: list[dict], dp_group) -> float:
    """Loss tokens in these micro-batches summed over the data-parallel ranks (every rank calls it: a collective)."""
    local = sum(float(b["loss_mask"].sum()) for b in batches)
    t = torch.tensor([local], dtype=torch.float64, device=parallel.device())
    return float(parallel.all_reduce(t, group=dp_group))


def set_loss_scales(batches: list[dict], layout) -> list[dict]:
    """Give each micro-batch ``loss_scale = len(batches) * dp / N`` (N: loss tokens of the global batch), in place.

    With no loss token anywhere (N = 0) the scale is 0: every loss is then 0 and the step changes nothing but still
    runs every collective."""
    n = global_loss_tokens(batches, layout.dp_group)
    scale = len(batches) * layout.dp / n if n > 0 else 0.0
    for b in batches:
        b["loss_scale"] = scale
    return batches


def per_token_loss(loss: torch.Tensor, loss_mask: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """``lm_loss`` (sum / count of the micro-batch, count clamped at 1) -> sum * loss_scale. An empty micro-batch
    gives 0 (count 0), still through the graph, so every parameter gets its (zero) gradient."""
    return loss * (loss_mask.sum() * loss_scale)


class SFTPhase(PretrainPhase):
    name = "sft"
    pipeline = False

    def __init__(self, recipe, layout, vocab):
        super().__init__(recipe, layout, vocab)
        self._check_data()

    def _check_data(self) -> None:
        """SFT on data without loss masks would train on prompts: refuse when no train data set has any."""
        masked = {}
        for ref in self.recipe.data.train:
            manifest = Path(ref.path) / "manifest.json"
            if manifest.exists():
                masked[ref.path] = int(json.loads(manifest.read_text()).get("num_masked_docs", 0))
        if masked and not any(masked.values()):
            raise ValueError(f"recipe: data.train: phase sft needs chat data (documents with loss masks, from "
                             f"'messages' records); none of {', '.join(masked)} has any")

    def prepare(self, micro_batches: list[dict]) -> list[dict]:
        """Every micro-batch of this rank's share of the update, before the first forward."""
        return set_loss_scales(micro_batches, self.layout)

    def eval_batches(self) -> list[dict]:
        """Validation batches, normalised per token over all of them (and all ranks) like a training step."""
        batches = super().eval_batches()
        return set_loss_scales(batches, self.layout) if batches else batches

    def loss(self, model, batch: dict):
        """Per-token-normalised loss of one micro-batch (``loss_scale`` from ``prepare``; without it, the
        pretraining mean over this micro-batch) and its statistics."""
        loss, model_stats = self.model_loss(model, batch)
        if "loss_scale" in batch:
            loss = per_token_loss(loss, batch["loss_mask"], batch["loss_scale"])
        return loss, self.lm_stats(loss, model_stats)
