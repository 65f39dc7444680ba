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

We get Megatron's weighting without touching gradients. The loader hands the phase every micro-batch of the step up
front (``prepare_step``, called by the Trainer), so N is known before the first forward: one all-reduce of the local
counts over the data-parallel group. Each micro-batch then gets ``loss_scale = accum * dp / N`` and its loss becomes
``lm_loss * count_m * loss_scale = sum_m * accum * dp / N``; DeepSpeed's backward divides by
``gradient_accumulation_steps`` (accum) and its gradient all-reduce averages over the dp ranks, which leaves exactly
``sum over the global batch / N``. The z-loss term is normalised the same way. The logged ``loss`` (mean of the
micro-batches' scaled losses over micro-batches and ranks) is then the per-token mean of the global batch.

Pipeline parallelism: the scale travels in the batch (``batch["loss_scale"]``, a float); a pipeline loss function
that multiplies its ``lm_loss`` by ``count * loss_scale`` (DeepSpeed's pipeline engine divides by the accumulation
steps and averages over dp exactly like the plain engine) gives the same normalisation, and declares it with
``PipelineLoss.applies_loss_scale = True``. Until then SFT refuses pipeline_parallel > 1 rather than silently
normalising per micro-batch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from megannm import parallel
from megannm.phases.pretrain import PretrainPhase, stats_vector


def global_loss_tokens(batches: list[dict]) -> float:
    """Loss tokens in these micro-batches summed over the data-parallel ranks (every rank calls it: a collective)."""
    local = sum(float(b["loss_mask"].sum()) for b in batches)
    t = torch.tensor([local], dtype=torch.float64, device=parallel.device())
    parallel.all_reduce(t, group=parallel.data_group())
    return float(t)


def set_loss_scales(batches: list[dict], dp: int) -> list[dict]:
    """Give each micro-batch ``loss_scale = len(batches) * dp / N`` (N: loss tokens of the global batch), in place.

    With no loss token anywhere (N = 0) the scale is 0: every loss is then 0 and the step changes nothing but still
    runs every collective."""
    n = global_loss_tokens(batches)
    scale = len(batches) * dp / n if n > 0 else 0.0
    for b in batches:
        b["loss_scale"] = scale
    return batches


def per_token_loss(loss: torch.Tensor, loss_mask: torch.Tensor, loss_scale: float) -> torch.Tensor:
    """``lm_loss`` (sum / count of the micro-batch, count clamped at 1) -> sum * loss_scale. An empty micro-batch
    gives 0 (count 0), still through the graph, so every parameter gets its (zero) gradient."""
    return loss * (loss_mask.sum() * loss_scale)


class SFTPhase(PretrainPhase):
    name = "sft"

    def __init__(self, recipe, layout, vocab):
        super().__init__(recipe, layout, vocab)
        self._check_data()
        if layout.pp > 1:
            from megannm.model.pipeline import PipelineLoss
            if not getattr(PipelineLoss, "applies_loss_scale", False):  # never silently another normalisation
                raise ValueError(f"recipe: parallel.pipeline_parallel: phase sft normalises per token over the global "
                                 f"batch, which the pipeline's loss function does not apply yet (batch['loss_scale']"
                                 f"); got pipeline_parallel={layout.pp}, expected 1")

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

    # the step --------------------------------------------------------------------------------------------------------
    def prepare_step(self, batches: list[dict]) -> list[dict]:
        """The Trainer's hook: every micro-batch of this rank's share of the step, before the first forward."""
        return set_loss_scales(batches, self.layout.dp)

    def eval_batches(self) -> list[dict]:
        """Validation batches, normalised per token over all of them (and all ranks) like a training step."""
        batches = super().eval_batches()
        return set_loss_scales(batches, self.layout.dp) if batches else batches

    def micro_loss(self, engine, batch: dict):
        """Per-token-normalised loss of one micro-batch (``loss_scale`` from ``prepare_step``; without it, the
        pretraining mean over this micro-batch) and its statistics vector."""
        loss, stats = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             document_ids=batch["document_ids"], labels=batch["labels"],
                             loss_mask=batch["loss_mask"])
        if "loss_scale" in batch:
            loss = per_token_loss(loss, batch["loss_mask"], batch["loss_scale"])
        return loss, stats_vector(loss, stats)
