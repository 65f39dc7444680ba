#!/usr/bin/env python
"""Pipeline parallelism on the same cores: PP=2 (1F1B, DeepSpeed PipelineEngine) vs PP=1 x DP=2, per micro-batch count.

Two ranks (one core each, OMP_NUM_THREADS=1) train the same model (same seed, shape and global batch of m
micro-batches) two ways, through the trainer's own step (``Trainer.train_step``: ``train.pipeline.train_update`` ->
``engine.train_batch`` at PP=2; forward/backward/step per micro-batch at PP=1):

- PP=2: each rank holds half the chain and sees all m micro-batches (the 1F1B schedule);
- baseline PP=1 x DP=2: each rank holds the whole model and computes m/2 micro-batches, then all-reduces gradients.

The baseline is PP=1 x DP=2 on the same two ranks, not one rank: it is the alternative a user actually has for these
cores and this global batch, it has the same number of processes, threads and start-up, and it has no bubble, so the
ratio isolates what the pipeline costs (bubble + point-to-point sends + per-stage routing). 1F1B's ideal against it
is the bubble-free fraction m / (m + p - 1) (bubble (p-1)/(m+p-1)); efficiency = measured speed-up / ideal.

Layouts run one after the other (megatron-core's parallel state is process-global), in rounds (pp2, dp2, pp2, dp2,
...) so machine noise hits both; the BEST step time of each is compared (on a shared machine other processes only
ever add time; the medians are printed beside it to show the spread).

    python tools/bench/pipeline.py [--hidden 192 --layers 4 --seq 128 --micro-batch 4 --micro-batches 2,4,8]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
P = 2  # pipeline stages (and ranks)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--vocab", type=int, default=2048, help="total ids (text + image codes + specials)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--micro-batches", default="2,4,8", help="m values (even: the baseline splits them over 2 ranks)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per layout and m (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two layouts per m")
    p.add_argument("--mot", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # result file: set by the launching parent
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------------
# inside the two ranks


def worker(a) -> None:
    import torch

    from megannm import parallel
    from megannm.config import recipe_from_dict
    from megannm.phases.pretrain import PretrainPhase
    from megannm.train.loop import Trainer
    from megannm.vocab import DEFAULT_SPECIALS, Vocab

    torch.set_num_threads(1)
    n_text = a.vocab // 2
    vocab = Vocab(text_size=n_text, image_codes=a.vocab - n_text - len(DEFAULT_SPECIALS), image_grid=64)
    world = int(os.environ["WORLD_SIZE"])

    def batches(rank_seed: int):
        """Endless micro-batches of both modalities (a caption then image codes in every row)."""
        g = torch.Generator().manual_seed(rank_seed)
        s, b = a.seq, a.micro_batch
        while True:
            ids = torch.randint(0, vocab.text_size, (b, s + 1), generator=g)
            ids[:, s // 4:] = torch.randint(vocab.image_start, vocab.image_end, (b, s + 1 - s // 4), generator=g)
            pos = torch.arange(s).expand(b, s).contiguous()
            yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(b, s),
                   "position_ids": pos, "document_ids": torch.zeros_like(pos)}

    def layout_run(pp: int, m: int):
        recipe = recipe_from_dict({
            "seed": 0,
            "model": {"hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads, "ffn_hidden_size": a.ffn,
                      "mot": a.mot, "max_seq_len": a.seq},
            "parallel": {"pipeline_parallel": pp, "zero_stage": 0},
            "data": {"seq_len": a.seq, "micro_batch_size": a.micro_batch, "global_batch_size": m * a.micro_batch},
            "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "grad_clip": 1.0},
            "schedule": {"train_steps": 1000, "warmup_steps": 0}}, source="bench", world_size=world)
        layout = parallel.init_parallel(1, pp)
        t = Trainer(recipe, layout, PretrainPhase(recipe, layout, vocab), vocab, source="bench")  # its own step
        data = batches(layout.dp_rank)
        return lambda: t.train_step(data)

    results = {}
    for m in [int(x) for x in a.micro_batches.split(",")]:
        times = {"pp2": [], "dp2": []}
        for _ in range(a.rounds):
            for name, pp in (("pp2", P), ("dp2", 1)):
                step = layout_run(pp, m)
                for _ in range(2):
                    step()
                for _ in range(a.steps):
                    torch.distributed.barrier()
                    t0 = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t0)
                del step
                gc.collect()
        cell = {}
        for name, ts in times.items():
            # a step ends at different moments on different ranks: the slowest rank's time is the step's time
            v = torch.tensor(ts, dtype=torch.float64)
            torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX)
            cell[f"ms_{name}"], cell[f"median_ms_{name}"] = v.min().item() * 1e3, v.median().item() * 1e3
        results[m] = cell
    if torch.distributed.get_rank() == 0:
        Path(a.worker).write_text(json.dumps(results))
    parallel.shutdown()


# ---------------------------------------------------------------------------------------------------------------------
# the parent: launch, then report


def main() -> None:
    a = parse()
    if a.worker:
        worker(a)
        return
    for m in (int(x) for x in a.micro_batches.split(",")):
        if m % P or m < P:
            raise SystemExit(f"--micro-batches: {m} must be a multiple of {P} (the baseline splits it over {P} ranks)")
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", MEGANNM_QUIET="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(P), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve()), *sys.argv[1:],
               "--worker", str(result)]
        t0 = time.time()
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if out.returncode != 0 or not result.exists():
            sys.stderr.write(out.stdout[-3000:] + out.stderr[-6000:])
            raise SystemExit(f"bench: the {P}-rank run failed (exit {out.returncode})")
        res = {int(k): v for k, v in json.loads(result.read_text()).items()}
        wall = time.time() - t0

    print(f"shape: hidden {a.hidden}, layers {a.layers}, heads {a.heads}, ffn {a.ffn}, vocab {a.vocab}, "
          f"{'MoT' if a.mot else 'dense'}, seq {a.seq}, micro-batch {a.micro_batch}; {P} ranks x 1 thread; fp32, "
          f"ZeRO 0; best of {a.steps * a.rounds} steps per cell ({wall:.0f} s)")
    print("baseline: PP=1 x DP=2 on the same 2 ranks, same global batch (each rank m/2 micro-batches)")
    head = (f"{'m':>3s} {'PP=2 ms':>9s} {'DP=2 ms':>9s} {'speed-up':>9s} {'1F1B ideal':>11s} {'efficiency':>11s} "
            f"{'bubble':>7s}   {'(medians: PP=2, DP=2 ms)':s}")
    print(head)
    ratios = {}
    for m, r in sorted(res.items()):
        speed = r["ms_dp2"] / r["ms_pp2"]
        ideal = m / (m + P - 1)
        eff = speed / ideal
        print(f"{m:3d} {r['ms_pp2']:9.1f} {r['ms_dp2']:9.1f} {speed:8.2f}x {ideal:10.2f}x {eff:10.0%} "
              f"{(P - 1) / (m + P - 1):7.0%}   ({r['median_ms_pp2']:.1f}, {r['median_ms_dp2']:.1f})")
        ratios[f"pp2_speed_vs_dp2_m{m}"] = round(speed, 3)
        ratios[f"ideal_1f1b_m{m}"] = round(ideal, 3)
        ratios[f"efficiency_vs_1f1b_m{m}"] = round(eff, 3)
    print("speed-up = DP=2 step time / PP=2 step time; 1F1B ideal = m/(m+p-1) (PP=2 loses only the bubble to a "
          "bubble-free DP=2); efficiency = speed-up / ideal")
    print(json.dumps({"bench": "pipeline",
                      "baseline": "PP=1 x DP=2 on the same 2 ranks (1 thread each), same model, seed and global batch",
                      **ratios,
                      "ms_per_step": {f"m{m}": {"pp2": round(r["ms_pp2"], 1), "dp2": round(r["ms_dp2"], 1)}
                                      for m, r in sorted(res.items())}}))


if __name__ == "__main__":
    main()
