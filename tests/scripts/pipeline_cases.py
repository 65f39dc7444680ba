"""Pipeline-parallel trainer cases, several per launch (start-up costs ~8 s per launch on 2 cores).

usage: python pipeline_cases.py OUT DATA CASE [CASE ...]   (under torchrun or the deepspeed launcher)

Cases (rank 0 writes OUT/<name>.json with the per-step metrics and anything else the test asserts on):
    ref:mot | ref:dense        pipeline 1, tensor 1 (every rank data-parallel): the reference
    pp2:mot | pp2:dense        pipeline 2 x tensor 1 (x data world/2)
    pp2tp2:mot | pp2tp2:dense  pipeline 2 x tensor 2 (4 ranks)
    resume                     pp2:mot stopped at step 3 by schedule.exit_interval, then resumed (new engines)
    init                       pipeline 2, weights from pp2:mot's checkpoint (checkpoint.init_from), 2 steps
    map                        pipeline state dict vs NMMModel built from the same seed: names and values
    grid                       DeepSpeed's grid vs megatron-core's groups for every tensor x pipeline split of the world

MoT and dense differ in more than the architecture, to cover the switches without more runs: dense runs at ZeRO 0
with the uniform partition and activation checkpointing, MoT at ZeRO 1 with the parameter-count partition.
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megannm import parallel
from megannm.config import recipe_from_dict
from megannm.train.logging import read_metrics
from megannm.stage import build_trainer

OUT, DATA = Path(sys.argv[1]), Path(sys.argv[2])
CASES = sys.argv[3:]
WORLD = int(os.environ.get("WORLD_SIZE", 1))
STEPS = 6
LOGGED = ("loss", "text_loss", "image_loss", "text_tokens", "image_tokens", "z_loss", "grad_norm", "lr")


def recipe(name, arch, tp=1, pp=1, steps=STEPS, **extra):
    mot = arch == "mot"
    d = {
        "name": name, "seed": 7,
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "mot": mot,
                  "max_seq_len": 96, "z_loss": 1e-4},
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": 1 if mot else 0,
                     "pipeline_partition": "parameters" if mot else "uniform",
                     "activation_checkpointing": not mot},
        "data": {"train": [{"path": str(DATA / "train")}], "valid": [{"path": str(DATA / "valid_seen")}],
                 "seq_len": 80, "micro_batch_size": 2, "global_batch_size": 8, "pack": True},
        # a clip well under the gradient norm: every step's update depends on the global norm over all stages
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "grad_clip": 0.05},
        "schedule": {"train_steps": steps, "warmup_steps": 1},
        "checkpoint": {"save_interval": 0, "keep_last": 3},
        # eval in the middle (between train_batch calls) and at the end, over the WHOLE validation set (64 caps
        # nothing here), so the eval statistics compare across data-parallel sizes
        "logging": {"dir": str(OUT / name), "interval": 1, "eval_interval": 3, "eval_batches": 64,
                    "progress_bar": False, "tensorboard": False},
    }
    for k, v in extra.items():
        a, b = k.split("__")
        d[a][b] = v
    return recipe_from_dict(d, source=name, world_size=WORLD)


def train(r, resume=False):
    layout = parallel.init_parallel(r.parallel.tensor_parallel, r.parallel.pipeline_parallel)
    trainer = build_trainer(r, layout, source=r.name)
    trainer.run(resume=resume)
    return trainer


def stage_info(trainer):
    """Rank 0's stage: its chain positions and which of its layers run under activation checkpointing (the blocks,
    when the recipe asks: ``run_chain`` recomputes them; none at all otherwise)."""
    from megannm.model.block import Block
    from megannm.model.pipeline import stage_bounds
    module = trainer.engine.module
    return {"bounds": list(stage_bounds(module)),
            "checkpointed": [isinstance(m, Block) for m in module.forward_funcs] if module.recompute else []}


def dump(name, **extra):
    if dist.get_rank() == 0:
        m = read_metrics(OUT / name)
        steps = [{k: x.get(k) for k in LOGGED} for x in m if x.get("split") == "train"]
        evals = [x for x in m if x.get("split") == "eval"]
        events = [x["event"] for x in m if "event" in x]
        (OUT / f"{name}.json").write_text(json.dumps({"steps": steps, "eval": evals, "events": events, **extra}))


def checkpoint_files(name):
    ck = OUT / name / "checkpoints"
    tag = (ck / "latest").read_text().strip()
    return sorted(p.name for p in (ck / tag).iterdir())


def map_case():
    """Build the pipeline stage and the whole NMMModel from one torch seed: every pipeline parameter maps onto a
    canonical name with the same (tensor-parallel shard of the) weights, and the stages together cover them all."""
    from megannm.model.pipeline import (build_pipeline_module, canonical_to_pipeline, pipeline_to_canonical,
                                        stage_bounds)
    from megannm.model.args import ModelArgs
    from megannm.model.transformer import NMMModel
    from megannm.train.loop import load_vocab
    tp, pp = (2, 2) if WORLD == 4 else (1, 2)
    r = recipe("map", "mot", tp=tp, pp=pp)
    layout = parallel.init_parallel(tp, pp)
    args = ModelArgs.from_config(r.model, load_vocab(r), tp)
    torch.manual_seed(r.seed)
    stage = build_pipeline_module(args, layout, partition=r.parallel.pipeline_partition)
    torch.manual_seed(r.seed)
    whole = NMMModel(args, layout).state_dict()
    mine, problems = [], []
    for key, value in stage.state_dict().items():
        name = pipeline_to_canonical(key)
        mine.append(name)
        if name not in whole:
            problems.append(f"{key} -> {name}: not in NMMModel")
        elif not torch.equal(value, whole[name]):
            problems.append(f"{key} -> {name}: values differ")
        position, inner = canonical_to_pipeline(name, args.layers)
        if f"{position}.{inner}" != key:
            problems.append(f"{key}: canonical_to_pipeline gives {position}.{inner}")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"names": mine, "problems": problems, "tp_rank": layout.tp_rank,
                                      "pp_rank": layout.pp_rank, "bounds": list(stage_bounds(stage))})
    if dist.get_rank() == 0:
        (OUT / f"map_tp{tp}.json").write_text(json.dumps({"ranks": gathered, "canonical": sorted(whole)}))


def grid_case():
    """For every tensor x pipeline split of this world: DeepSpeed's grid (from parallel.pipeline_topology) groups
    the same ranks as megatron-core's parallel_state, on every axis."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid
    from megatron.core import parallel_state as ps
    out = []
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            if WORLD % (tp * pp):
                continue
            layout = parallel.init_parallel(tp, pp)
            grid = PipelineParallelGrid(topology=parallel.pipeline_topology(layout))
            row = {"tp": tp, "pp": pp, "dp": layout.dp, "rank": layout.rank,
                   "ds": {"tensor": sorted(grid.slice_group), "data": sorted(grid.dp_group),
                          "pipeline": sorted(grid.pp_group)},
                   "megatron": {"tensor": sorted(dist.get_process_group_ranks(ps.get_tensor_model_parallel_group())),
                                "data": sorted(dist.get_process_group_ranks(ps.get_data_parallel_group())),
                                "pipeline": sorted(dist.get_process_group_ranks(
                                    ps.get_pipeline_model_parallel_group()))},
                   "coords": [layout.tp_rank, layout.dp_rank, layout.pp_rank],
                   "ds_coords": [grid.get_slice_parallel_rank(), grid.get_data_parallel_id(), grid.get_stage_id()]}
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, row)
            out.extend(gathered)
    if dist.get_rank() == 0:
        (OUT / f"grid_w{WORLD}.json").write_text(json.dumps(out))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        kind, _, arch = case.partition(":")
        if kind == "ref":
            train(recipe(f"ref_{arch}", arch))
            dump(f"ref_{arch}")
        elif kind in ("pp2", "pp2tp2"):
            name = f"{kind}_{arch}"
            trainer = train(recipe(name, arch, tp=2 if kind == "pp2tp2" else 1, pp=2))
            dump(name, files=checkpoint_files(name) if dist.get_rank() == 0 else None, **stage_info(trainer))
        elif kind == "resume":
            train(recipe("resumed", "mot", pp=2, schedule__exit_interval=3))
            train(recipe("resumed", "mot", pp=2), resume=True)
            dump("resumed")
        elif kind == "init":  # a new stage starting from pp2_mot's weights (module only), as a chain does
            train(recipe("init", "mot", pp=2, steps=2, checkpoint__init_from=str(OUT / "pp2_mot" / "checkpoints")))
            dump("init")
        elif kind == "map":
            map_case()
        elif kind == "grid":
            grid_case()
        else:
            raise SystemExit(f"unknown case {case}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
