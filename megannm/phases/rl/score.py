"""``megannm score``: the mean verifiable reward of a checkpoint's sampled answers, and its win rate against another.

    megannm score runs/grpo/checkpoints --tokenizers runs/demo/tokenizers --prompts toy_image --split heldout \
        --rewards 'toy_image,toy_image_*=0' --against runs/demo/runs/sft/checkpoints

Both checkpoints answer the same prompts with the same sampling seed; the win rate is P(reward > other's) + half the
ties. A reward of weight 0 is reported beside the total without counting in it; ``name_*`` stands for every
registered reward of that name (e.g. one per attribute). Prints a table and one JSON line (also written to
``--json``).
"""
from __future__ import annotations

import argparse
import json
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm score", description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("checkpoint")
    p.add_argument("--tokenizers", required=True)
    p.add_argument("--against", default=None, help="another checkpoint: its scores and the win rate")
    p.add_argument("--prompts", required=True, help="a registered prompt generator (e.g. toy_image), "
                                                    "package.module:function, or a JSONL prompt file")
    p.add_argument("--split", default="heldout", choices=("seen", "heldout", "all"))
    p.add_argument("--n", type=int, default=200, help="prompts")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt")
    p.add_argument("--rewards", required=True, help="comma-separated names (name=weight allowed; weight 0: "
                                                    "reported, not counted; name_* for a family)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    from megannm.checkpoint.opened import open_checkpoint
    from megannm.fileio import atomic_write
    from megannm.generate import SamplingConfig
    from megannm.phases.rl.prompts import PromptSource
    t0 = time.time()
    weights = parse_weights(a.rewards)
    combined = Combined(weights)
    source = PromptSource(a.prompts, key="--prompts")
    sampling = SamplingConfig.from_options(temperature=a.temperature, seed=a.seed)
    result = {"prompts": a.prompts, "split": a.split, "n": a.n, "samples": a.samples, "temperature": a.temperature,
              "cfg_scale": a.cfg_scale, "rewards": {k: v for k, v in weights.items() if v}}
    scored = {}
    with open_checkpoint(a.checkpoint, a.tokenizers) as ck:
        # [seed, 17]: the prompts of `megannm pairs` with the same seed, kept apart from the sampling seed's stream
        items = source.sample(ck.tok, a.n, [a.seed, 17], a.split)
        for name, path in (("model", a.checkpoint), ("against", a.against)):
            if path is None:
                continue
            model = ck.model if name == "model" else ck.load(path)
            scored[name] = score_model(model, ck.tok, items, combined, sampling, a.cfg_scale, a.max_new_tokens,
                                       a.samples)
            result[name] = {"checkpoint": str(path), **summary(scored[name])}
    if "against" in scored:
        result["win_rate"] = win_rate(scored["model"].rewards, scored["against"].rewards)
    result["seconds"] = round(time.time() - t0, 1)
    for name in ("model", "against"):
        if name in result:
            r = result[name]
            print(f"{name:8s} reward {r['reward']:.3f}  " + "  ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                                  if k not in ("checkpoint", "reward")))
    if "win_rate" in result:
        print(f"win rate of {a.checkpoint} against {a.against}: {result['win_rate']:.3f}")
    line = json.dumps(result)
    print(line)
    if a.json:
        atomic_write(a.json, line + "\n")
    return 0
