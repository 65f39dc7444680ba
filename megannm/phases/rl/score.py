"""``megannm score``: the mean verifiable reward of a checkpoint's sampled answers, and its win rate against another.

    megannm score runs/grpo/checkpoints --tokenizers runs/demo/tokenizers --prompts toy_image --split heldout \
        --rewards 'toy_image,toy_image_*=0' --against runs/demo/runs/sft/checkpoints

Both checkpoints answer the same prompts with the same sampling seed; the win rate is P(reward > other's) + half the
ties. A reward of weight 0 is reported beside the total without counting in it; ``name_*`` stands for every
registered reward of that name (e.g. one per attribute). Prints a table and one JSON line (also written to
``--json``).
"""
from __future__ import annotations

import time

import torch

from megannm.rewards import Combined, parse_weights

# answers decoding together in the offline commands (hundreds of prompts): image and text rows mixed, the KV
# cache's memory as in generate's default batch
OFFLINE_BATCH = 64


def score_model(model, tok, items, combined: Combined, sampling, cfg_scale: float = 1.0, max_new_tokens: int = 32,
                samples: int = 1):
    """Rewards [n * samples] of ``samples`` answers per prompt and each reward's values."""
    from megannm.phases.rl.rollout import sample_and_score
    repeated = [it for it in items for _ in range(samples)]
    return sample_and_score(model, tok, repeated, combined, sampling, cfg_scale, max_new_tokens,
                            batch_size=OFFLINE_BATCH)


def summary(scored) -> dict:
    out = {"reward": float(scored.rewards.mean())}
    out.update({n: float(x.mean()) for n, x in scored.parts.items()})
    return out


def win_rate(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a > b).double().mean() + 0.5 * (a == b).double().mean())


def score_checkpoints(checkpoint, tokenizers, prompts: str, rewards: str, against=None, split: str = "heldout",
                      n: int = 200, samples: int = 1, temperature: float = 1.0, cfg_scale: float = 1.0,
                      max_new_tokens: int = 32, seed: int = 0) -> dict:
    """What ``megannm score`` runs: the mean rewards of ``checkpoint``'s answers (and of ``against``'s, with the win
    rate), ``rewards`` as ``parse_weights`` reads it. Returns the result that the command prints as JSON."""
    from megannm.generate import SamplingConfig
    from megannm.checkpoint.opened import open_checkpoint
    from megannm.phases.rl.prompts import PromptSource
    t0 = time.time()
    weights = parse_weights(rewards)
    combined = Combined(weights)
    source = PromptSource(prompts, key="--prompts")
    sampling = SamplingConfig.from_options(temperature=temperature, seed=seed)
    result = {"prompts": prompts, "split": split, "n": n, "samples": samples, "temperature": temperature,
              "cfg_scale": cfg_scale, "rewards": {k: v for k, v in weights.items() if v}}
    scored = {}
    with open_checkpoint(checkpoint, tokenizers) as ck:
        # [seed, 17]: the prompts of `megannm pairs` with the same seed, kept apart from the sampling seed's stream
        items = source.sample(ck.tok, n, [seed, 17], split)
        for name, path in (("model", checkpoint), ("against", against)):
            if path is None:
                continue
            model = ck.model if name == "model" else ck.load(path)
            scored[name] = score_model(model, ck.tok, items, combined, sampling, cfg_scale, max_new_tokens, samples)
            result[name] = {"checkpoint": str(path), **summary(scored[name])}
    if "against" in scored:
        result["win_rate"] = win_rate(scored["model"].rewards, scored["against"].rewards)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def format_scores(result: dict) -> str:
    """The table ``megannm score`` prints above its JSON line."""
    lines = []
    for name in ("model", "against"):
        if name in result:
            r = result[name]
            lines.append(f"{name:8s} reward {r['reward']:.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                                         if k not in ("checkpoint", "reward")))
    if "win_rate" in result:
        lines.append(f"win rate of {result['model']['checkpoint']} against {result['against']['checkpoint']}: "
                     f"{result['win_rate']:.3f}")
    return "\n".join(lines)
