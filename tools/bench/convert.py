"""Conversion throughput: DeepSpeed -> consolidated and consolidated -> Hugging Face vs a plain copy of the same bytes.

A MoT model of a few hundred MB (fp32) is saved by a real DeepSpeed engine (ZeRO-0, TP 1), then each conversion runs
once through the library (the same code as ``megannm convert``) and is timed against ``shutil.copyfile`` of its input
file on the same disk, in the same temporary folder. Throughput counts the weight bytes converted; a ratio of 1.0
means the conversion is as fast as copying its input.

    python tools/bench/convert.py [--hidden 768 --layers 6 --ffn 2048 --vocab 32768 --tmp DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768, help="total ids (text + image codes + specials)")
    p.add_argument("--tmp", default=None, help="folder for the files (default: the system's temporary folder)")
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

    import torch
    from megannm import parallel
    from megannm.config import recipe_from_dict
    from megannm.convert import consolidated
    from megannm.convert.deepspeed import read_deepspeed, write_deepspeed
    from megannm.convert.hf import export_hf
    from megannm.model.transformer import ModelArgs, NMMModel
    from megannm import checkpoint
    from megannm.train.checkpoint import save
    from megannm.train.engine import build_engine
    from megannm.vocab import DEFAULT_SPECIALS, Vocab

    layout = parallel.init_parallel(1, 1)
    n_text = a.vocab // 2
    vocab = Vocab(text_size=n_text, image_codes=a.vocab - n_text - len(DEFAULT_SPECIALS), image_grid=64)
    r = recipe_from_dict({
        "model": {"hidden_size": a.hidden, "num_layers": a.layers, "num_heads": a.heads, "ffn_hidden_size": a.ffn,
                  "mot": True, "max_seq_len": 256},
        "parallel": {"zero_stage": 0}, "data": {"seq_len": 256, "micro_batch_size": 1, "global_batch_size": 1},
        "schedule": {"train_steps": 10, "warmup_steps": 0}}, world_size=1)
    args = ModelArgs.from_config(r.model, vocab, 1)
    torch.manual_seed(0)
    engine = build_engine(r, layout, NMMModel(args, layout))
    work = Path(tempfile.mkdtemp(prefix="megannm-bench-convert-", dir=a.tmp))
    rows = []

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    def copy_time(src: Path) -> float:
        _, dt = timed(lambda: shutil.copyfile(src, work / "copy.bin"))
        (work / "copy.bin").unlink()
        return dt

    try:
        meta = {"model_args": args.to_dict(), "vocab": vocab.to_dict(), "layout": layout.to_dict(), "zero_stage": 0,
                "recipe": r.model_dump(mode="json"), "consumed_samples": 0}
        ckpt = save(engine, work / "ds", 0, meta, layout)
        weights = sum(p.numel() * p.element_size() for p in engine.module.parameters())
        ds_file = ckpt / "mp_rank_00_model_states.pt"

        # DeepSpeed (TP 1, ZeRO-0, as saved by the engine) -> consolidated
        base = copy_time(ds_file)
        c, dt = timed(lambda: consolidated.write(read_deepspeed(ckpt), work / "consolidated"))
        rows.append(("deepspeed tp1 -> consolidated", ds_file.stat().st_size, base, weights, dt))
        # consolidated -> Hugging Face (MoT: remote-code class)
        cons_file = work / "consolidated" / "model.safetensors"
        base = copy_time(cons_file)
        _, dt = timed(lambda: export_hf(consolidated.read(work / "consolidated"), work / "hf"))
        rows.append(("consolidated -> hf", cons_file.stat().st_size, base, weights, dt))
        # re-sharding: consolidated -> DeepSpeed TP 2 -> consolidated (the merge path of TP checkpoints)
        write_deepspeed(consolidated.read(work / "consolidated"), work / "ds_tp2", tp=2)
        tp2 = checkpoint.resolve(work / "ds_tp2")
        base = sum(copy_time(f) for f in sorted(tp2.glob("mp_rank_*_model_states.pt")))
        size = sum(f.stat().st_size for f in tp2.glob("mp_rank_*_model_states.pt"))
        _, dt = timed(lambda: consolidated.write(read_deepspeed(tp2), work / "consolidated_tp2"))
        rows.append(("deepspeed tp2 -> consolidated", size, base, weights, dt))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        parallel.shutdown()

    gb = 1e9
    print(f"model: MoT hidden {a.hidden}, layers {a.layers}, heads {a.heads}, ffn {a.ffn}, vocab {vocab.size}: "
          f"{args_params(args):,} parameters, {weights / 1e6:.0f} MB fp32; files in {work.parent} (one run)")
    print(f"{'conversion':32s} {'input MB':>9s} {'copy GB/s':>10s} {'convert GB/s':>13s} {'ratio':>6s}")
    result = {"bench": "convert", "baseline": "plain file copy (shutil.copyfile of the conversion's input, same disk)"}
    keys = {"deepspeed tp1 -> consolidated": "deepspeed_to_consolidated_vs_copy",
            "consolidated -> hf": "consolidated_to_hf_vs_copy",
            "deepspeed tp2 -> consolidated": "deepspeed_tp2_to_consolidated_vs_copy"}
    for name, size, base, nbytes, dt in rows:
        copy_gbs, conv_gbs = size / base / gb, nbytes / dt / gb
        print(f"{name:32s} {size / 1e6:9.0f} {copy_gbs:10.2f} {conv_gbs:13.2f} {conv_gbs / copy_gbs:6.2f}")
        result[keys[name]] = round(conv_gbs / copy_gbs, 3)
        result[keys[name].replace("_vs_copy", "_gb_per_s")] = round(conv_gbs, 3)
    result["copy_gb_per_s"] = round(rows[0][1] / rows[0][2] / gb, 3)
    result["model_mb"] = round(weights / 1e6)
    print(json.dumps(result))


def args_params(args) -> int:
    from megannm.model import flops
    return int(flops.num_params(args))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
