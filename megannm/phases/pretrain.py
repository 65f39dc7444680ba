"""The pretraining objective: next token over every token, per-modality loss weights (applied by ``lm_loss``).

The phase supplies the loader's micro-batches and the model's loss; the Trainer does the rest. The loss of a
micro-batch is ``lm_loss``'s mean over its loss tokens (DeepSpeed then averages micro-batches and ranks); the
logged text and image losses are per token over the whole step. SFT (``phases/sft.py``) reuses the batches and
statistics with another normalisation. This is the one objective a pipeline's last stage computes.
"""
from __future__ import annotations

from pathlib import Path

from megannm.train.phase import Phase
from megannm.train.stats import Stats


class PretrainPhase(Phase):
    name = "pretrain"
    pipeline = True

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
                                    caption_dropout=d.caption_dropout, plan_dir=d.plan_dir,
                                    plan_samples=self.recipe.schedule.train_steps * d.global_batch_size,
                                    # with pipeline stages a step's micro-batches go to train_batch as one list:
                                    # read the next step's during this one (data.prefetch 0: no thread at all)
                                    prefetch=(max(d.prefetch, self.recipe.grad_accum(self.layout.world_size))
                                              if d.prefetch and self.layout.pp > 1 else d.prefetch),
                                    tp_group=self.layout.tp_group, balance=d.balance)

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
    def model_loss(self, model, batch: dict):
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     document_ids=batch["document_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"])

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
