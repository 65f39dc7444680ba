#!/usr/bin/env python
"""Modality-balanced global batches: max/mean image tokens per data-parallel rank per step, before and after.

A synthetic blend where 30% of the documents are image-heavy (a 1,024-code image and a short caption, as a
generation or understanding pair at a high resolution) and 70% are text (100-2,000 tokens), shuffled, cut and packed
into samples of ``seq_len + 1`` tokens with the loader's own functions (``packing.split_pieces``,
``packing.pack_next_fit``). Each step's global batch is dealt to the data-parallel ranks two ways: the loader's
default contiguous slices, and ``packing.balance`` (what ``data.balance: true`` does). The straggler of a step is
the rank with the most image tokens (image tokens are the costlier ones under MoT, and the rank with the most of
them waits last at the gradient all-reduce), so the figure is max/mean image tokens per rank, averaged over steps;
1.0 is perfect. Simulated assignment: no ranks, no model.

    python tools/bench/balance.py [--dp 8,64] [--steps 50] [--seq-len 4096]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megannm.data import packing  # noqa: E402


def samples(n_docs: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image tokens, tokens) of every packed sample of one epoch of the synthetic blend."""
    rng = np.random.default_rng(seed)
    heavy = rng.random(n_docs) < 0.3
    image = np.where(heavy, 1024, 0)
    length = np.where(heavy, 1024 + 4 + rng.integers(8, 40, n_docs), rng.integers(100, 2000, n_docs))
    order = rng.permutation(n_docs)
    image, length = image[order], length[order]
    pos, start, plen = packing.split_pieces(length, seq_len)
    bounds = packing.pack_next_fit(plen, seq_len + 1)
    piece_image = np.rint(image[pos] * plen / length[pos]).astype(np.int64)  # (no image document is ever cut)
    ends = np.concatenate([[0], np.cumsum(piece_image)])
    tok_ends = np.concatenate([[0], np.cumsum(plen)])
    return ends[bounds[1:]] - ends[bounds[:-1]], tok_ends[bounds[1:]] - tok_ends[bounds[:-1]]


def ratios(img: np.ndarray, tok: np.ndarray, dp: int, per_rank: int, steps: int) -> dict:
    gb = dp * per_rank
    out = {"before": [], "after": [], "tokens_before": [], "tokens_after": []}
    t = 0.0
    for s in range(steps):
        i, k = img[s * gb:(s + 1) * gb], tok[s * gb:(s + 1) * gb]
        contiguous = np.repeat(np.arange(dp), per_rank)
        t0 = time.perf_counter()
        dealt = packing.balance(i, k, dp)
        t += time.perf_counter() - t0
        for name, part in (("before", contiguous), ("after", dealt)):
            load = np.bincount(part, weights=i, minlength=dp)
            toks = np.bincount(part, weights=k, minlength=dp)
            out[name].append(load.max() / load.mean())
            out["tokens_" + name].append(toks.max() / toks.mean())
    return {**{key: float(np.mean(v)) for key, v in out.items()}, "balance_ms_per_step": 1000 * t / steps,
            "global_batch": gb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dp", default="8,64", help="data-parallel sizes")
    p.add_argument("--per-rank", type=int, default=16, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dps = [int(x) for x in a.dp.split(",")]
    need = max(dps) * a.per_rank * a.steps
    n_docs = need * 4  # ~2.5 documents per sample: enough samples for every step
    img, tok = samples(n_docs, a.seq_len, a.seed)
    assert len(img) >= need, "not enough samples: raise n_docs"
    print(f"{'dp':>4} {'global batch':>12} {'img max/mean before':>20} {'after':>7} {'tokens before':>14} "
          f"{'after':>7} {'ms/step':>8}")
    res = {}
    for dp in dps:
        r = ratios(img, tok, dp, a.per_rank, a.steps)
        res[dp] = r
        print(f"{dp:>4} {r['global_batch']:>12} {r['before']:>20.3f} {r['after']:>7.3f} {r['tokens_before']:>14.3f} "
              f"{r['tokens_after']:>7.3f} {r['balance_ms_per_step']:>8.1f}")
    print(f"(30% image-heavy documents, seq_len {a.seq_len}, {a.per_rank} samples per rank, mean over {a.steps} "
          f"steps; 'before' = contiguous slices, 'after' = packing.balance)")
    result = {"bench": "balance", "baseline": "contiguous data-parallel slices (data.balance: false)"}
    for dp, r in res.items():
        result[f"dp{dp}_image_max_over_mean_before"] = round(r["before"], 3)
        result[f"dp{dp}_image_max_over_mean_after"] = round(r["after"], 3)
        result[f"dp{dp}_ratio"] = round(r["after"] / r["before"], 3)
        result[f"dp{dp}_tokens_max_over_mean_after"] = round(r["tokens_after"], 3)
        result[f"dp{dp}_balance_ms"] = round(r["balance_ms_per_step"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
