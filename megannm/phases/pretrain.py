"""The pretraining objective: next token over every token, per-modality loss weights (applied by ``lm_loss``).

The phase supplies the loader's micro-batches and the model's loss; the Trainer does the rest. The loss of a
micro-batch is ``lm_loss``'s mean over its loss tokens (DeepSpeed then averages micro-batches and ranks); the
logged text and image losses are per token over the whole step. SFT (``phases/sft.py``) reuses the batches and
statistics with another normalisation. This is the one objective a pipeline's last stage computes.
"""
from __future__ import annotations

from megannm.model.latents import flow_arguments
from megannm.train.phase import Phase, data_iterator
from megannm.train.stats import Stats


class PretrainPhase(Phase):
    name = "pretrain"
    pipeline = True

    # data ---------------------------------------------------------------------------------------------------------
    def train_batches(self, consumed_samples: int):
        return data_iterator(self.recipe, self.layout, self.vocab, consumed=consumed_samples)

    def eval_batches(self) -> list[dict]:
        return list(data_iterator(self.recipe, self.layout, self.vocab, split="valid"))

    # objective ----------------------------------------------------------------------------------------------------
    def model_loss(self, model, batch: dict):
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     document_ids=batch["document_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
                     **flow_arguments(batch))

    def loss(self, model, batch: dict):
        loss, model_stats = self.model_loss(model, batch)
        return loss, self.lm_stats(loss, model_stats)

    def lm_stats(self, loss, model_stats: dict) -> Stats:
        """Sums of one micro-batch: its loss, per-modality summed losses and token counts, the z-loss term."""
        g = lambda k: model_stats.get(k, 0.0)
        return Stats(loss=loss if loss is not None else 0.0, text_loss_sum=g("text_loss") * g("text_tokens"),
                     text_tokens=g("text_tokens"), image_loss_sum=g("image_loss") * g("image_tokens"),
                     image_tokens=g("image_tokens"), z_loss=g("z_loss"), micro_batches=1)

    def summarize(self, s: dict) -> dict:
        n = max(s["micro_batches"], 1.0)
        out = {"loss": s["loss"] / n, "z_loss": s["z_loss"] / n}
        if s["text_tokens"]:
            out["text_loss"] = s["text_loss_sum"] / s["text_tokens"]
        if s["image_tokens"]:
            out["image_loss"] = s["image_loss_sum"] / s["image_tokens"]
        out["text_tokens"] = s["text_tokens"]
        out["image_tokens"] = s["image_tokens"]
        return out
