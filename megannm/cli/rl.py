"""``megannm pairs``, ``megannm score`` and ``megannm reward-server``: verifiable rewards, offline and served."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megannm.cli.options import float_in, int_at_least


def pairs(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm pairs", description="Preference pairs for DPO: two sampled answers "
                                "per prompt from a checkpoint, ranked by verifiable rewards; ties dropped.")
    p.add_argument("checkpoint", help="checkpoint folder (or its parent holding `latest`)")
    p.add_argument("--tokenizers", required=True)
    p.add_argument("--out", required=True, help="folder for pairs.jsonl + manifest.json")
    p.add_argument("--prompts", required=True, help="a JSONL prompt file, a registered prompt source (e.g. the "
                                                     "toy world's toy_image) or package.module:function")
    p.add_argument("--split", default="seen", choices=("seen", "heldout", "all"))
    p.add_argument("--n", type=int_at_least(1), default=1000, help="prompts (pairs before dropping ties)")
    p.add_argument("--rewards", required=True, help="comma-separated reward names (name=weight allowed)")
    p.add_argument("--temperature", type=float_in(0, note=" (0 = greedy)"), default=1.0)
    p.add_argument("--cfg-scale", type=float_in(0), default=1.0)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from megannm.phases.rl.pairs import PAIRS, make_pairs
    t0 = time.time()
    n, ties = make_pairs(a.checkpoint, a.tokenizers, a.out, a.prompts, a.rewards, split=a.split, n=a.n,
                         temperature=a.temperature, cfg_scale=a.cfg_scale, max_new_tokens=a.max_new_tokens,
                         seed=a.seed)
    print(f"{n} pairs ({ties} ties dropped of {a.n} prompts) -> {Path(a.out) / PAIRS} ({time.time() - t0:.0f} s)")
    return 0


SCORE_DESCRIPTION = """\
The mean verifiable reward of a checkpoint's sampled answers, and its win rate against another.

Both checkpoints answer the same prompts with the same sampling seed; the win rate is P(reward > other's) + half the
ties. A reward of weight 0 is reported beside the total without counting in it; name_* stands for every registered
reward of that name (e.g. one per attribute). Prints a table and one JSON line (also written to --json)."""


def score(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm score", description=SCORE_DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--tokenizers", required=True)
    p.add_argument("--against", default=None, help="another checkpoint: its scores and the win rate")
    p.add_argument("--prompts", required=True, help="a registered prompt generator (e.g. toy_image), "
                                                    "package.module:function, or a JSONL prompt file")
    p.add_argument("--split", default="heldout", choices=("seen", "heldout", "all"))
    p.add_argument("--n", type=int_at_least(1), default=200, help="prompts")
    p.add_argument("--samples", type=int_at_least(1), default=1, help="answers per prompt")
    p.add_argument("--rewards", required=True, help="comma-separated names (name=weight allowed; weight 0: "
                                                    "reported, not counted; name_* for a family)")
    p.add_argument("--temperature", type=float_in(0, note=" (0 = greedy)"), default=1.0, help="0 = greedy")
    p.add_argument("--cfg-scale", type=float_in(0), default=1.0)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    from megannm.fileio import atomic_write
    from megannm.phases.rl.score import format_scores, score_checkpoints
    result = score_checkpoints(a.checkpoint, a.tokenizers, a.prompts, a.rewards, against=a.against, split=a.split,
                               n=a.n, samples=a.samples, temperature=a.temperature, cfg_scale=a.cfg_scale,
                               max_new_tokens=a.max_new_tokens, seed=a.seed)
    print(format_scores(result))
    line = json.dumps(result)
    print(line)
    if a.json:
        atomic_write(a.json, line + "\n")
    return 0


def reward_server(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm reward-server", description="Serve any registered reward over HTTP, "
                                "for recipes that name it by URL (it binds to this machine unless given an API "
                                "key).")
    p.add_argument("--reward", required=True, help="a registered reward name, an installed one (entry point of "
                                                   "megannm.rewards) or package.module:function")
    p.add_argument("--port", type=int, required=True, help="TCP port (0: any free one; the line printed says which)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; any "
                                                       "other needs --api-key)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or set MEGANNM_API_KEY, "
                                                   "which the training ranks' clients send)")
    p.add_argument("--quiet", action="store_true", help="no line per scored batch")
    a = p.parse_args(argv)
    from megannm.rewards.server import serve
    from megannm.web import api_key_of
    serve(a.reward, a.host, a.port, quiet=a.quiet, api_key=api_key_of(a.api_key))
    return 0
