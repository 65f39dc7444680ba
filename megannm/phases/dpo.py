"""DPO (Rafailov et al., arXiv 2305.18290) on preference pairs, against a frozen reference.

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))))

with sequence log-probs summed over the answer tokens only (the prompt is context, never scored), from the head's
vocab-parallel logits (``phases/rl/logprobs.py``: TP-safe). The loss is the mean over the pairs of the global batch
(``data.global_batch_size`` counts pairs; a micro-batch of ``data.micro_batch_size`` pairs holds 2 x that many
sequences, chosen first). The reference is a plain frozen ``NMMModel`` holding the policy's starting weights in the
training dtype (copied from the live policy when the run starts, read from this rank's slice of
``checkpoint.init_from`` after a resume: ``phases/rl/reference.py``); its log-probs are computed per micro-batch
without gradient. Logged: the loss, reward accuracy (the fraction of pairs whose implicit reward
``beta * (log pi - log pi_ref)`` ranks the chosen answer first), the mean margin and both implicit rewards.

Pairs come from ``megannm pairs`` (``phases/rl/pairs.py``): two answers sampled per prompt from a checkpoint, ranked by
the
verifiable rewards of ``megannm.rewards``; pairs with equal rewards are dropped. They are written as one JSONL file
of token ids (``pairs.jsonl``: prompt, chosen, rejected, both rewards, the truth) beside a ``manifest.json`` (vocab
fingerprint, counts, source checkpoint, rewards) that the phase checks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from megannm.phases.rl.logprobs import collate, token_logprobs
from megannm.phases.rl.pairs import read_pairs
from megannm.phases.rl.reference import frozen_reference
from megannm.train.phase import Phase
from megannm.train.stats import Stats


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float):
    """Per-pair DPO loss and implicit rewards from sequence log-probs [n]: (loss [n], reward_c [n], reward_r [n])."""
    reward_c, reward_r = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
    return -F.logsigmoid(reward_c - reward_r), reward_c.detach(), reward_r.detach()


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of the answer tokens' log-probs per sequence [B] (``batch["mask"]`` marks them)."""
    lp, _ = token_logprobs(model, batch, with_entropy=False)
    return torch.where(batch["mask"] > 0, lp, 0.0).sum(-1)


class DPOPhase(Phase):
    name = "dpo"

    def __init__(self, recipe, layout, vocab):
        super().__init__(recipe, layout, vocab)
        self.opts = recipe.phase.options  # typed by the recipe schema
        self.pairs = read_pairs(self.opts.pairs, vocab)
        longest = max(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in self.pairs) - 1
        if longest > recipe.model.max_seq_len:
            raise ValueError(f"recipe: model.max_seq_len: a pair in {self.opts.pairs} needs {longest} positions "
                             f"(got max_seq_len={recipe.model.max_seq_len})")
        self.reference = None
        self._perm_epoch, self._perm = None, None

    def attach(self, engine, model_args) -> None:
        self.engine, self.model_args = engine, model_args

    def _ensure_reference(self, fresh: bool = False) -> None:
        """The frozen reference, once: a copy of the live policy when ``fresh`` (no step made yet), else this rank's
        slice of ``checkpoint.init_from`` (``phases/rl/reference.py``)."""
        if self.reference is None:
            self.reference = frozen_reference(self.recipe, self.layout, self.vocab, self.model_args, self.engine,
                                              fresh=fresh)

    def train_batches(self, consumed_samples: int):
        """This rank's micro-batches of pairs (see ``_batches``). The Trainer asks for them once, on every rank,
        after loading the weights and before the first step: the moment to take the reference."""
        self._ensure_reference(fresh=consumed_samples == 0)
        return self._batches(consumed_samples)

    def _batches(self, consumed_samples: int):
        """In a global order that is a pure function of (seed, epoch): a step takes the next ``global_batch_size``
        pairs, rank r the r-th slice of them; resumable from the count."""
        d, lay = self.recipe.data, self.layout
        per_rank = d.global_batch_size // lay.dp
        k = consumed_samples
        while True:
            for s in range(k + lay.dp_rank * per_rank, k + (lay.dp_rank + 1) * per_rank, d.micro_batch_size):
                chosen = [self.pairs[self._order(i)] for i in range(s, s + d.micro_batch_size)]
                prompts = [p["prompt"] for p in chosen] * 2
                answers = [p["chosen"] for p in chosen] + [p["rejected"] for p in chosen]
                yield collate(prompts, answers, self.vocab.pad_id)
            k += d.global_batch_size

    def _order(self, i: int) -> int:
        n = len(self.pairs)
        epoch, j = divmod(i, n)
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.recipe.data.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[j])

    def loss(self, model, batch: dict):
        """Mean DPO loss over this micro-batch's pairs (chosen rows first, then rejected) and its sums."""
        m = batch["input_ids"].shape[0] // 2
        logp = sequence_logprobs(model, batch)
        self._ensure_reference()  # (a loss asked for without train_batches: read, never copied mid-step)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, batch)
        loss, rc, rr = dpo_loss(logp[:m], logp[m:], ref[:m], ref[m:], self.opts.beta)
        margin = rc - rr
        stats = Stats(loss=loss.detach().sum(), pairs=m, accuracy=(margin > 0).sum(), margin=margin.sum(),
                      reward_chosen=rc.sum(), reward_rejected=rr.sum(), logp_chosen=logp[:m].detach().sum(),
                      logp_rejected=logp[m:].detach().sum())
        return loss.mean(), stats

    def summarize(self, s: dict) -> dict:
        n = max(s.pop("pairs"), 1.0)
        return {k: x / n for k, x in s.items()}
