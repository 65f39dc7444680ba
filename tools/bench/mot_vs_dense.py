#!/usr/bin/env python
"""MoT vs its dense twin on the toy world: how much of the dense model's training MoT needs to match its quality.

The MoT paper's headline (Liang et al. 2024, arXiv 2411.04996): Mixture-of-Transformers (every non-embedding weight
once per modality, global attention) reaches the dense model's quality with a fraction of the compute. Here the
two models are trained SIDE BY SIDE in ONE process: ``model.mot: true`` and its dense twin ``mot: false``, built
from the same recipe (default ``recipes/toy/joint.yaml``, the demo's joint stage: hidden 192, 4 layers, micro-batch
32 x 80 tokens, fp32 on the CPU) with the same seed and the same FLOPs per token (``megannm.model.flops``: each
token passes exactly one set of weights of the same sizes). Each is a real megannm ``Trainer`` (``megannm.stage``'s
``build_trainer``: DeepSpeed engine, the recipe's optimizer, warm-up and cosine schedule, gradient clipping) and
makes its real ``train_step``; the steps are interleaved (dense, MoT, then MoT, dense, ...) and both get the very
same micro-batches, read once from one loader, so that data order and machine noise hit both alike.

Every ``--eval-interval`` steps (and at step 0 and at the end) both models are scored with the Trainer's own
``evaluate`` on the same held-out batches (the pretraining phase's ``eval_batches`` over the demo's ``valid_seen``
split: records not trained on), which reports the image-token and the text-token losses separately (the phase's
per-modality sums: ``lm_loss``'s unweighted cross entropy over each modality's targets).

For image loss and for text loss separately: the dense model's final validation loss is the target, and the step
at which MoT's validation curve FIRST reaches it (linear interpolation between evaluation points) over the dense
run's steps is the steps fraction (= the FLOPs fraction: equal FLOPs per token, equal tokens per step). The wall
fraction is the steps fraction times MoT's time per step relative to the dense twin's, the median over steps of the
ratio of the two models' times at the same step (run back to back: a shared machine's load drifting over the run
cancels, which sums of step times would not). Evaluation time is in neither. ``null`` (printed "not reached") when
MoT never gets there. Both runs share one learning-rate schedule, so the dense end point has had the full decay
while MoT's crossing point has not (as in the paper's step-matched curves): that works against MoT, not for it.

The paper's figures are printed beside ours as the anchor: 55.8% of the FLOPs for text and image together
(Chameleon setting, 7B) and 47.2% / 75.6% of the wall clock for image / text quality (its system profiling, on
A100s). Ours is a 2.3M-parameter dense model (MoT 4.0M) on a CPU, trained for minutes: read the comparison as a
direction, not as a target.

The toy data set (tokenizers and shards, ``megannm.toy.demo.build_data``) is built into ``OUT/toy`` once (seconds)
and reused; ``--data`` points at another folder of the same layout (``runs/demo`` after ``megannm demo``). The loss
curves (both models, both modalities, vs step) are written as a PNG under ``OUT``, and beside it a JSON file of the
raw numbers (the curves, every step's time); nothing else (no checkpoints). Extra ``key.path=value`` arguments
override both recipes (e.g. ``precision=bf16`` on a GPU).

``--images continuous``: the same records with continuous images (pixel patches as latents, the flow objective;
``megannm.toy.demo.continuous_data``): the image loss is then the flow loss, the text loss the captions'.

    PYTHONPATH=. python tools/bench/mot_vs_dense.py [--steps 400 --eval-interval 25 --threads 2 --out DIR]
                                                    [--images continuous]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The paper's figures (abstract of arXiv 2411.04996), fractions of the dense baseline's cost.
PAPER = {"flops_fraction_text_and_image_7b": 0.558, "image_wall_fraction": 0.472, "text_wall_fraction": 0.756}
MODALITIES = ("image", "text")
NAMES = ("dense", "mot")  # the dense twin is the baseline


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400, help="training steps of each model")
    p.add_argument("--eval-interval", type=int, default=25, help="steps between validation evaluations")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--out", default="runs/bench/mot_vs_dense", help="output folder (the PNG; the toy data set)")
    p.add_argument("--data", default=None, help="folder with tokenizers/ and data/shards/ (default: OUT/toy, built "
                                                "there on the first run)")
    p.add_argument("--recipe", default=str(REPO / "recipes" / "toy" / "joint.yaml"),
                   help="pretraining recipe both models are built from (model.mot is set for each)")
    p.add_argument("--valid", default="valid_seen", help="held-out split under data/shards/ to evaluate on")
    p.add_argument("--eval-batches", type=int, default=8, help="validation micro-batches per evaluation (at most)")
    p.add_argument("--images", choices=("discrete", "continuous"), default="discrete",
                   help="image codes (default), or continuous latents with the flow objective")
    p.add_argument("overrides", nargs="*", help="key.path=value applied to both recipes")
    a = p.parse_args()
    for name in ("steps", "eval_interval", "threads", "eval_batches"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(a, name)})")
    return a


# ---------------------------------------------------------------------------------------------------------------------
# the two runs


def recipes(a: argparse.Namespace, shards: Path, out: Path) -> dict:
    """The dense twin's and MoT's recipes: the same file and overrides but for ``model.mot``."""
    from megannm.config import load_recipe
    valid = shards / a.valid
    if not (valid / "manifest.json").is_file():
        raise ValueError(f"--valid: {valid}: no shards there (expected a split of {shards})")
    base = [f"data.train=[{{path: {shards / 'train'}}}]", f"data.valid=[{{path: {valid}}}]",
            f"schedule.train_steps={a.steps}", f"logging.eval_batches={a.eval_batches}",
            "logging.tensorboard=false", "logging.progress_bar=false", *a.overrides]
    # the recipe's warm-up (read at its own length), capped at a tenth of a short run unless an override sets it
    probe = load_recipe(a.recipe, [o for o in base if not o.startswith("schedule.train_steps=")], world_size=1)
    warmup = probe.schedule.warmup_steps
    if not any(o.startswith("schedule.warmup_steps=") for o in a.overrides):
        warmup = min(warmup, max(a.steps // 10, 1))
    return {name: load_recipe(a.recipe, base + [f"schedule.warmup_steps={warmup}", f"model.mot={name == 'mot'}",
                                                f"logging.dir={out / name}"], world_size=1)
            for name in NAMES}


def first_reach(steps: list[int], losses: list[float], target: float) -> Optional[float]:
    """The first (fractional) step at which the curve (steps, losses) is at or below ``target``, linearly
    interpolated between evaluation points; None when it never is."""
    for i, (s, x) in enumerate(zip(steps, losses)):
        if x <= target:
            if i == 0:
                return float(s)
            s0, x0 = steps[i - 1], losses[i - 1]
            return s0 + (x0 - target) / (x0 - x) * (s - s0)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# the picture (PIL only: matplotlib is not a dependency)

COLOURS = {"dense": (70, 110, 200), "mot": (220, 110, 30)}


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round values for a linear axis over [lo, hi], about ``n`` of them."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round values for a logarithmic axis over [lo, hi] (lo > 0): the plainest mantissas that give 4 or more, or
    over a narrow range (where a log axis is all but linear) linear ones."""
    for mantissas in ((1, 2, 5), (1, 2, 3, 5)):
        found = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0 ** k <= hi]
        if len(found) >= 4:
            return found[::math.ceil(len(found) / most)]
    return _ticks(lo, hi)


def draw_curves(curves: dict, targets: dict, reached: dict, path: Path) -> Path:
    """One panel per modality: validation loss vs step of both models, the dense model's final loss dashed and
    the step where MoT first reaches it marked; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from megannm.fileio import atomic_write
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    pw, ph, left, top, bottom, gap = 460, 300, 58, 34, 40, 30
    canvas = Image.new("RGB", (len(MODALITIES) * (left + pw + gap) + 10, top + ph + bottom + 26), "white")
    draw = ImageDraw.Draw(canvas)
    steps = curves["dense"]["step"]
    smax = max(steps[-1], 1)
    for k, m in enumerate(MODALITIES):
        x0 = 10 + k * (left + pw + gap) + left
        # the y range leaves out step 0 (the untrained ln(vocab) would flatten everything after it)
        ys = [v for name in NAMES for s, v in zip(steps, curves[name][m]) if s > 0] or \
             [v for name in NAMES for v in curves[name][m]]
        # log scale: the early drop and the late gap (what the comparison is about) both stay readable
        lo, hi = math.log(min(ys)), math.log(max(ys))
        pad = (hi - lo) * 0.06 or 0.05
        lo, hi = lo - pad, hi + pad
        plot = Image.new("RGB", (pw, ph), "white")  # its own image: lines beyond the range are clipped
        pd = ImageDraw.Draw(plot)
        px = lambda s: (pw - 1) * s / smax
        py = lambda v: (ph - 1) * (hi - math.log(v)) / (hi - lo)
        for t in _log_ticks(math.exp(lo), math.exp(hi)):
            pd.line([(0, py(t)), (pw, py(t))], fill=(232, 232, 232))
            draw.text((x0 - 6, top + py(t)), f"{t:.3g}", fill="black", font=font, anchor="rm")
        for t in _ticks(0, smax):
            pd.line([(px(t), 0), (px(t), ph)], fill=(232, 232, 232))
            draw.text((x0 + px(t), top + ph + 6), f"{t:g}", fill="black", font=font, anchor="ma")
        target = targets[m]
        for xd in range(0, pw, 10):  # the dense model's final loss, dashed
            pd.line([(xd, py(target)), (xd + 5, py(target))], fill=COLOURS["dense"], width=1)
        for name in NAMES:
            pts = [(px(s), py(v)) for s, v in zip(steps, curves[name][m])]
            pd.line(pts, fill=COLOURS[name], width=2)
            for x, y in pts:
                pd.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLOURS[name])
        if reached[m] is not None:
            xr = px(reached[m])
            pd.line([(xr, py(target) - 12), (xr, py(target) + 12)], fill=COLOURS["mot"], width=2)
        pd.rectangle([0, 0, pw - 1, ph - 1], outline="black")
        canvas.paste(plot, (x0, top))
        frac = "not reached" if reached[m] is None else f"{reached[m] / smax:.2f} of the steps"
        draw.text((x0, 8), f"{m} validation loss, log scale  (MoT reaches dense's final: {frac})", fill="black",
                  font=font)
        draw.text((x0 + pw // 2, top + ph + 22), "step", fill="black", font=font, anchor="ma")
    lx = 10 + left
    for i, (name, label) in enumerate((("dense", "dense twin (mot: false)"), ("mot", "MoT (mot: true)"))):
        y = canvas.height - 12
        draw.line([(lx + i * 240, y), (lx + i * 240 + 24, y)], fill=COLOURS[name], width=3)
        draw.text((lx + i * 240 + 30, y), label, fill="black", font=font, anchor="lm")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------------


def main() -> int:
    """Bad input (a recipe key, a data folder, an override) ends with one line, as ``megannm`` commands do."""
    from megannm.cli import USER_ERRORS
    try:
        run(parse_args())
    except USER_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mot_vs_dense: error: {msg}", file=sys.stderr)
        return 2
    return 0


def run(a: argparse.Namespace) -> None:
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    import torch
    torch.set_num_threads(a.threads)
    from megannm import parallel
    from megannm.stage import build_trainer
    from megannm.toy.demo import build_data

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    data_dir = Path(a.data) if a.data else out / "toy"
    if a.data and not (data_dir / "data" / "shards" / "train" / "manifest.json").is_file():
        raise ValueError(f"--data: {data_dir}: no data/shards/train/manifest.json there (a `megannm demo` folder)")
    data = build_data(data_dir, n_train=14000, n_valid=256, seed=0, workers=1, say=lambda *_: None)
    if a.images == "continuous":
        from megannm.toy.demo import continuous_data
        data = continuous_data(data, data_dir / "continuous")
    print(f"toy data: {data['shards']} ({time.time() - t:.1f} s)", flush=True)
    layout = parallel.init_parallel(1, 1)
    try:
        rs = recipes(a, Path(data["shards"]), out)
        trainers = {name: build_trainer(rs[name], layout, source=f"{a.recipe} (model.mot={name == 'mot'})")
                    for name in NAMES}
        result = compare(a, rs, trainers)
    finally:
        parallel.shutdown()
    report(a, rs["dense"], trainers, result, out)


def compare(a, rs: dict, trainers: dict) -> dict:
    """Train both side by side; (curves per model: step, image, text; step times per model)."""
    dense = trainers["dense"]
    accum = dense.accum
    # One loader for both (the dense twin's phase; both recipes give the same one): the same micro-batches, read once
    batches = dense.phase.train_batches(0)
    eval_batches = dense.phase.eval_batches()
    if not eval_batches:
        raise ValueError(f"--valid: {rs['dense'].data.valid[0].path}: no validation batches")
    curves = {name: {"step": [], "image": [], "text": []} for name in NAMES}
    step_times = {name: [] for name in NAMES}
    eval_s = 0.0

    def evaluate(step: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        for name, trainer in trainers.items():
            v = trainer.evaluate(eval_batches)
            curves[name]["step"].append(step)
            for m in MODALITIES:
                curves[name][m].append(float(v[f"{m}_loss"]))
        eval_s += time.perf_counter() - t
        print(f"step {step:5d}  " + "   ".join(
            f"{name}: image {curves[name]['image'][-1]:.4f} text {curves[name]['text'][-1]:.4f}" for name in NAMES),
            flush=True)

    evaluate(0)
    for step in range(1, a.steps + 1):
        micro = [next(batches) for _ in range(accum)]
        # alternate who goes first, so that neither always runs on the caches the other left
        for name in (NAMES if step % 2 else NAMES[::-1]):
            trainer = trainers[name]
            t = time.perf_counter()
            stats, _ = trainer.train_step(iter(micro))
            step_times[name].append(time.perf_counter() - t)
            trainer.step += 1
            trainer.consumed_samples += rs[name].data.global_batch_size
            if not math.isfinite(stats["loss"]):
                raise SystemExit(f"mot_vs_dense: {name}: step {step}: training loss {stats['loss']} (diverged: "
                                 f"try a lower optimizer.lr=...)")
        if step % a.eval_interval == 0 or step == a.steps:
            evaluate(step)
    return {"curves": curves, "step_times": step_times, "eval_s": eval_s,
            "eval_tokens": sum(int(b["loss_mask"].sum()) for b in eval_batches)}


def report(a, recipe, trainers: dict, result: dict, out: Path) -> None:
    from megannm.fileio import atomic_write_json
    curves, step_times = result["curves"], result["step_times"]
    steps = curves["dense"]["step"]
    total = steps[-1]
    # MoT's time per step relative to the dense twin's: the median over steps of the two models' times AT THE SAME
    # step (run back to back), so that the machine's load drifting over the run cancels; summed times would not
    ratio = statistics.median(t_mot / t_dense for t_mot, t_dense in zip(step_times["mot"], step_times["dense"]))
    targets, reached, rows = {}, {}, {}
    for m in MODALITIES:
        targets[m] = curves["dense"][m][-1]
        reached[m] = first_reach(steps, curves["mot"][m], targets[m])
        frac = None if reached[m] is None else reached[m] / total
        rows[m] = {"dense_final": targets[m], "mot_final": curves["mot"][m][-1], "reached_step": reached[m],
                   "steps_fraction": frac, "wall_fraction": None if frac is None else frac * ratio}
    png = draw_curves(curves, targets, reached, out / "mot_vs_dense.png")
    raw = atomic_write_json(out / "mot_vs_dense.json", {"curves": curves, "step_times_s": step_times})

    modules = {name: t.engine.module for name, t in trainers.items()}
    params = {name: sum(p.numel() for p in mod.parameters()) for name, mod in modules.items()}
    non_emb = {name: mod.num_params(embeddings=False) for name, mod in modules.items()}
    active = {name: mod.num_params(active_only=True) for name, mod in modules.items()}
    fpt = {name: t.flops_per_token for name, t in trainers.items()}
    med = {name: statistics.median(step_times[name]) for name in NAMES}
    train_s = {name: sum(step_times[name]) for name in NAMES}
    shape, d, sch = recipe.model, recipe.data, recipe.schedule
    print(f"\nshape: hidden {shape.hidden_size}, layers {shape.num_layers}, heads {shape.num_heads}, "
          f"ffn {shape.ffn_hidden_size}, "
          f"vocabulary {trainers['dense'].vocab.size}, micro-batch {d.micro_batch_size} x {d.seq_len} tokens, "
          f"{recipe.precision}, {total} steps each (lr {recipe.optimizer.lr:g}, warm-up {sch.warmup_steps}, "
          f"{sch.decay}), threads {a.threads}")
    print(f"validation: {a.valid}, {result['eval_tokens']} loss tokens per evaluation, every {a.eval_interval} steps "
          f"({result['eval_s']:.0f} s of evaluation in all, not counted)")
    print(f"\n{'model':7s} {'params':>10s} {'non-embed':>10s} {'active/token':>12s} {'FLOPs/token':>12s} "
          f"{'s/step (median)':>16s} {'train s':>8s}")
    for name in NAMES:
        print(f"{name:7s} {params[name]:10,d} {non_emb[name]:10,d} {active[name]:12,d} {fpt[name]:12.4g} "
              f"{med[name]:16.3f} {train_s[name]:8.1f}")
    print(f"MoT step time vs dense twin: {ratio:.3f}x (median over steps of the paired times; wall fraction = "
          f"steps fraction x this)")
    fmt = lambda x: "not reached" if x is None else f"{x:.3f}"
    print(f"\n{'validation loss':16s} {'dense final':>11s} {'MoT final':>10s} {'MoT reaches it at':>18s} "
          f"{'steps fraction':>15s} {'wall fraction':>14s}   paper (7B / A100)")
    paper = {"image": f"FLOPs {PAPER['flops_fraction_text_and_image_7b']:.3f}, wall {PAPER['image_wall_fraction']:.3f}",
             "text": f"FLOPs {PAPER['flops_fraction_text_and_image_7b']:.3f}, wall {PAPER['text_wall_fraction']:.3f}"}
    for m in MODALITIES:
        r = rows[m]
        at = "not reached" if r["reached_step"] is None else f"step {r['reached_step']:.1f}"
        print(f"{m + ' loss':16s} {r['dense_final']:11.4f} {r['mot_final']:10.4f} {at:>18s} "
              f"{fmt(r['steps_fraction']):>15s} {fmt(r['wall_fraction']):>14s}   {paper[m]}")
    print("(steps fraction = FLOPs fraction here: equal FLOPs per token and tokens per step; the paper's FLOPs "
          "figure is for text and image together)")
    print(f"\nloss curves: {png}\nraw numbers: {raw} (validation curves, every step's time)")
    r3 = lambda x: None if x is None else round(x, 4)
    print(json.dumps({
        "bench": "mot_vs_dense", "baseline": "dense twin (mot: false), same data/seed/FLOPs per token",
        "images": a.images,
        **{f"{m}_steps_fraction": r3(rows[m]["steps_fraction"]) for m in MODALITIES},
        **{f"{m}_wall_fraction": r3(rows[m]["wall_fraction"]) for m in MODALITIES},
        "final_loss": {name: {m: round(curves[name][m][-1], 4) for m in MODALITIES} for name in NAMES},
        "params": params, "flops_per_token": fpt["dense"], "flops_per_token_equal": fpt["dense"] == fpt["mot"],
        "mot_vs_dense_step_time": round(ratio, 3), "steps": total,
        "eval_interval": a.eval_interval, "threads": a.threads, "png": str(png),
        "paper": PAPER}))


if __name__ == "__main__":
    sys.exit(main())
