"""Run several trainer cases in ONE launch (start-up costs ~8 s per launch on 2 cores).

usage: python trainer_cases.py OUT DATA CASE [CASE ...]   (under torchrun / deepspeed / mpirun, or alone)

Each case writes OUT/<case>/ (metrics.jsonl, checkpoints) and rank 0 writes OUT/<case>.json with the per-step losses
and anything else the test asserts on.
"""
import json
import sys
from pathlib import Path

import torch

from megannm import parallel
from megannm.config import recipe_from_dict
from megannm.stage import build_trainer
from megannm.train.logging import read_metrics

OUT, DATA = Path(sys.argv[1]), Path(sys.argv[2])
CASES = sys.argv[3:]


def recipe(name, tp=1, pp=1, zero=1, mot=True, steps=4, save_interval=0, world=1, **extra):
    d = {
        "name": name, "seed": 7,
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "ffn_hidden_size": 64, "mot": mot,
                  "max_seq_len": 96, "z_loss": 1e-4},
        "parallel": {"tensor_parallel": tp, "pipeline_parallel": pp, "zero_stage": zero},
        "data": {"train": [{"path": str(DATA / "train")}], "valid": [{"path": str(DATA / "valid_seen")}],
                 "seq_len": 80, "micro_batch_size": 2, "global_batch_size": 8, "pack": True},
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "grad_clip": 1.0},
        "schedule": {"train_steps": steps, "warmup_steps": 1},
        "checkpoint": {"save_interval": save_interval, "keep_last": 3},
        "logging": {"dir": str(OUT / name), "interval": 1, "eval_batches": 2, "progress_bar": False},
    }
    for k, v in extra.items():
        a, b = k.split("__")
        d[a][b] = v
    return recipe_from_dict(d, source=name, world_size=world)


def train(r, resume=False):
    layout = parallel.init_parallel(r.parallel.tensor_parallel, r.parallel.pipeline_parallel)
    trainer = build_trainer(r, layout, source=r.name)
    trainer.run(resume=resume)
    return layout


def dump(name, layout, **extra):
    if layout.rank == 0:
        m = read_metrics(OUT / name)
        losses = [x["loss"] for x in m if x.get("split") == "train"]
        evals = [x["loss"] for x in m if x.get("split") == "eval"]
        (OUT / f"{name}.json").write_text(json.dumps({"losses": losses, "eval": evals, **extra}))


def empty_modality(zero, tp):
    """DP rank 0 gets a text-only micro-batch, DP rank 1 a mixed one: must train at every ZeRO stage."""
    from megannm.train.engine import build_engine
    from megannm.model.build import build_model
    from megannm.train.loop import load_vocab
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    r = recipe(f"empty_z{zero}_tp{tp}", tp=tp, zero=zero, world=world)
    layout = parallel.init_parallel(tp, 1)
    vocab = load_vocab(r)
    _, module = build_model(r, vocab, layout)
    engine = build_engine(r, layout, module)
    g = torch.Generator().manual_seed(layout.dp_rank)
    S = 16
    losses = []
    for step in range(2):
        for _ in range(r.grad_accum(world)):
            ids = torch.randint(0, vocab.text_size, (2, S + 1), generator=g)
            if layout.dp_rank == 1:  # half image codes
                ids[:, S // 2:] = torch.randint(vocab.image_start, vocab.image_end, (2, S + 1 - S // 2), generator=g)
            pos = torch.arange(S).expand(2, S)
            loss, _ = engine(input_ids=ids[:, :-1], position_ids=pos, document_ids=torch.zeros_like(pos),
                             labels=ids[:, 1:], loss_mask=torch.ones(2, S))
            engine.backward(loss)
            engine.step()
        losses.append(float(loss))
    # weights identical on every data-parallel rank (ZeRO 0-2 keep full params on every rank)
    checksum = None
    if zero < 3:
        total = torch.tensor([sum(float(p.detach().double().sum()) for p in engine.module.parameters())])
        gathered = [torch.zeros(1, dtype=total.dtype) for _ in range(layout.dp)]
        torch.distributed.all_gather(gathered, total, group=layout.dp_group)
        checksum = [float(x) for x in gathered]
    if layout.rank == 0:
        (OUT / f"empty_z{zero}_tp{tp}.json").write_text(json.dumps({"losses": losses, "checksums": checksum,
                                                                     "vocab_size": vocab.size}))


def guard_case(kind):
    """The cross-rank parts of the guard and of saving/loading, on this launch's ranks (2): rank 1 ALONE meets the
    fault (a NaN loss, a preemption signal, a full disk, a corrupt shard, a corrupt checkpoint file), and every rank
    must stop at the same step with the same verdict. Each rank writes OUT/guard_<kind>.rank<R>.json."""
    import os
    import shutil
    import signal

    from megannm.checkpoint import integrity
    from megannm.train.loop import load_vocab, verify_data
    world = int(os.environ.get("WORLD_SIZE", 1))
    name = f"guard_{kind}"
    r = recipe(name, steps=6, world=world, save_interval=1)
    layout = parallel.init_parallel(1, 1)
    out = {"rank": layout.rank}
    try:
        if kind == "shard":  # rank 1's share (the smaller valid shard) has a flipped byte
            bad = OUT / "guard_shard_data"
            if layout.rank == 0:
                shutil.copytree(DATA / "valid_seen", bad, dirs_exist_ok=True)
                f = bad / "shard-00000.zst"
                b = bytearray(f.read_bytes())
                b[len(b) // 2] ^= 0xFF
                f.write_bytes(bytes(b))
            torch.distributed.barrier()
            r = recipe(name, world=world, data__valid=[{"path": str(bad)}])
            verify_data(r, layout, load_vocab(r), source=name)
        elif kind == "resume":  # an optimizer file in rank 1's share of the checks is corrupt
            src = OUT / "guard_nan" / "checkpoints"
            dst = OUT / name / "checkpoints"
            if layout.rank == 0:
                shutil.copytree(src, dst, dirs_exist_ok=True)
                (dst / "diverged").unlink()  # (guard_nan's step 1 ran a bad step: resumed from here on purpose)
                (dst / "latest").write_text("step00000001\n")
                names = json.loads((dst / "step00000001" / "megannm.json").read_text())["files"]
                f = dst / "step00000001" / next(n for n in integrity.share(names, 1, 2) if "optim" in n)
                b = bytearray(f.read_bytes())
                b[len(b) // 2] ^= 0xFF
                f.write_bytes(bytes(b))
            torch.distributed.barrier()
            build_trainer(r, layout, source=name).run(resume=True)
        else:
            trainer = build_trainer(r, layout, source=name)
            loss = trainer.phase.loss

            def faulty(model, batch):  # rank 1 only, from its second step
                value, stats = loss(model, batch)
                if layout.rank == 1 and trainer.step >= 1:
                    if kind == "nan":
                        value, stats.sums["loss"] = value * float("nan"), stats.sums["loss"] * float("nan")
                    elif kind == "signal" and trainer.step == 1:
                        signal.raise_signal(signal.SIGUSR1)
                    elif kind == "enospc":
                        os.environ["MEGANNM_FAULT"] = "save_mid:2:enospc"
                return value, stats

            trainer.phase.loss = faulty
            out["exit_code"] = trainer.run()["exit_code"]
            out["step"] = trainer.step
    except (ValueError, RuntimeError) as e:
        out.update(error=type(e).__name__, message=str(e), silent=getattr(e, "silent", False))
    os.environ.pop("MEGANNM_FAULT", None)
    ck = OUT / name / "checkpoints"
    out["tags"] = sorted(p.name for p in ck.iterdir()) if ck.exists() else []
    (OUT / f"{name}.rank{layout.rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    world = int(__import__("os").environ.get("WORLD_SIZE", 1))
    for case in CASES:
        kind, _, arg = case.partition(":")
        if kind == "ref":  # single process reference, MoT and dense: ref:mot / ref:dense
            lay = train(recipe(f"ref_{arg}", mot=arg == "mot"))
            dump(f"ref_{arg}", lay)
        elif kind == "tp2":  # tp2:mot / tp2:dense, world 2
            lay = train(recipe(f"tp2_{arg}", tp=2, mot=arg == "mot", world=world))
            dump(f"tp2_{arg}", lay)
        elif kind == "zero":  # zero:3 over all ranks as data parallel
            lay = train(recipe(f"zero{arg}", zero=int(arg), world=world))
            dump(f"zero{arg}", lay)
        elif kind == "tp2dp2z3":  # 4 ranks: TP 2 x DP 2 with ZeRO-3, trains and saves
            lay = train(recipe("tp2dp2z3", tp=2, zero=3, world=world))
            ck = OUT / "tp2dp2z3" / "checkpoints"
            dump("tp2dp2z3", lay, files=sorted(p.name for p in (ck / "step00000004").iterdir()))
        elif kind == "resume":  # 2N straight vs N, stop, resume N (same process: new engines)
            lay = train(recipe("straight", steps=6, world=world, zero=int(arg or 1)))
            dump("straight", lay)
            train(recipe("resumed", steps=6, world=world, zero=int(arg or 1), schedule__exit_interval=3))
            lay = train(recipe("resumed", steps=6, world=world, zero=int(arg or 1)), resume=True)
            dump("resumed", lay)
        elif kind == "guard":  # guard:nan / guard:signal / guard:enospc / guard:shard / guard:resume (after nan)
            guard_case(arg)
        elif kind == "empty":  # empty:0..3 (ZeRO stage) under the current world, TP from WORLD: empty:3@2
            zero, _, tp = arg.partition("@")
            empty_modality(int(zero), int(tp or 1))
        else:
            raise SystemExit(f"unknown case {case}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
