"""DPO (Rafailov et al., arXiv 2305.18290) on preference pairs, against a frozen reference.

    loss = -log sigmoid(beta * ((log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))))

with sequence log-probs summed over the answer tokens only (the prompt is context, never scored), from the head's
vocab-parallel logits (``grpo.token_logprobs``: TP-safe). The loss is the mean over the pairs of the global batch
(``data.global_batch_size`` counts pairs; a micro-batch of ``data.micro_batch_size`` pairs holds 2 x that many
sequences, chosen first). The reference is a plain frozen ``NMMModel`` from ``checkpoint.init_from`` (or, without
one, the policy's seeded initial weights: ``grpo.frozen_reference``); its log-probs are computed per micro-batch
without gradient. Logged: the loss, reward accuracy (the fraction of pairs whose implicit reward
``beta * (log pi - log pi_ref)`` ranks the chosen answer first), the mean margin and both implicit rewards.

Pairs come from ``megannm pairs`` (``build_pairs``): two answers sampled per prompt from a checkpoint, ranked by the
verifiable rewards of ``megannm.rewards``; pairs with equal rewards are dropped. They are written as one JSONL file
of token ids (``pairs.jsonl``: prompt, chosen, rejected, both rewards, the truth) beside a ``manifest.json`` (vocab
fingerprint, counts, source checkpoint, rewards) that the phase checks.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from megannm import parallel
from megannm.phases.grpo import (TOY_SOURCES, _Sums, collate, frozen_reference, parse_options, prompt_items,
                                 sample_and_score, token_logprobs)
from megannm.rewards import Combined, parse_weights

PAIRS, MANIFEST = "pairs.jsonl", "manifest.json"


class DPOOptions(BaseModel):
    """``phase.options`` of a DPO recipe."""
    model_config = ConfigDict(extra="forbid")
    pairs: str = Field(description="A folder written by `megannm pairs` (pairs.jsonl + manifest.json).")
    beta: float = Field(0.1, gt=0, description="Strength of the KL constraint to the reference (DPO's beta).")


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float):
    """Per-pair DPO loss and implicit rewards from sequence log-probs [n]: (loss [n], reward_c [n], reward_r [n])."""
    reward_c, reward_r = beta * (logp_c - ref_c), beta * (logp_r - ref_r)
    return -F.logsigmoid(reward_c - reward_r), reward_c.detach(), reward_r.detach()


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Sum of the answer tokens' log-probs per sequence [B] (``batch["mask"]`` marks them)."""
    lp, _ = token_logprobs(model, batch, with_entropy=False)
    return torch.where(batch["mask"] > 0, lp, 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------------------------
# pairs


def read_pairs(folder, vocab=None) -> list[dict]:
    folder = Path(folder)
    if not (folder / MANIFEST).exists() or not (folder / PAIRS).exists():
        raise FileNotFoundError(f"recipe: phase.options.pairs: {folder}: not a pairs folder (expected {PAIRS} and "
                                f"{MANIFEST}, written by `megannm pairs`)")
    manifest = json.loads((folder / MANIFEST).read_text())
    if vocab is not None:
        vocab.check_same(manifest.get("vocab_fingerprint", "?"), "the recipe's vocabulary", str(folder / MANIFEST))
    pairs = []
    for n, line in enumerate((folder / PAIRS).read_text().splitlines(), 1):
        if line.strip():
            r = json.loads(line)
            missing = {"prompt", "chosen", "rejected"} - set(r)
            if missing:
                raise ValueError(f"{folder / PAIRS}:{n}: a pair needs {', '.join(sorted(missing))}")
            pairs.append(r)
    if len(pairs) != manifest.get("pairs", len(pairs)):
        raise ValueError(f"{folder / PAIRS}: {len(pairs)} pairs, the manifest says {manifest['pairs']} (truncated?)")
    if not pairs:
        raise ValueError(f"{folder / PAIRS}: no pairs")
    return pairs


def build_pairs(model, tok, items, combined: Combined, sampling, cfg_scale: float = 1.0,
                max_new_tokens: int = 32) -> tuple[list[dict], int]:
    """Two sampled answers per prompt item, ranked by the verifier; ties dropped. Returns (pairs, ties)."""
    doubled = [it for it in items for _ in range(2)]
    s = sample_and_score(model, tok, doubled, combined, sampling, cfg_scale, max_new_tokens)
    pairs, ties = [], 0
    for k, it in enumerate(items):
        a, b = 2 * k, 2 * k + 1
        ra, rb = float(s.rewards[a]), float(s.rewards[b])
        if ra == rb:
            ties += 1
            continue
        c, r = (a, b) if ra > rb else (b, a)
        truth = it.truth.as_dict() if hasattr(it.truth, "as_dict") else it.truth
        pairs.append({"prompt": it.prompt.ids, "chosen": s.answers[c], "rejected": s.answers[r],
                      "reward_chosen": float(s.rewards[c]), "reward_rejected": float(s.rewards[r]),
                      "kind": it.prompt.kind, "prompt_text": it.prompt.text, "truth": truth})
    return pairs, ties


def write_pairs(folder, pairs: list[dict], manifest: dict) -> Path:
    """``pairs.jsonl`` then ``manifest.json``, each through a temporary name (the manifest last: complete or absent)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (PAIRS + ".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    os.replace(tmp, folder / PAIRS)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({**manifest, "pairs": len(pairs)}, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return folder


def pairs_main(argv: list[str]) -> int:
    """``megannm pairs``: sample two answers per prompt from a checkpoint, rank them with the verifier, write pairs."""
    p = argparse.ArgumentParser(prog="megannm pairs", description="Preference pairs for DPO: two sampled answers "
                                "per prompt from a checkpoint, ranked by verifiable rewards; ties dropped.")
    p.add_argument("checkpoint", help="checkpoint folder (or its parent holding `latest`)")
    p.add_argument("--tokenizers", required=True)
    p.add_argument("--out", required=True, help="folder for pairs.jsonl + manifest.json")
    p.add_argument("--prompts", default="toy_image", help=f"{', '.join(TOY_SOURCES)}, or a JSONL prompt file")
    p.add_argument("--split", default="seen", choices=("seen", "heldout", "all"))
    p.add_argument("--n", type=int, default=1000, help="prompts (pairs before dropping ties)")
    p.add_argument("--rewards", default="toy_image", help="comma-separated reward names (name=weight allowed)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from megannm.convert.deepspeed import load_model
    from megannm.data.tokenize import Tokenizers
    from megannm.generate import SamplingConfig
    t0 = time.time()
    combined = Combined(parse_weights(a.rewards))
    layout = parallel.init_parallel(1, 1)
    try:
        tok = Tokenizers.load(a.tokenizers)
        model, _ = load_model(a.checkpoint, layout, vocab=tok.vocab)
        items = prompt_items(tok, a.prompts, a.n, a.seed, a.split)
        sampling = SamplingConfig(greedy=False, temperature=a.temperature, seed=a.seed)
        pairs, ties = build_pairs(model, tok, items, combined, sampling, a.cfg_scale, a.max_new_tokens)
        write_pairs(a.out, pairs, {"vocab_fingerprint": tok.vocab.fingerprint, "checkpoint": str(a.checkpoint),
                                   "prompts": a.prompts, "split": a.split, "rewards": combined.weights,
                                   "temperature": a.temperature, "cfg_scale": a.cfg_scale, "seed": a.seed,
                                   "prompts_sampled": a.n, "ties_dropped": ties})
    finally:
        parallel.shutdown()
    print(f"{len(pairs)} pairs ({ties} ties dropped of {a.n} prompts) -> {Path(a.out) / PAIRS} "
          f"({time.time() - t0:.0f} s)")
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# the phase


class DPOPhase:
    name = "dpo"

    def __init__(self, recipe, layout, vocab):
        self.recipe, self.layout, self.vocab = recipe, layout, vocab
        self.opts = parse_options(DPOOptions, recipe.phase.options, self.name)
        if layout.pp != 1:
            raise ValueError(f"recipe: parallel.pipeline_parallel: phase dpo runs at pipeline size 1 (got {layout.pp})")
        self.pairs = read_pairs(self.opts.pairs, vocab)
        longest = max(len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in self.pairs) - 1
        if longest > recipe.model.max_seq_len:
            raise ValueError(f"recipe: model.max_seq_len: a pair in {self.opts.pairs} needs {longest} positions "
                             f"(got max_seq_len={recipe.model.max_seq_len})")
        self.reference = None

    def train_batches(self, consumed_samples: int):
        """This rank's micro-batches of pairs, in a global order that is a pure function of (seed, epoch): a step
        takes the next ``global_batch_size`` pairs, rank r the r-th slice of them; resumable from the count."""
        d, lay = self.recipe.data, self.layout
        n, per_rank = len(self.pairs), d.global_batch_size // lay.dp
        k = consumed_samples
        while True:
            for s in range(k + lay.dp_rank * per_rank, k + (lay.dp_rank + 1) * per_rank, d.micro_batch_size):
                idx = [self._order(i) for i in range(s, s + d.micro_batch_size)]
                chosen = [self.pairs[i] for i in idx]
                prompts = [p["prompt"] for p in chosen] * 2
                answers = [p["chosen"] for p in chosen] + [p["rejected"] for p in chosen]
                yield collate(prompts, answers, self.vocab.pad_id)
            k += d.global_batch_size

    def _order(self, i: int) -> int:
        n = len(self.pairs)
        epoch, j = divmod(i, n)
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = np.random.default_rng([self.recipe.data.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[j])

    def eval_batches(self) -> list:
        return []

    def micro_loss(self, engine, batch: dict):
        """Mean DPO loss over this micro-batch's pairs and its statistics."""
        m = batch["input_ids"].shape[0] // 2
        logp = sequence_logprobs(engine, batch)
        with torch.no_grad():
            ref = sequence_logprobs(self.reference, batch)
        loss, rc, rr = dpo_loss(logp[:m], logp[m:], ref[:m], ref[m:], self.opts.beta)
        margin = rc - rr
        stats = {"loss": float(loss.detach().sum()), "pairs": m, "accuracy": float((margin > 0).sum()),
                 "margin": float(margin.sum()), "reward_chosen": float(rc.sum()), "reward_rejected": float(rr.sum()),
                 "logp_chosen": float(logp[:m].detach().sum()), "logp_rejected": float(logp[m:].detach().sum())}
        return loss.mean(), stats

    def train_step(self, trainer, batches) -> dict:
        """The Trainer's hook: the usual accumulation over micro-batches, with DPO's statistics."""
        if self.reference is None:
            self.reference = frozen_reference(self.recipe, self.layout, self.vocab, trainer.args)
        dev = parallel.device()
        sums = _Sums()
        for _ in range(trainer.accum):
            batch = {k: v.to(dev) for k, v in next(batches).items()}
            loss, stats = self.micro_loss(trainer.engine, batch)
            trainer.engine.backward(loss)
            trainer.engine.step()
            for k, x in stats.items():
                sums.add(k, x)
        s = sums.reduce()
        n = max(s.pop("pairs"), 1.0)
        return {k: x / n for k, x in s.items()}
