"""Save, convert and load real DeepSpeed checkpoints for the conversion tests, many cases in ONE launch.

usage: python convert_cases.py OUT DATA CASE [CASE ...]   (under torchrun, or alone)

    save:NAME:TP:PP:ZERO:ARCH          train 2 steps at TP x PP (data parallel = the rest) and save; rank 0 writes
                                       OUT/NAME.json (losses) and OUT/NAME.live.pt: the live weights gathered from the
                                       engine through megatron-core's own partition attributes (the ground truth
                                       the converted files are compared with)
    convert:SRC:DST[:ARG...]           rank 0 runs `megannm convert SRC DST ARG...` (paths relative to OUT)
    init:NAME:TP:PP:ZERO:ARCH:SRC      train 2 steps from checkpoint.init_from=SRC
    native:NAME:TP:PP:ZERO:ARCH:SRC    the same, loading SRC with DeepSpeed's own load_checkpoint(load_module_only)
    resume:NAME:TP:PP:ZERO:ARCH:DIR    train to step 4 with checkpoint.dir=DIR and --resume

ARCH: mot, dense, or llama (MoT without QK-norm, on the data set OUT/llm_shards: a model imported from a Hugging Face
LLM). Every run's recipe is the same apart from the layout, so losses compare across layouts.
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


def path(p: str) -> str:
    return p if os.path.isabs(p) else str(OUT / p)


def recipe(name, tp, pp, zero, arch, steps=2, **checkpoint):
    data = OUT / "llm_shards" if arch == "llama" else DATA
    d = {
        "name": name, "seed": 11,
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_size": 64,
                  "mot": arch != "dense", "qk_norm": arch != "llama", "max_seq_len": 96, "z_loss": 1e-4},
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": zero},
        "data": {"train": [{"path": str(data / "train")}], "seq_len": 80, "micro_batch_size": 2,
                 "global_batch_size": 8, "pack": True},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "grad_clip": 1.0},
        "schedule": {"train_steps": steps, "warmup_steps": 1},
        "checkpoint": {"keep_last": 2, **checkpoint},
        "logging": {"dir": str(OUT / name), "interval": 1, "progress_bar": False, "tensorboard": False},
    }
    return recipe_from_dict(d, source=name, world_size=WORLD)


def live_weights(trainer) -> dict:
    """The engine's current full weights by canonical name, gathered over data (ZeRO-3), tensor (megatron-core's
    ``partition_dim`` attribute) and pipeline ranks; vocabulary padding rows dropped."""
    import deepspeed
    module, layout = trainer.engine.module, trainer.layout
    rename = (lambda n: n)
    if layout.pp > 1:
        from megannm.model.pipeline import pipeline_to_canonical as rename
    out = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            t = p.detach().clone().float()
        if getattr(p, "tensor_model_parallel", False) and layout.tp > 1:
            parts = [torch.empty_like(t) for _ in range(layout.tp)]
            dist.all_gather(parts, t.contiguous(), group=layout.tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[rename(name)] = t
    for name in ("embedding.embed_tokens.weight", "head.output.weight"):
        if name in out:
            out[name] = out[name][:trainer.args.vocab_size]
    if layout.pp > 1:  # every stage's part, merged
        parts = [None] * layout.world_size
        dist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    return out


def train(kind, name, tp, pp, zero, arch, src=None):
    tp, pp, zero = int(tp), int(pp), int(zero)
    extra, steps = {}, 2
    if kind == "init":
        extra["init_from"] = path(src)
    if kind == "resume":
        extra["dir"], steps = path(src), 4
    r = recipe(name, tp, pp, zero, arch, steps=steps, **extra)
    layout = parallel.init_parallel(tp, pp)
    trainer = build_trainer(r, layout, source=name)
    if kind == "native":  # DeepSpeed's own loader on a folder written by `megannm convert --to deepspeed`
        ckpt = Path(path(src))
        tag = (ckpt / "latest").read_text().strip()
        trainer.engine.load_checkpoint(str(ckpt), tag=tag, load_module_only=True, load_optimizer_states=False,
                                       load_lr_scheduler_states=False)
    trainer.run(resume=kind == "resume")
    live = live_weights(trainer) if kind == "save" else None
    if layout.rank == 0:
        m = read_metrics(OUT / name)
        losses = [x["loss"] for x in m if x.get("split") == "train"]
        lrs = [x["lr"] for x in m if x.get("split") == "train"]
        events = [x for x in m if x.get("event")]
        (OUT / f"{name}.json").write_text(json.dumps({"losses": losses, "lr": lrs, "events": events}))
        if live is not None:
            torch.save(live, OUT / f"{name}.live.pt")
    parallel.barrier()


def convert(src, dst, *args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        from megannm.cli.convert import convert as convert_main
        convert_main([path(src), path(dst), *args])
    parallel.barrier()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    parallel.init_parallel(1, 1)
    for case in CASES:
        kind, *rest = case.split(":")
        if kind == "convert":
            convert(*rest)
        else:
            train(kind, *rest)
    parallel.shutdown()


if __name__ == "__main__":
    main()
