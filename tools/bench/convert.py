"""Conversion throughput and memory: each conversion vs the median of plain copies of the same bytes.

A MoT model of a few hundred MB (fp32) is saved by a real DeepSpeed engine (ZeRO-0, TP 1); a TP 2 checkpoint and a
consolidated folder are made from it. Then each conversion (the library calls ``megannm convert`` makes) runs
``--rounds`` times, each time in a FRESH subprocess that times only the conversion call; one more run samples its
anonymous memory (``RssAnon`` of /proc/self/status, every millisecond, minus its value just before the call: the
memory the conversion itself allocates; memory-mapped input and page cache are not in it). Between the runs the
parent copies the conversion's input files (``shutil.copyfile``, same disk, same folder), so copies and conversions
interleave and see the same disk and load; the baseline is the MEDIAN copy time (copy speed varies several-fold
within a run on a shared machine). ratio = median copy time / median conversion time of the same input bytes:
1.0 means as fast as copying the input; the goal is >= 0.8. Peak memory is printed beside the largest tensor and
the model (bound: one output file, a safetensors shard or a DeepSpeed rank file, plus a few tensors; not the
model). Every copy and every conversion starts after ``os.sync()``
(untimed): otherwise the write-back of what came before (the sources, gigabytes, are written just before the first
conversion) throttles whichever writer runs next; and its input files are read through once (untimed, ``warm``), so
that both read them from the page cache. The timed rounds start once untimed runs of the first conversion agree
(``settle``): this VM is several times slower for a while after building the sources.

    python tools/bench/convert.py [--hidden 768 --layers 6 --ffn 2048 --vocab 32768 --rounds 3 --tmp DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

GOAL = 0.8  # issue #20: every conversion at least this fraction of a plain copy's speed
CONVERSIONS = {  # name -> (source folder, JSON key)
    "deepspeed tp1 -> consolidated": ("ds", "deepspeed_to_consolidated"),
    "consolidated -> hf": ("consolidated", "consolidated_to_hf"),
    "deepspeed tp2 -> consolidated": ("ds_tp2", "deepspeed_tp2_to_consolidated"),
    "consolidated -> deepspeed tp2": ("consolidated", "consolidated_to_deepspeed_tp2"),
}


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def warm(files: list[Path]) -> None:
    """Read ``files`` through once (untimed), so that the timed operation reads them from the page cache: the copy
    and the conversion alike. Needed on machines that reclaim page cache proactively (this VM's DAMON pages out
    memory it has not seen touched for a minute: without this, the first conversion read its input from disk)."""
    buf = bytearray(8 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def settle(probe, limit_s: float = 180.0) -> float:
    """Untimed runs of ``probe()`` (returns seconds: the first conversion) until three in a row agree within 15%
    (at most ``limit_s``); returns the seconds it took. Right after the sources are built this VM runs the first
    conversion 2-10x slower for tens of seconds (measured: 2.2, 1.9, 1.3, then 0.23 s a run) while plain copies
    may already be back to speed, whatever is synced or cached: without the wait the first row of the table
    measures that, not the conversion."""
    start, times = time.perf_counter(), []
    while time.perf_counter() - start < limit_s:
        times.append(probe())
        last = times[-3:]
        if len(last) == 3 and max(last) <= 1.15 * min(last):
            break
    return time.perf_counter() - start


def convert_once(name: str, src: Path, dst: Path, measure: str = "time") -> dict:
    """One conversion in this (fresh) process: its wall time (``measure="time"``) or the peak anonymous memory it
    added (``"memory"``: sampled by a thread every millisecond, which would slow the timed run by taking the GIL,
    hence a run of its own). What it imports on first use (DeepSpeed, the model's modules) is imported before the
    clock starts: a fixed cost of a few seconds per command, not throughput."""
    import deepspeed  # noqa: F401
    import safetensors.torch  # noqa: F401

    import megannm.model.args  # noqa: F401
    import megannm.model.pipeline  # noqa: F401
    from megannm.checkpoint import consolidated
    from megannm.checkpoint.deepspeed import read_deepspeed
    from megannm.convert.deepspeed import write_deepspeed
    from megannm.convert.hf import export_hf
    run = {"deepspeed tp1 -> consolidated": lambda: consolidated.write(read_deepspeed(src), dst),
           "consolidated -> hf": lambda: export_hf(consolidated.read(src), dst),
           "deepspeed tp2 -> consolidated": lambda: consolidated.write(read_deepspeed(src), dst),
           "consolidated -> deepspeed tp2": lambda: write_deepspeed(consolidated.read(src), dst, tp=2)}[name]
    base = peak = rss_anon()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.001)

    warm(input_files(name, src))
    if measure == "time":
        t = time.perf_counter()
        run()
        return {"seconds": time.perf_counter() - t}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    done.set()
    sampler.join()
    return {"peak_anon": max(peak, rss_anon()) - base}


def input_files(name: str, src: Path) -> list[Path]:
    """The files a conversion reads (what the copy baseline copies)."""
    if name.startswith("deepspeed"):
        from megannm import checkpoint
        return sorted(checkpoint.resolve(src).glob("mp_rank_*_model_states.pt"))
    return sorted(src.glob("*.safetensors"))


def build_sources(a, work: Path) -> dict:
    """A real DeepSpeed ZeRO-0 checkpoint of the model, its consolidated folder and a TP 2 checkpoint."""
    import torch

    from megannm import parallel
    from megannm.config import recipe_from_dict
    from megannm.checkpoint import consolidated
    from megannm.checkpoint.deepspeed import read_deepspeed
    from megannm.convert.deepspeed import write_deepspeed
    from megannm.model.transformer import ModelArgs, NMMModel
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
    meta = {"model_args": args.to_dict(), "vocab": vocab.to_dict(), "layout": layout.to_dict(), "zero_stage": 0,
            "recipe": r.model_dump(mode="json"), "consumed_samples": 0}
    save(engine, work / "ds", 0, meta, layout)
    sizes = [p.numel() * p.element_size() for p in engine.module.parameters()]
    del engine
    consolidated.write(read_deepspeed(work / "ds"), work / "consolidated")
    write_deepspeed(consolidated.read(work / "consolidated"), work / "ds_tp2", tp=2)
    parallel.shutdown()
    from megannm.model import flops
    return {"model_bytes": sum(sizes), "largest_bytes": max(sizes), "params": int(flops.num_params(args)),
            "vocab": vocab.size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768, help="total ids (text + image codes + specials)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each conversion (each between two copies)")
    p.add_argument("--tmp", default=None, help="folder for the files (default: the system's temporary folder)")
    p.add_argument("--one", nargs=3, metavar=("NAME", "SRC", "DST"), help=argparse.SUPPRESS)  # the child's mode
    p.add_argument("--measure", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)  # the child's
    a = p.parse_args()
    warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
    if a.one:
        print(json.dumps(convert_once(a.one[0], Path(a.one[1]), Path(a.one[2]), a.measure)))
        return

    load_before = os.getloadavg()  # reported: a busy machine (another job on the cores) skews every ratio
    work = Path(tempfile.mkdtemp(prefix="megannm-bench-convert-", dir=a.tmp))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]))
    rows = []
    try:
        info = build_sources(a, work)

        def copy(files: list[Path]) -> float:
            os.sync()  # (untimed) no earlier write's dirty pages left to throttle this one: see the docstring
            warm(files)
            t = time.perf_counter()
            for i, f in enumerate(files):
                shutil.copyfile(f, work / f"copy{i}.bin")
            dt = time.perf_counter() - t
            for i in range(len(files)):
                (work / f"copy{i}.bin").unlink()
            return dt

        def child(name: str, src: str, measure: str) -> dict:
            os.sync()
            out = subprocess.run([sys.executable, __file__, "--one", name, str(work / src), str(work / "out"),
                                  "--measure", measure], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{name}: the conversion failed:\n{out.stderr[-3000:]}")
            shutil.rmtree(work / "out")
            return json.loads(out.stdout.strip().splitlines()[-1])

        first, (first_src, _) = next(iter(CONVERSIONS.items()))
        settled = settle(lambda: child(first, first_src, "time")["seconds"])
        for name, (src, _) in CONVERSIONS.items():
            files = input_files(name, work / src)
            nbytes = sum(f.stat().st_size for f in files)
            copies, seconds = [copy(files)], []
            for _ in range(a.rounds):
                seconds.append(child(name, src, "time")["seconds"])
                copies.append(copy(files))
            peak = child(name, src, "memory")["peak_anon"]
            rows.append((name, nbytes, statistics.median(copies), min(copies), max(copies),
                         statistics.median(seconds), peak, min(seconds), max(seconds)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = 1e6
    load_after = os.getloadavg()
    print(f"machine load (1-min average) {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"({os.cpu_count()} cores; above ~0.5 another job shares them and the ratios are not the code's alone)")
    print(f"settled in {settled:.0f} s (untimed runs of the first conversion until three in a row agreed within "
          f"15%)")
    print(f"model: MoT hidden {a.hidden}, layers {a.layers}, heads {a.heads}, ffn {a.ffn}, vocab {info['vocab']}: "
          f"{info['params']:,} parameters, {info['model_bytes'] / mb:.0f} MB fp32, largest tensor "
          f"{info['largest_bytes'] / mb:.0f} MB; {a.rounds} runs per conversion, each in a fresh process, between "
          f"copies of its input (files in {work.parent})")
    print(f"{'conversion':32s} {'input MB':>9s} {'copy GB/s med (min-max)':>24s} {'convert GB/s med (min-max)':>27s} "
          f"{'ratio':>6s} {'goal':>5s} {'peak RssAnon MB':>16s} {'/ largest':>10s}")
    result = {"bench": "convert", "baseline": "median of plain copies (shutil.copyfile) of the conversion's input "
                                              "files, interleaved with the conversions; memory: peak RssAnon growth "
                                              "of the conversion in a fresh process"}
    for name, nbytes, copy_med, copy_min, copy_max, conv, peak, conv_min, conv_max in rows:
        key = CONVERSIONS[name][1]
        ratio = copy_med / conv
        spread = f"{nbytes / copy_med / 1e9:.2f} ({nbytes / copy_max / 1e9:.2f}-{nbytes / copy_min / 1e9:.2f})"
        conv_spread = f"{nbytes / conv / 1e9:.2f} ({nbytes / conv_max / 1e9:.2f}-{nbytes / conv_min / 1e9:.2f})"
        print(f"{name:32s} {nbytes / mb:9.0f} {spread:>24s} {conv_spread:>27s} {ratio:6.2f} "
              f"{'ok' if ratio >= GOAL else 'below':>5s} {peak / mb:16.1f} {peak / info['largest_bytes']:10.2f}")
        result[f"{key}_vs_copy"] = round(ratio, 3)
        result[f"{key}_gb_per_s"] = round(nbytes / conv / 1e9, 3)
        result[f"{key}_peak_mb"] = round(peak / mb, 1)
    result["copy_gb_per_s_median"] = round(rows[0][1] / rows[0][2] / 1e9, 3)
    result["load_average_1min"] = [round(load_before[0], 2), round(load_after[0], 2)]
    result["settle_s"] = round(settled, 1)
    result["model_mb"] = round(info["model_bytes"] / mb)
    result["largest_tensor_mb"] = round(info["largest_bytes"] / mb, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
