"""Mixed-precision runs of every phase on real DeepSpeed engines, several cases in ONE launch.

usage: python bf16_cases.py OUT TOY CASE [CASE ...]   (under torchrun with 2 ranks; TOY: build_data's folder)

    PHASE:PRECISION   pretrain | sft | grpo | dpo at fp32 | bf16 | fp16, 2 data-parallel ranks, ZeRO 1
    resume            bf16 pretraining stopped at step 3 (schedule.exit_interval) and resumed, against straight
    init              bf16 SFT starting from pretrain:bf16's checkpoint (checkpoint.init_from), as a chain does
    pp2               bf16 pretraining with 2 pipeline stages
    master            the bf16 pretraining run's fp32 master weights, gathered from the live engine

Rank 0 writes OUT/<name>.json with the per-step metrics (and what the test compares). The recipes are
``megannm.toy.selfcheck.phase_recipe``'s.
"""
import json
import os
import sys
from pathlib import Path

import torch

from megannm import parallel
from megannm.toy.selfcheck import phase_recipe, write_toy_pairs
from megannm.train.logging import read_metrics

OUT, TOY = Path(sys.argv[1]), Path(sys.argv[2])
DATA = {"shards": TOY / "data" / "shards", "tokenizers": TOY / "tokenizers"}
WORLD = int(os.environ.get("WORLD_SIZE", 1))
STEPS = 6


def run(name: str, kind: str, precision: str, resume: bool = False, **extra):
    from megannm.config import recipe_from_dict
    from megannm.stage import build_trainer
    d = phase_recipe(kind, DATA, OUT, name=name, precision=precision, steps=STEPS, world=WORLD, **extra)
    r = recipe_from_dict(d, source=name, world_size=WORLD)
    layout = parallel.init_parallel(r.parallel.tensor_parallel, r.parallel.pipeline_parallel)
    trainer = build_trainer(r, layout, source=name)
    trainer.run(resume=resume)
    return trainer


def dump(name: str, **extra) -> None:
    if parallel.group_rank(None) == 0:
        m = read_metrics(OUT / name)
        (OUT / f"{name}.json").write_text(json.dumps({
            "train": [x for x in m if x.get("split") == "train"], "eval": [x for x in m if x.get("split") == "eval"],
            "events": [x["event"] for x in m if "event" in x], **extra}))


def master_weights(trainer) -> None:
    """The engine's fp32 master of every parameter (DeepSpeed's own accessor: a collective over the data group)."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in trainer.engine.module.named_parameters()}
    if trainer.layout.rank == 0:
        torch.save(full, OUT / "master.pt")


def init_master(source: str) -> None:
    """The fp32 master right after ``init_from`` a bf16 checkpoint, before any step (``init_master.pt``)."""
    from deepspeed.utils import safe_get_full_fp32_param
    from megannm.config import recipe_from_dict
    from megannm.stage import build_trainer
    d = phase_recipe("sft", DATA, OUT, name="init_master", precision="bf16", steps=STEPS, world=WORLD,
                     checkpoint__init_from=source)
    r = recipe_from_dict(d, source="init_master", world_size=WORLD)
    trainer = build_trainer(r, parallel.init_parallel(1, 1), source="init_master")
    trainer.restore(resume=False)
    full = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in trainer.engine.module.named_parameters()}
    if trainer.layout.rank == 0:
        torch.save(full, OUT / "init_master.pt")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", 0)) == 0:
        write_toy_pairs(DATA["tokenizers"], OUT / "pairs", n=32)
    for case in sys.argv[3:]:
        kind, _, precision = case.partition(":")
        if kind in ("pretrain", "sft", "grpo", "dpo"):
            parallel.init_parallel(1, 1)
            parallel.barrier()  # the pairs exist before any rank reads them
            name = f"{kind}_{precision}"
            try:
                trainer = run(name, kind, precision)
            except ValueError as e:  # a precision this processor cannot run (fp16 on most CPUs): its one line
                if int(os.environ.get("RANK", 0)) == 0:
                    (OUT / f"{name}.json").write_text(json.dumps({"refused": str(e)}))
                continue
            dump(name, optimizer=type(trainer.engine.optimizer).__name__,
                 dtype=str(next(trainer.engine.module.parameters()).dtype))
            if case == "pretrain:bf16":
                master_weights(trainer)
        elif kind == "resume":
            run("straight", "pretrain", "bf16")
            dump("straight")
            run("resumed", "pretrain", "bf16", schedule__exit_interval=3)
            run("resumed", "pretrain", "bf16", resume=True)
            dump("resumed")
        elif kind == "init":  # the next stage of a chain: bf16 weights from pretrain:bf16's checkpoint (ZeRO 1)
            init_master(str(OUT / "pretrain_bf16" / "checkpoints"))
            run("init", "sft", "bf16", checkpoint__init_from=str(OUT / "pretrain_bf16" / "checkpoints"))
            dump("init")
        elif kind == "pp2":
            trainer = run("pp2", "pretrain", "bf16", pp=2, data__global_batch_size=8)
            dump("pp2", optimizer=type(trainer.engine.optimizer).__name__)
        else:
            raise SystemExit(f"unknown case {case}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
