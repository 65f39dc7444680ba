"""GRPO steps on real ranks, several cases in ONE launch (start-up costs ~8 s per launch on 2 cores).

usage: python rl_cases.py OUT TOKENIZERS CASE [CASE ...]   (under torchrun, or alone)

CASE: tp2 (tensor parallel 2), z3 / z0 (ZeRO-3 / ZeRO-0 over 2 data-parallel ranks), ref (one process). Every rank
writes OUT/<case>.rank<r>.json: the per-step statistics and a checksum of its parameters (gathered under ZeRO-3).
"""
import json
import sys
from pathlib import Path

from megannm import parallel, rewards


@rewards.register("low_text")
def low_text(prompt, sample, truth) -> float:
    """The quick-to-learn toy reward of the tests: the fraction of answer tokens among the first 200 text ids."""
    return sum(i < 200 for i in sample.ids) / max(len(sample.ids), 1)


def recipe(out: Path, tokenizers: str, name: str, tp: int = 1, zero: int = 0, world: int = 1, steps: int = 2,
           micro: int = 4, lr: float = 1e-2, global_batch: int = 0, kind: str = "grpo", **options):
    from megannm.config import recipe_from_dict
    dp = world // tp
    opts = {"prompts": "toy_caption", "rewards": ["low_text"], "group_size": 4, "prompts_per_step": 4,
            "ppo_epochs": 2, "mini_batches": 2, "kl_coef": 0.1, "max_new_tokens": 3}
    opts.update(options)
    answers = opts["prompts_per_step"] * opts["group_size"]
    if kind != "grpo":  # another phase: only its own options
        opts = options
    d = {"name": name, "seed": 5,
         "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "max_seq_len": 96},
         "parallel": {"tensor_parallel": tp, "zero_stage": zero},
         "data": {"vocab": f"{tokenizers}/vocab.json", "seq_len": 96, "micro_batch_size": micro // dp,
                  "global_batch_size": global_batch or answers // opts["mini_batches"]},
         "optimizer": {"lr": lr, "min_lr": lr, "weight_decay": 0.0, "grad_clip": 0.0},
         "schedule": {"train_steps": steps, "warmup_steps": 0, "decay": "constant"},
         "phase": {"kind": kind, "options": opts},
         "logging": {"dir": str(out / name), "interval": 1, "progress_bar": False, "tensorboard": False}}
    return recipe_from_dict(d, source=name, world_size=world)


def checksum(engine, zero: int) -> float:
    params = list(engine.module.parameters())
    if zero == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(params):
            return sum(float(p.detach().double().sum()) for p in params)
    return sum(float(p.detach().double().sum()) for p in params)


def run_case(out: Path, tokenizers: str, case: str) -> None:
    from megannm.stage import build_trainer
    from megannm.train.logging import read_metrics
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    tp, zero = {"tp2": (2, 1), "z3": (1, 3), "z0": (1, 0), "ref": (1, 0)}[case]
    r = recipe(out, tokenizers, case, tp=tp, zero=zero, world=world)
    layout = parallel.init_parallel(tp, 1)
    trainer = build_trainer(r, layout, source=case)
    trainer.run()
    stats = [m for m in read_metrics(out / case) if m.get("split") == "train"] if layout.rank == 0 else None
    result = {"rank": layout.rank, "tp_rank": layout.tp_rank, "dp_rank": layout.dp_rank,
              "checksum": checksum(trainer.engine, zero), "stats": stats,
              "ref_requires_grad": any(p.requires_grad for p in trainer.phase.reference.parameters())}
    (out / f"{case}.rank{layout.rank}.json").write_text(json.dumps(result))


def main():
    out, tokenizers = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    try:
        for case in sys.argv[3:]:
            run_case(out, tokenizers, case)
    finally:
        parallel.shutdown()


if __name__ == "__main__":
    main()
