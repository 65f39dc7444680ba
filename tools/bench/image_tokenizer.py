#!/usr/bin/env python
"""Image tokenizers on real photographs: patch_vq vs the learned VQ at the same codebook size and tokens per image.

Both are trained on crops of the colour photos that scikit-image ships (astronaut, coffee, rocket, motorcycle,
retina: 48-192 px squares resized to the tokenizer's side) and measured on crops of three other photos (cat,
stained tissue, deep field) that neither saw: reconstruction PSNR of decode(encode(x)), and encode throughput
(images/s, best of 3 passes over the held-out crops, on this machine's threads). patch_vq is measured as megannm
ships it (frequent patches kept exactly, k-means over the rest) and as plain k-means (``kmeans_share=1``).

    python tools/bench/image_tokenizer.py [--steps 1500] [--codes 256] [--size 32] [--downsample 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megannm.data.image_tokenizer import PatchVQ, load_image_tokenizer  # noqa: E402
from megannm.data.image_tokenizer.learned import (TrainConfig, reconstruction_error,  # noqa: E402
                                                  train_image_tokenizer)
from tests.photos import photo_crops  # noqa: E402


def encode_speed(tok, images: np.ndarray, passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        tok.encode(images)
        best = min(best, time.perf_counter() - t)
    return len(images) / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="learned: training steps (batch 8)")
    p.add_argument("--codes", type=int, default=256, help="codebook size of both")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--downsample", type=int, default=4, help="pixels per token side (patch_vq: the patch size)")
    p.add_argument("--train", type=int, default=1000, help="training crops")
    p.add_argument("--heldout", type=int, default=200, help="held-out crops")
    a = p.parse_args(argv)
    import torch
    t0 = time.perf_counter()
    train = photo_crops(a.train, a.size, seed=0, split="train")
    held = photo_crops(a.heldout, a.size, seed=1, split="heldout")
    rows = {}
    for name, share in (("patch_vq", 0.25), ("patch_vq k-means", 1.0)):
        t = time.perf_counter()
        tok = PatchVQ.train(train, codebook_size=a.codes, patch=a.downsample, kmeans_share=share)
        rows[name] = {**reconstruction_error(tok, held), "train_s": time.perf_counter() - t,
                      "images_per_s": encode_speed(tok, held)}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(image_size=a.size, codebook_size=a.codes, downsample=a.downsample, batch_size=8, lr=3e-3,
                          steps=a.steps, save_every=max(1, a.steps // 5), holdout=0.0)
        r = train_image_tokenizer(train, Path(tmp) / "learned", cfg, progress=sys.stderr.isatty(),
                                  say=lambda *x: None)
        tok = load_image_tokenizer(Path(tmp) / "learned")
        rows["learned"] = {**reconstruction_error(tok, held), "train_s": r["seconds"],
                           "images_per_s": encode_speed(tok, held), "history": r["history"]}
    grid = a.size // a.downsample
    print(f"{a.train} training / {a.heldout} held-out crops of real photographs at {a.size} px; {a.codes} codes, "
          f"{grid}x{grid} = {grid * grid} tokens per image; torch threads {torch.get_num_threads()}")
    print(f"{'tokenizer':18s} {'held-out PSNR':>14s} {'MSE':>9s} {'codes used':>11s} {'encode img/s':>13s} "
          f"{'train s':>8s}")
    for name, row in rows.items():
        print(f"{name:18s} {row['psnr']:11.2f} dB {row['mse']:9.1f} {row['codes_used']:11d} "
              f"{row['images_per_s']:13.0f} {row['train_s']:8.1f}")
    print("learned training (step: mean reconstruction loss on [-1, 1] pixels): " +
          ", ".join(f"{h['step']}: {h['recon']:.4f}" for h in rows["learned"]["history"]))
    L, P, K = rows["learned"], rows["patch_vq"], rows["patch_vq k-means"]
    print(f"learned vs patch_vq: {L['psnr'] - P['psnr']:+.2f} dB, MSE x{L['mse'] / P['mse']:.3f}, encode speed "
          f"x{L['images_per_s'] / P['images_per_s']:.3f}; total {time.perf_counter() - t0:.0f} s")
    print(json.dumps({
        "bench": "image_tokenizer",
        "baseline": f"patch_vq ({a.codes} codes, {grid * grid} tokens per {a.size} px image)",
        "psnr_gain_db": round(L["psnr"] - P["psnr"], 3), "mse_ratio": round(L["mse"] / P["mse"], 4),
        "encode_speed_ratio": round(L["images_per_s"] / P["images_per_s"], 4),
        "psnr_gain_db_vs_kmeans": round(L["psnr"] - K["psnr"], 3),
        "learned_psnr": L["psnr"], "patch_vq_psnr": P["psnr"], "patch_vq_kmeans_psnr": K["psnr"],
        "learned_images_per_s": round(L["images_per_s"], 1), "patch_vq_images_per_s": round(P["images_per_s"], 1),
        "learned_steps": a.steps, "learned_train_s": round(L["train_s"], 1), "codes": a.codes,
        "tokens_per_image": grid * grid, "image_size": a.size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
