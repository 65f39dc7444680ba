"""Sampling answers to prompts and scoring them with verifiable rewards: GRPO's rollout, DPO's pair builder and
``megannm score`` all go through ``sample_and_score``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megannm.phases.rl.prompts import PromptItem
from megannm.rewards import Combined, make_samples


@dataclass
class Scored:
    items: list[PromptItem]  # one per answer (a prompt repeated group_size times)
    answers: list[list[int]]  # answer ids as trained: an image's codes, a text's tokens and its stop token
    rewards: torch.Tensor  # [n] total
    parts: dict = field(default_factory=dict)  # reward name -> [n]


def sample_and_score(model, tok, items: list[PromptItem], combined: Combined, sampling, cfg_scale: float = 1.0,
                     max_new_tokens: int = 32, batch_size: Optional[int] = None) -> Scored:
    """Generate one answer per item and score each. Image and text answers decode together, left-padded, in ONE
    loop over one KV cache (``megannm.generate``: per-row allowed ids, lengths and stops), ``batch_size`` rows at a
    time (None: all of them; a cap bounds the cache's memory)."""
    from megannm.generate import generate
    v = tok.vocab
    check_room(items, v.image_grid, max_new_tokens, model.args.max_seq_len)
    end = v.special("<|end|>")
    answers = generate(model, v, [it.prompt.ids for it in items], [it.prompt.kind for it in items],
                       max_new_tokens=max_new_tokens, sampling=sampling, cfg_scale=cfg_scale,
                       batch_size=batch_size or max(len(items), 1), stop_ids=(end,), keep_stop=True, pad=True)
    stops = {v.eos_id, end}
    samples = [None] * len(items)
    for kind in ("image", "text"):
        idx = [i for i, it in enumerate(items) if it.prompt.kind == kind]
        rows = [[t for t in answers[i] if t not in stops] for i in idx]
        # a text answer that ran out of tokens before its stop token was cut off (the format reward scores it 0)
        ended = [bool(answers[i]) and answers[i][-1] in stops for i in idx] if kind == "text" else None
        for i, s in zip(idx, make_samples(tok, rows, kind, ended) if idx else []):
            samples[i] = s
    # one call per reward for the whole rollout: a reward server answers a batch per round trip
    totals, parts = combined.score_batch([it.prompt for it in items], samples, [it.truth for it in items])
    return Scored(items, answers, torch.tensor(totals, dtype=torch.float64),
                  {n: torch.tensor(x, dtype=torch.float64) for n, x in parts.items()})


def check_room(items: list[PromptItem], grid: int, max_new_tokens: int, context: int) -> None:
    """Every prompt with its longest answer (an image's codes, or ``max_new_tokens`` of text) must fit the model's
    context, else one line naming the option and the room there is (not the KV cache's size)."""
    for kind, new in (("text", max_new_tokens), ("image", grid)):
        longest = max((len(it.prompt.ids) for it in items if it.prompt.kind == kind), default=0)
        if longest and longest + new > context:
            if kind == "text":
                what = f"--max-new-tokens {max_new_tokens} (phase.options.max_new_tokens in a recipe)"
                fix = f"at most {max(context - longest, 0)}"
            else:
                what, fix = f"an image's {grid} codes", "shorten the prompts"
            raise ValueError(f"{what}: after a prompt of {longest} tokens that exceeds the model's context of "
                             f"{context} tokens (max_seq_len): {fix}")
