"""``megannm demo`` and ``megannm selfcheck``: the embedded toy world, trained end to end; this machine, checked."""
from __future__ import annotations

import argparse


def demo(argv: list[str]) -> int:
    from megannm.toy.demo import BENCHMARKS, run_demo
    p = argparse.ArgumentParser(prog="megannm demo", description="The embedded default, with no cluster, GPU or "
                                "download: build the toy world, train its recipe chain on the CPU, evaluate it.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--benchmark", default="toy", choices=BENCHMARKS,
                   help="toy: the single-shape world; toy-geneval: the compositional scenes, before/after GRPO and DPO")
    p.add_argument("--chain", default=None, help="recipe chain to train (default: the benchmark's)")
    p.add_argument("--images", default="discrete", choices=("discrete", "continuous"),
                   help="toy: image codes (default), or continuous latents (pixel patches) drawn by flow matching")
    p.add_argument("--n-train", type=int, default=None, help="pretraining records (default 14000; toy-geneval 20000)")
    p.add_argument("--n-valid", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=None, help="examples per split in the evaluation (default 100; "
                                                            "toy-geneval: per category or question type and split, "
                                                            "default 50)")
    p.add_argument("--eval-temperature", type=float, default=1.0,
                   help="toy-geneval: sampling temperature of the evaluation (0 = greedy)")
    p.add_argument("--eval-chat-n", type=int, default=10,
                   help="chat evaluation (when the chain ends with an SFT stage): drawing and edit prompts per split "
                        "(twice as many questions per question type)")
    p.add_argument("--image-to-text", type=float, default=0.35,
                   help="fraction of pretraining records that put the image first (the rest: caption -> image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key.path=value applied to every stage (e.g. a shorter schedule)")
    a = p.parse_args(argv)
    return run_demo(a.out, a.benchmark, a.chain, n_train=a.n_train, n_valid=a.n_valid, eval_n=a.eval_n,
                    eval_temperature=a.eval_temperature, eval_chat_n=a.eval_chat_n, image_to_text=a.image_to_text,
                    seed=a.seed, workers=a.workers, overrides=a.overrides, images=a.images)


def selfcheck(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="megannm selfcheck", description="Does this machine train, sample and export in "
                                "bf16? bf16 steps of every phase, sampling, Hugging Face export, and on a GPU memory "
                                "and speed, one line each.")
    p.add_argument("--gpu", action="store_true", help="fail unless a CUDA device is visible")
    p.add_argument("--out", default=None, help="working folder (default: a new temporary folder)")
    a = p.parse_args(argv)
    from megannm.toy.selfcheck import selfcheck as run_selfcheck
    return run_selfcheck(gpu=a.gpu, out=a.out)
