"""GRPO (DeepSeekMath, arXiv 2402.03300) with verifiable rewards, in both directions (text -> image, image -> text).

One step of this phase is one rollout followed by several optimizer updates (``Phase.step_work``):

1. **Rollout.** Each data-parallel rank samples ``group_size`` answers to each of its ``prompts_per_step / dp``
   prompts (any prompt source, ``phases/rl/prompts.py``) from the current policy, modality-constrained
   (``megannm.generate``; under ZeRO-3 from a gathered copy, ``phases/rl/reference.py``), and scores them with the
   recipe's rewards (``megannm.rewards``, weighted sum).
2. **Advantages**, group-relative: ``A = (r - mean(group)) / (std(group) + eps)`` (sample std, as TRL;
   ``scale_rewards: false`` drops the division, as Dr. GRPO); every token of an answer gets its answer's advantage.
3. **Fixed log-probs, once per rollout** (no gradient): ``log pi_old`` of the policy before any update (skipped for a
   single update, where pi_old is the current policy, detached) and ``log pi_ref`` of the frozen reference
   (``checkpoint.init_from``, or the policy's own seeded initial weights).
4. **Updates**: ``ppo_epochs`` passes in ``mini_batches`` mini-batches each (reshuffled after the first pass), which
   the Trainer runs like any other phase's; per answer token t::

       ratio_t = exp(log pi(t) - log pi_old(t))
       pg_t    = -min(ratio_t A, clip(ratio_t, 1 - clip_ratio, 1 + clip_ratio_high) A)
       kl_t    = exp(log pi_ref(t) - log pi(t)) - (log pi_ref(t) - log pi(t)) - 1      (k3, as in GRPO)
       loss    = sum over the mini-batch's answer tokens of (pg_t + kl_coef kl_t) / N_tokens

**Token-level normalisation, as DAPO (arXiv 2503.14476)**: N_tokens counts the mini-batch's answer tokens on every
data-parallel rank (all-reduced once per rollout), so every token weighs the same however long its answer (the GRPO
paper's per-answer mean gives long answers' tokens less weight; for text -> image, one grid per answer, the two
coincide). Each micro-batch's sum is scaled by ``accum * dp / N_tokens``: DeepSpeed's division by the accumulation
steps and its average over ranks leave exactly ``sum / N_tokens``. Log-probs are of the model's own distribution
over the whole vocabulary at the sampling temperature (``phases/rl/logprobs.py``); the modality constraint and
classifier-free guidance (off by default) only shape which tokens are sampled. The learning-rate schedule counts
rollout steps.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from megannm import parallel
from megannm.phases.rl.logprobs import collate, token_logprobs
from megannm.phases.rl.prompts import PromptItem, PromptSource
from megannm.phases.rl.reference import PolicyCopy, frozen_reference
from megannm.phases.rl.rollout import Scored, sample_and_score
from megannm.rewards import Combined
from megannm.train.phase import Phase, StepContext, StepWork
from megannm.train.stats import Stats


# ---------------------------------------------------------------------------------------------------------------------
# the mathematics (pure tensor functions, tested against hand computations)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """rewards [P, G] (P prompts, G answers each) -> advantages [P, G]: (r - group mean) / (group std + eps), with
    the sample (unbiased) std; ``scale=False`` leaves r - mean."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased, GRPO's)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                      clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(ratio A, clip(ratio, 1 - low, 1 + high) A), the ratio, and where the clip is active
    (the clipped term is the smaller one, so the token's gradient is zero)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv
    return -torch.minimum(unclipped, clipped), ratio, (clipped < unclipped)


def token_loss(logp, old_logp, ref_logp, adv, clip_low: float, clip_high: float, kl_coef: float) -> dict:
    """Every per-token term of the objective (tensors shaped like ``logp``); ``ref_logp`` None = no KL term."""
    pg, ratio, clipped = clipped_surrogate(logp, old_logp, adv, clip_low, clip_high)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    return {"loss": pg + kl_coef * kl, "pg": pg, "kl": kl, "ratio": ratio, "clipped": clipped.float()}


# ---------------------------------------------------------------------------------------------------------------------
# the phase


class GRPOPhase(Phase):
    name = "grpo"

    def __init__(self, recipe, layout, vocab):
        super().__init__(recipe, layout, vocab)
        self.opts = o = recipe.phase.options  # typed and cross-checked by the recipe schema
        try:
            self.rewards = Combined(o.rewards)
        except ValueError as e:
            raise ValueError(f"recipe: phase.options.rewards: {str(e).removeprefix('rewards: ')}") from None
        self.tok = self._tokenizers()
        self.source = PromptSource(o.prompts)
        self.reference = None
        self.policy_copy = None
        self.engine = None

    def _tokenizers(self):
        from megannm.data.tokenize import Tokenizers
        folder = self.opts.tokenizers or (str(Path(self.recipe.data.vocab).parent) if self.recipe.data.vocab
                                          else None)
        if folder is None:
            raise ValueError(f"recipe: phase.options.tokenizers: phase {self.name} needs the tokenizer bundle (to "
                             f"build prompts and decode answers): set it, or data.vocab to the bundle's vocab.json")
        tok = Tokenizers.load(folder)
        self.vocab.check_same(tok.vocab.fingerprint, "the recipe's vocabulary", folder)
        return tok

    def attach(self, engine, model_args) -> None:
        self.engine, self.model_args = engine, model_args
        if self.opts.kl_coef > 0:
            self.reference = frozen_reference(self.recipe, self.layout, self.vocab, model_args)

    # the rollout --------------------------------------------------------------------------------------------------
    def prompts_for(self, step: int) -> list[PromptItem]:
        """This rank's prompts of rollout ``step``: a pure function of (seed, step, data-parallel rank)."""
        o, lay = self.opts, self.layout
        n = o.prompts_per_step // lay.dp
        first = step * o.prompts_per_step + lay.dp_rank * n
        return self.source.walk(self.tok, first, n, self.recipe.data.seed, [self.recipe.data.seed, step, lay.dp_rank],
                                o.prompt_split)

    def sampling(self, step: int):
        from megannm.generate import SamplingConfig
        o = self.opts
        seed = int(np.random.default_rng([self.recipe.data.seed, step, self.layout.dp_rank, 1]).integers(2 ** 62))
        return SamplingConfig.from_options(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, seed=seed,
                                           greedy=False)

    def _policy_for_sampling(self):
        if self.recipe.parallel.zero_stage < 3:
            return self.engine.module
        if self.policy_copy is None:
            self.policy_copy = PolicyCopy(self.engine, self.model_args, self.layout)
        return self.policy_copy.refresh()

    def rollout(self, step: int) -> tuple[Scored, torch.Tensor, Stats]:
        """Sample the groups, score them, and compute advantages [n] (groups contiguous)."""
        o = self.opts
        prompts = self.prompts_for(step)
        items = [it for it in prompts for _ in range(o.group_size)]
        self.engine.eval()
        scored = sample_and_score(self._policy_for_sampling(), self.tok, items, self.rewards, self.sampling(step),
                                  o.cfg_scale, o.max_new_tokens)
        self.engine.train()
        grouped = scored.rewards.view(len(prompts), o.group_size)
        adv = group_advantages(grouped, o.adv_eps, o.scale_rewards).reshape(-1).float()
        stats = Stats(groups=len(prompts), zero_std_groups=(grouped.std(1) == 0).sum(), answers=len(items),
                      reward=scored.rewards.sum(), reward_sq=(grouped ** 2).sum(),
                      answer_tokens=sum(len(a) for a in scored.answers),
                      **{f"reward/{n}": x.sum() for n, x in scored.parts.items()})
        return scored, adv, stats

    def step_work(self, ctx: StepContext, batches=None) -> StepWork:
        """One rollout, then ppo_epochs x mini_batches updates over it (each ``accum`` micro-batches)."""
        t0 = time.perf_counter()
        scored, adv, stats = self.rollout(ctx.step)
        stats.add("rollout_s", time.perf_counter() - t0)
        orders, counts = self._passes(scored, ctx.step)
        old, ref = self._fixed_logprobs(scored, orders[0])
        o, dp, mbs = self.opts, self.layout.dp, self.recipe.data.micro_batch_size
        per_mini = len(scored.answers) // o.mini_batches
        updates = []
        for e, order in enumerate(orders):
            for m in range(o.mini_batches):
                # DeepSpeed divides by accum and averages over dp: what is left is sum / N_tokens
                scale = ctx.accum * dp / float(counts[e, m]) if counts[e, m] > 0 else 0.0
                updates.append([self._micro_batch(scored, order[s:s + mbs], adv, old, ref, scale)
                                for s in range(m * per_mini, (m + 1) * per_mini, mbs)])
        return StepWork(updates, stats)

    def _passes(self, scored: Scored, step: int) -> tuple[list[np.ndarray], torch.Tensor]:
        """The order of the answers in every pass (the first as sampled, later ones shuffled) and the normaliser of
        every (pass, mini-batch): its answer tokens summed over the whole data-parallel group."""
        o, n = self.opts, len(scored.answers)
        per_mini = n // o.mini_batches
        orders = [np.arange(n)] + [np.random.default_rng([self.recipe.data.seed, step, self.layout.dp_rank, 2, e])
                                   .permutation(n) for e in range(1, o.ppo_epochs)]
        lengths = np.array([len(a) for a in scored.answers])
        counts = torch.tensor([[lengths[order[m * per_mini:(m + 1) * per_mini]].sum() for m in range(o.mini_batches)]
                               for order in orders], dtype=torch.float64, device=parallel.device())
        parallel.all_reduce(counts, group=self.layout.dp_group)
        return orders, counts.cpu()

    @property
    def _single_update(self) -> bool:
        """One optimizer step per rollout: pi_old is the current policy, detached; no separate forward needed."""
        return self.opts.ppo_epochs * self.opts.mini_batches == 1

    @torch.no_grad()
    def _fixed_logprobs(self, scored: Scored, order) -> tuple[dict, dict]:
        """log pi_old and log pi_ref of every answer's tokens, once per rollout (answer index -> tokens' values)."""
        old, ref = {}, {}
        if self._single_update and self.reference is None:
            return old, ref
        mbs = self.recipe.data.micro_batch_size
        for s in range(0, len(order), mbs):
            idx = order[s:s + mbs]
            b = collate([scored.items[i].prompt.ids for i in idx], [scored.answers[i] for i in idx],
                        self.vocab.pad_id, parallel.device())
            for store, model in ((old, None if self._single_update else self.engine), (ref, self.reference)):
                if model is not None:
                    lp, _ = token_logprobs(model, b, self.opts.temperature, with_entropy=False)
                    for row, i in enumerate(idx):
                        store[int(i)] = lp[row][b["mask"][row] > 0]
        return old, ref

    def _micro_batch(self, scored: Scored, idx, adv, old: dict, ref: dict, scale: float) -> dict:
        """A micro-batch of answers with everything its loss needs: advantages, the fixed log-probs laid out like
        the labels (0 off the answer tokens, where the loss never reads them) and the normalising scale."""
        b = collate([scored.items[i].prompt.ids for i in idx], [scored.answers[i] for i in idx], self.vocab.pad_id)
        on = b["mask"] > 0
        b["adv"] = adv[torch.as_tensor(idx)]
        for key, store in (("old_logp", old), ("ref_logp", ref)):
            if store:
                full = torch.zeros(on.shape, dtype=torch.float32)
                for row, i in enumerate(idx):
                    full[row][on[row]] = store[int(i)].float().cpu()
                b[key] = full
        b["loss_scale"] = scale
        return b

    # the objective ------------------------------------------------------------------------------------------------
    def loss(self, model, batch: dict):
        """The micro-batch's summed per-token objective times its normalising scale."""
        o = self.opts
        high = o.clip_ratio_high if o.clip_ratio_high is not None else o.clip_ratio
        logp, entropy = token_logprobs(model, batch, o.temperature)
        on = batch["mask"] > 0
        fill = logp.detach()  # off the answer tokens: ratio 1 and KL 0, never an overflow to multiply by zero
        old_lp = torch.where(on, batch["old_logp"], fill) if "old_logp" in batch else fill
        ref_lp = torch.where(on, batch["ref_logp"], fill) if "ref_logp" in batch else None
        a = batch["adv"].to(logp.device)[:, None].expand_as(logp)
        t = token_loss(logp, old_lp, ref_lp, a, o.clip_ratio, high, o.kl_coef)
        loss = torch.where(on, t["loss"], 0.0).sum() * batch["loss_scale"]
        accum = self.recipe.grad_accum(self.layout.world_size)
        stats = Stats(loss=loss.detach() / (accum * self.layout.dp), tokens=on.sum(),
                      entropy=torch.where(on, entropy, 0.0).sum(),
                      **{k: torch.where(on, t[k].detach(), 0.0).sum() for k in ("pg", "kl", "ratio", "clipped")})
        return loss, stats

    def summarize(self, s: dict) -> dict:
        o = self.opts
        opt_steps = o.ppo_epochs * o.mini_batches
        n, tok = max(s["answers"], 1.0), max(s.get("tokens", 0.0), 1.0)
        mean = s["reward"] / n
        out = {"loss": s.get("loss", 0.0) / opt_steps, "reward": mean,
               "reward_std": max(s["reward_sq"] / n - mean ** 2, 0.0) ** 0.5,
               "zero_std_groups": s["zero_std_groups"] / max(s["groups"], 1.0),
               "answer_len": s["answer_tokens"] / n, "pg_loss": s.get("pg", 0.0) / tok, "kl": s.get("kl", 0.0) / tok,
               "entropy": s.get("entropy", 0.0) / tok, "clip_frac": s.get("clipped", 0.0) / tok,
               "ratio": s.get("ratio", 0.0) / tok, "optimizer_steps": opt_steps,
               "rollout_s": s["rollout_s"] / self.layout.dp}
        for k in s:
            if k.startswith("reward/"):
                out[k] = s[k] / n
        return out
