"""GRPO (DeepSeekMath, arXiv 2402.03300) with verifiable rewards, in both directions (text -> image, image -> text).

One step of this phase is one rollout followed by several optimizer updates (``Phase.step_work``):

1. **Rollout.** Each data-parallel rank samples ``group_size`` answers to each of its ``prompts_per_step / dp``
   prompts (any prompt source, ``phases/rl/prompts.py``) from the current policy, modality-constrained
   (``megannm.generate``; under ZeRO-3 from a gathered copy, ``phases/rl/reference.py``): image and text answers of
   all the rank's prompts decode together in one loop over one KV cache (``rollout_batch_size`` caps the rows),
   and are scored with the recipe's rewards (``megannm.rewards``, weighted sum).
2. **Advantages**, group-relative: ``A = (r - mean(group)) / (std(group) + eps)`` (sample std, as TRL;
   ``scale_rewards: false`` drops the division, as Dr. GRPO does); every token of an answer gets its answer's
   advantage. With ``dynamic_sampling`` (DAPO), a group whose rewards are all equal (all right or all wrong: zero
   advantage, nothing to learn but the KL) is left out of the loss and of its normaliser.
3. **Fixed log-probs, once per rollout** (no gradient): ``log pi_old`` of the policy before any update (skipped for a
   single update, where pi_old is the current policy, detached) and ``log pi_ref`` of the frozen reference (the
   policy's starting weights in the training dtype: copied from the live policy at step 0, or after a resume read
   from this rank's slice of ``checkpoint.init_from``).
4. **Updates**: ``ppo_epochs`` passes in ``mini_batches`` mini-batches each (reshuffled after the first pass), which
   the Trainer runs like any other phase's; per answer token t::

       ratio_t = exp(log pi(t) - log pi_old(t))
       pg_t    = -min(ratio_t A, clip(ratio_t, 1 - clip_ratio, 1 + clip_ratio_high) A)
       kl_t    = exp(log pi_ref(t) - log pi(t)) - (log pi_ref(t) - log pi(t)) - 1      (k3, as in GRPO)
       l_t     = pg_t + kl_coef kl_t

**Normalisation** (``loss_normalisation``), over a mini-batch of G answers o_i on all data-parallel ranks:

- ``token`` (default, DAPO arXiv 2503.14476): ``sum_i sum_t l_t / sum_i |o_i|``: every token weighs the same
  however long its answer;
- ``sequence`` (the GRPO paper): ``1/G sum_i 1/|o_i| sum_t l_t``: each answer weighs the same, so a long answer's
  tokens weigh less (for text -> image, one grid per answer, it equals ``token``);
- ``dr_grpo`` (Dr. GRPO, arXiv 2503.20783): ``1/G sum_i 1/L sum_t l_t`` with L a constant, the longest answer the
  sampler allows (``max_new_tokens``, or the image grid): no length bias; advantages are then not divided by the
  std either (``scale_rewards`` defaults to false and may not be true).

Each answer gets a weight for its tokens and a share of the normaliser (``phases/rl/objective.py``); the shares are
summed over the data-parallel group once per rollout, and each micro-batch's weighted sum is scaled by
``accum * dp / normaliser``: DeepSpeed's division by the accumulation steps and its average over ranks leave
exactly the formula above. Dynamic sampling zeroes a dropped answer's weight and share instead of removing it: every
update keeps its ``accum`` micro-batches on every rank and every rank runs the same collectives (refilling the batch
with new prompts would make the rollout's length depend on the rewards, rank by rank). Log-probs are of the model's
own distribution over the whole vocabulary at the sampling temperature (``phases/rl/logprobs.py``); the modality
constraint only shapes which tokens are sampled. Classifier-free guidance is refused (``cfg_scale`` must be 1): the
samples would come from the guided distribution while every log-prob above is the conditional model's, so the
first update's ratio would not be 1 and neither ratio nor KL would describe the sampling policy. The learning-rate
schedule counts rollout steps.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from megannm import parallel
from megannm.phases.rl.logprobs import collate, token_logprobs
from megannm.phases.rl.objective import answer_weights, group_advantages, token_loss
from megannm.phases.rl.prompts import PromptItem, PromptSource
from megannm.phases.rl.reference import PolicyCopy, frozen_reference
from megannm.phases.rl.rollout import Scored, sample_and_score
from megannm.rewards import Combined
from megannm.train.phase import Phase, StepContext, StepWork
from megannm.train.stats import Stats


# ---------------------------------------------------------------------------------------------------------------------
# the phase


class GRPOPhase(Phase):
    name = "grpo"

    @classmethod
    def check(cls, recipe, source: str = "recipe") -> None:
        """The rewards resolve (registered, installed or importable) and the prompt source exists."""
        cls._rewards(recipe.phase.options, source)
        PromptSource(recipe.phase.options.prompts, key=f"{source}: phase.options.prompts")

    @staticmethod
    def _rewards(o, source: str) -> Combined:
        try:
            return Combined(o.rewards)
        except ValueError as e:
            raise ValueError(f"{source}: phase.options.rewards: {str(e).removeprefix('rewards: ')}") from None

    def __init__(self, recipe, layout, vocab):
        super().__init__(recipe, layout, vocab)
        self.opts = o = recipe.phase.options  # typed and cross-checked by the recipe schema
        self.rewards = self._rewards(o, "recipe")
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

    def _ensure_reference(self, step: int) -> None:
        """The frozen reference, once, before the first rollout (the engine then holds its starting or resumed
        weights): at step 0 a copy of the live policy, after a resume this rank's slice of ``init_from``
        (``phases/rl/reference.py``)."""
        if self.opts.kl_coef > 0 and self.reference is None:
            self.reference = frozen_reference(self.recipe, self.layout, self.vocab, self.model_args, self.engine,
                                              fresh=step == 0)

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
        failed = None
        try:
            scored = sample_and_score(self._policy_for_sampling(), self.tok, items, self.rewards,
                                      self.sampling(step), o.cfg_scale, o.max_new_tokens, o.rollout_batch_size)
        except Exception as e:  # noqa: BLE001 - e.g. a reward server gone: re-raised below, on every rank
            failed = e
        self._agree_on_failure(failed)
        self.engine.train()
        grouped = scored.rewards.view(len(prompts), o.group_size)
        adv = group_advantages(grouped, o.adv_eps, o.std_scaled).reshape(-1).float()
        stats = Stats(groups=len(prompts), zero_std_groups=(grouped.std(1) == 0).sum(), answers=len(items),
                      reward=scored.rewards.sum(), reward_sq=(grouped ** 2).sum(),
                      answer_tokens=sum(len(a) for a in scored.answers),
                      **{f"reward/{n}": x.sum() for n, x in scored.parts.items()})
        if o.dynamic_sampling:
            stats.add("dropped_groups", (~self._kept(scored)).view(len(prompts), o.group_size)[:, 0].sum())
        return scored, adv, stats

    def _agree_on_failure(self, failed: Exception | None) -> None:
        """One all-reduce over every rank after the rollout, so that a failure on one rank (its reward server
        died) stops all of them at the same point, before any update, instead of leaving the others waiting in the
        next collective. The failing rank raises its own error; the others a silent one (it prints)."""
        flag = torch.tensor([0.0 if failed is None else 1.0], device=parallel.device())
        parallel.all_reduce(flag, op="max")
        if failed is not None:
            raise failed
        if float(flag) > 0:
            e = RuntimeError(f"rank {self.layout.rank}: another rank's rollout failed (it says how)")
            e.silent, e.exit_code = True, 1
            raise e

    def _kept(self, scored: Scored) -> torch.Tensor:
        """[n] bool: the answers whose group has some spread of rewards (all, without dynamic sampling)."""
        g = self.opts.group_size
        grouped = scored.rewards.view(-1, g)
        if not self.opts.dynamic_sampling:
            return torch.ones(grouped.numel(), dtype=torch.bool)
        return (grouped != grouped[:, :1]).any(dim=1).repeat_interleave(g)

    def _weights(self, scored: Scored) -> tuple[np.ndarray, np.ndarray]:
        """Every answer's per-token weight and normaliser share (``phases/rl/objective.py``) under the recipe's
        options."""
        o = self.opts
        lengths = np.array([len(a) for a in scored.answers])
        longest = np.array([self.vocab.image_grid if it.prompt.kind == "image" else o.max_new_tokens
                            for it in scored.items])
        return answer_weights(lengths, longest, o.loss_normalisation, self._kept(scored).numpy())

    def step_work(self, ctx: StepContext, batches=None) -> StepWork:
        """One rollout, then ppo_epochs x mini_batches updates over it (each ``accum`` micro-batches)."""
        self._ensure_reference(ctx.step)
        t0 = time.perf_counter()
        scored, adv, stats = self.rollout(ctx.step)
        stats.add("rollout_s", time.perf_counter() - t0)
        weights, shares = self._weights(scored)
        orders, counts = self._passes(scored, ctx.step, shares)
        old, ref = self._fixed_logprobs(scored, orders[0])
        o, dp, mbs = self.opts, self.layout.dp, self.recipe.data.micro_batch_size
        per_mini = len(scored.answers) // o.mini_batches
        updates = []
        for e, order in enumerate(orders):
            for m in range(o.mini_batches):
                # DeepSpeed divides by accum and averages over dp: what is left is sum / normaliser
                scale = ctx.accum * dp / float(counts[e, m]) if counts[e, m] > 0 else 0.0
                updates.append([self._micro_batch(scored, order[s:s + mbs], adv, old, ref, scale, weights)
                                for s in range(m * per_mini, (m + 1) * per_mini, mbs)])
        return StepWork(updates, stats)

    def _passes(self, scored: Scored, step: int, shares: np.ndarray) -> tuple[list[np.ndarray], torch.Tensor]:
        """The order of the answers in every pass (the first as sampled, later ones shuffled) and the normaliser of
        every (pass, mini-batch): its answers' shares (tokens, or answers) summed over the data-parallel group."""
        o, n = self.opts, len(scored.answers)
        per_mini = n // o.mini_batches
        orders = [np.arange(n)] + [np.random.default_rng([self.recipe.data.seed, step, self.layout.dp_rank, 2, e])
                                   .permutation(n) for e in range(1, o.ppo_epochs)]
        counts = torch.tensor([[shares[order[m * per_mini:(m + 1) * per_mini]].sum() for m in range(o.mini_batches)]
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

    def _micro_batch(self, scored: Scored, idx, adv, old: dict, ref: dict, scale: float,
                     weights: np.ndarray) -> dict:
        """A micro-batch of answers with everything its loss needs: advantages, the fixed log-probs laid out like
        the labels (0 off the answer tokens, where the loss never reads them), each answer's per-token weight and
        the normalising scale."""
        b = collate([scored.items[i].prompt.ids for i in idx], [scored.answers[i] for i in idx], self.vocab.pad_id)
        on = b["mask"] > 0
        b["adv"] = adv[torch.as_tensor(idx)]
        for key, store in (("old_logp", old), ("ref_logp", ref)):
            if store:
                full = torch.zeros(on.shape, dtype=torch.float32)
                for row, i in enumerate(idx):
                    full[row][on[row]] = store[int(i)].float().cpu()
                b[key] = full
        b["row_weight"] = torch.as_tensor(weights[np.asarray(idx)], dtype=torch.float32)
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
        per_row = batch["row_weight"].to(logp.device)[:, None]  # the normalisation's weight of each answer's terms
        loss = (torch.where(on, t["loss"], 0.0) * per_row).sum() * batch["loss_scale"]
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
        if "dropped_groups" in s:
            out["dropped_groups"] = s["dropped_groups"] / max(s["groups"], 1.0)
        for k in s:
            if k.startswith("reward/"):
                out[k] = s[k] / n
        return out
