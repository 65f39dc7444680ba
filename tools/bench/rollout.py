"""GRPO rollout throughput: all of a rank's answers through one batched decoder vs one decoder run per answer kind.

A toy-shaped model (recipes/toy/common.yaml: hidden 192, 4 MoT layers, 6 heads, FFN 512; the toy vocabulary: 389
text ids, 756 image codes, 8 x 8 image grid), random weights, samples a GRPO-like rollout: ``--prompts`` prompts x
``--group`` answers, half text -> image (a short caption, 64 image codes to draw), half image -> text (an image's
codes, a caption of up to ``--max-new`` tokens), at temperature 1. Contenders, both through ``megannm.generate``
(the continuous-batching decoder of ``megannm.decode``):

- ``per_kind_64`` (the baseline): what ``rollout.sample_and_score`` did first: one ``generate`` call per answer
  kind, 64 rows at a time;
- ``batched``: the rollout now: every answer in one decoder (per-row allowed ids, lengths, stops; a finished row's
  slot goes to the next answer).

Timed round-robin in ONE process (A B C A B C ...) so that machine noise hits each alike; tokens/s = answer tokens
sampled / seconds (median over ``--reps``). Prints a table, then one JSON line.

    python tools/bench/rollout.py [--prompts 16 --group 8 --max-new 32 --reps 3 --threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout (half of each direction)")
    p.add_argument("--group", type=int, default=8, help="answers per prompt")
    p.add_argument("--max-new", type=int, default=32, help="longest caption")
    p.add_argument("--reps", type=int, default=2, help="timed rollouts per contender")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    a = p.parse_args()

    import numpy as np
    import torch
    torch.set_num_threads(a.threads)
    from megannm import parallel
    from megannm.config import ModelConfig
    from megannm.generate import SamplingConfig, generate
    from megannm.model.transformer import ModelArgs, NMMModel
    from megannm.vocab import Vocab

    layout = parallel.init_parallel(1, 1)
    vocab = Vocab(text_size=389, image_codes=756, image_grid=64)
    cfg = ModelConfig(hidden_size=192, num_layers=4, num_heads=6, ffn_hidden_size=512, mot=True, qk_norm=True,
                      max_seq_len=256)
    torch.manual_seed(0)
    model = NMMModel(ModelArgs.from_config(cfg, vocab), layout).to(a.device).eval()

    rng = np.random.default_rng(0)
    prompts, kinds = [], []
    for i in range(a.prompts):
        if i % 2 == 0:  # text -> image: <bos> caption <boi>
            ids = [vocab.bos_id, *rng.integers(0, vocab.text_size, int(rng.integers(6, 14))).tolist(), vocab.boi_id]
            kind = "image"
        else:  # image -> text: <bos> <boi> codes <eoi>
            codes = rng.integers(vocab.image_start, vocab.image_end, vocab.image_grid).tolist()
            ids, kind = [vocab.bos_id, vocab.boi_id, *codes, vocab.eoi_id], "text"
        prompts += [ids] * a.group
        kinds += [kind] * a.group
    end = (vocab.special("<|end|>"),)
    sampling = SamplingConfig.from_options(temperature=1.0, seed=1, greedy=False)

    def per_kind():
        out = 0
        for kind in ("image", "text"):
            rows = [pr for pr, k in zip(prompts, kinds) if k == kind]
            out += sum(map(len, generate(model, vocab, rows, kind, a.max_new, sampling, batch_size=64,
                                         stop_ids=end, keep_stop=True)))
        return out

    def batched():
        return sum(map(len, generate(model, vocab, prompts, kinds, a.max_new, sampling, batch_size=len(prompts),
                                     stop_ids=end, keep_stop=True, pad=True)))

    contenders = {"per_kind_64": per_kind, "batched": batched}
    # warm-up (allocator, first-call costs): a small mixed batch through both paths
    generate(model, vocab, prompts[:a.group + 1] + prompts[-1:], kinds[:a.group + 1] + kinds[-1:], 4, sampling,
             stop_ids=end, pad=True)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(a.reps):
        for name, run in contenders.items():
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens = run()
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            rates[name].append(tokens / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}

    print(f"rollout: {a.prompts} prompts x {a.group} answers ({len(prompts) // 2} images of {vocab.image_grid} codes, "
          f"{len(prompts) // 2} captions <= {a.max_new} tokens), toy-shaped model, {a.device}, {a.threads} threads")
    print(f"{'contender':14s} {'tokens/s':>10s} {'vs baseline':>12s}")
    for name, r in med.items():
        print(f"{name:14s} {r:10.0f} {r / med['per_kind_64']:11.2f}x")
    print(json.dumps({"bench": "rollout", "baseline": "per_kind_64", "device": a.device, "answers": len(prompts),
                      "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
                      "speedup": round(med["batched"] / med["per_kind_64"], 3)}))


if __name__ == "__main__":
    main()
