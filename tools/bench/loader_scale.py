#!/usr/bin/env python
"""The loader at cluster scale: sample-plan build time, per-rank resident memory, time to the first batch.

For each size (default 1M and 10M documents; ``--docs 1e6,1e7,1e8``) a synthetic data set is written twice, with
the same document lengths (caption pairs: <bos>, an 8-64 token caption, <boi>, 256 image codes, <eoi>, <eos>): as
megannm shards (the real format, written vectorised, token payload all zeros: only the index matters here) and as
a megatron-core IndexedDataset (.idx with the same lengths, .bin a sparse file). Then, each in a fresh process:

  ours build   build the epoch-0 sample plan into the cache (``EpochStore.ensure``): seconds, peak RSS
  ours run     with the cache built: build_train_iterator for data-parallel rank 0 of 8, time to the first
               micro-batch, then 200 micro-batches; resident memory split into anonymous (the process's own) and
               file-backed (mmaps, page cache) at start-up and in steady state, all measured above the RSS the
               process had after its imports
  mcore build  megatron-core GPTDataset index build (document, sample and shuffle indices; C++ helpers) for one
               epoch of the same documents, into a fresh cache: seconds, peak RSS

Ratios: plan build time / GPTDataset build time; steady-state anonymous memory per document (the goal: under
200 MB per rank at 100M documents beyond the mmaps) and the time to the first batch (goal: under 5 s).

    python tools/bench/loader_scale.py [--docs 1e6,1e7] [--seq-len 4096] [--work DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

IMAGE_TOKENS = 256
FRAME_TOKENS = 1 << 19  # ~1 MiB of uint16 tokens per frame, as ShardWriter's default
DOCS_PER_SHARD = 100_000  # preprocess's default
MICRO, GLOBAL, DP = 4, 512, 8


def lengths_for(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    captions = rng.integers(8, 65, n).astype(np.uint32)
    return captions + IMAGE_TOKENS + 4, captions


def write_ours(folder: Path, lengths: np.ndarray, captions: np.ndarray) -> None:
    """A shard folder in megannm's format (manifest, vocab.json, shard-*.zst/.idx), vectorised per shard."""
    import zstandard

    from megannm.data import shards
    from megannm.vocab import Vocab

    vocab = Vocab(text_size=32000, image_codes=8192)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cctx, zeros = zstandard.ZstdCompressor(level=1), {}
    entries = []
    for k, a in enumerate(range(0, len(lengths), DOCS_PER_SHARD)):
        ln = lengths[a:a + DOCS_PER_SHARD].astype(np.int64)
        start = np.cumsum(ln) - ln
        _, frame = np.unique(start // FRAME_TOKENS, return_inverse=True)  # whole documents per frame
        first = np.searchsorted(frame, np.arange(frame.max() + 1))
        frame_start = start[first]
        docs = np.zeros(len(ln), shards.DOC_DTYPE)
        docs["frame"], docs["offset"], docs["length"] = frame, start - frame_start[frame], ln
        docs["mask"], docs["caption"] = shards.NO_MASK, captions[a:a + DOCS_PER_SHARD]
        counts = np.diff(np.append(first, len(ln)))
        sizes = (np.add.reduceat(ln, first) * 2).tolist()
        frames = np.zeros(len(first), shards.FRAME_DTYPE)
        blobs, at = [], 0
        for f, size in enumerate(sizes):
            if size not in zeros:  # a frame of zeros compresses to a few dozen bytes
                zeros[size] = cctx.compress(bytes(size))
            blob = zeros[size]
            frames[f] = (at, len(blob), size, zlib.crc32(blob), first[f], counts[f])
            blobs.append(blob)
            at += len(blob)
        shard, index = tmp / shards.shard_name(k), tmp / shards.index_name(k)
        shard.write_bytes(b"".join(blobs))
        buf = io.BytesIO()
        np.save(buf, docs)
        np.save(buf, frames)
        index.write_bytes(zstandard.ZstdCompressor(level=3).compress(buf.getvalue()))
        entries.append({"file": shard.name, "index": index.name, "docs": len(ln), "tokens": int(ln.sum()),
                        "frames": len(first), "bytes": shard.stat().st_size,
                        "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
                        "index_bytes": index.stat().st_size,
                        "index_sha256": hashlib.sha256(index.read_bytes()).hexdigest()})
    manifest = {"format": shards.FORMAT, "version": shards.VERSION, "vocab_fingerprint": vocab.fingerprint,
                "vocab": vocab.to_dict(), "token_dtype": "uint16", "num_docs": len(lengths),
                "num_tokens": int(lengths.sum(dtype=np.int64)), "num_masked_docs": 0, "shards": entries}
    vocab.save(tmp / "vocab.json")
    (tmp / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def write_megatron(prefix: Path, lengths: np.ndarray) -> None:
    """megatron-core's IndexedDataset .idx (format of its _IndexWriter) and a sparse .bin of the same tokens."""
    n = len(lengths)
    pointers = np.zeros(n, np.int64)
    pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64) * 2)
    with open(str(prefix) + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8))  # version 1, uint16
        f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
        f.write(lengths.astype(np.int32).tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(n + 1, dtype=np.int64).tobytes())  # one sequence per document
    with open(str(prefix) + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)


# ---------------------------------------------------------------------------------------------------------------------
# measurements, each in its own process


def rss() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def worker_ours_build(folder: str, plans: str, seq_len: int) -> dict:
    from megannm.data.loader import build_order
    base = rss()
    t = time.perf_counter()
    order = build_order([(folder, 1.0)], None, seq_len, seed=1234, caption_dropout=0.1, plan_dir=plans)
    order.streams[0].store.ensure([0])
    plan = order.streams[0].epoch_index(0)
    return {"build_s": time.perf_counter() - t, "samples": plan.num_samples, "base": base, "peak": rss()["VmHWM"],
            "plan_bytes": sum(p.stat().st_size for p in Path(plans).rglob("*.npy"))}


def worker_ours_run(folder: str, plans: str, seq_len: int, steps: int) -> dict:
    import torch
    from megannm.data.loader import build_train_iterator
    torch.zeros(1)
    base = rss()
    t = time.perf_counter()
    it = build_train_iterator([(folder, 1.0)], None, seq_len, MICRO, GLOBAL, 0, DP, seed=1234, caption_dropout=0.1,
                              plan_dir=plans)
    next(it)
    first_s = time.perf_counter() - t
    start = rss()
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    per_batch = (time.perf_counter() - t) / steps
    steady = rss()
    return {"first_batch_s": first_s, "base": base, "start": start, "steady": steady, "per_batch_s": per_batch,
            "index_bytes": it.order.streams[0].ds.index_bytes()}


def worker_mcore(prefix: str, cache: str, seq_len: int) -> dict:
    import logging
    import warnings
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    class Tokenizer:  # what GPTDataset asks of one
        eod, eos, pad, vocab_size, special_tokens_dict = 0, 0, 1, 40192, {}
        unique_identifiers = {"class": "synthetic"}

    base = rss()
    t = time.perf_counter()
    ds = IndexedDataset(prefix)
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq_len, blend=([prefix], None), split="1,0,0",
                              tokenizer=Tokenizer(), reset_position_ids=True, reset_attention_mask=True,
                              eod_mask_loss=False, create_attention_mask=False, path_to_cache=cache)
    g = GPTDataset(ds, prefix, np.arange(len(ds), dtype=np.int32), None, Split.train, config)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    g[0]
    return {"build_s": build_s, "samples": len(g), "first_sample_s": time.perf_counter() - t, "base": base,
            "peak": rss()["VmHWM"]}


def spawn(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def run_size(n: int, seq_len: int, work: Path, steps: int) -> dict:
    folder, prefix = work / f"ours-{n}", work / f"mcore-{n}"
    t = time.perf_counter()
    lengths, captions = lengths_for(n)
    write_ours(folder, lengths, captions)
    write_megatron(prefix, lengths)
    gen_s = time.perf_counter() - t
    del lengths, captions
    plans, cache = work / f"plans-{n}", work / f"mcore-cache-{n}"
    shutil.rmtree(plans, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    build = spawn("ours_build", folder, plans, seq_len)
    runs = spawn("ours_run", folder, plans, seq_len, steps)
    mcore = spawn("mcore", prefix, cache, seq_len)
    return {"docs": n, "gen_s": gen_s, "ours_build": build, "ours_run": runs, "mcore": mcore}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", default="1e6,1e7", help="comma-separated data set sizes in documents")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=200, help="micro-batches read for the steady state")
    p.add_argument("--work", type=Path, default=None, help="folder for the data sets (default: a temporary one)")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        kind, *args = a.worker
        fn = {"ours_build": worker_ours_build, "ours_run": worker_ours_run, "mcore": worker_mcore}[kind]
        conv = [int(x) if x.isdigit() else x for x in args]
        print(json.dumps(fn(*conv)))
        return 0
    work = a.work or Path(tempfile.mkdtemp(prefix="megannm-bench-scale-"))
    sizes = [int(float(x)) for x in a.docs.split(",")]
    t0 = time.perf_counter()
    results = []
    try:
        for n in sizes:
            results.append(run_size(n, a.seq_len, work, a.steps))
            print(f"  {n:,} documents done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    mb = 2 ** 20
    print(f"{'docs':>12} {'plan s':>8} {'mcore s':>8} {'ratio':>6} {'plan MB':>8} {'peak MB':>8} "
          f"{'mcore pk':>8} {'1st batch s':>11} {'anon start':>10} {'anon steady':>11} {'file steady':>11} "
          f"{'B/doc':>6} {'ms/batch':>8}")
    rows = []
    for r in results:
        b, run, m = r["ours_build"], r["ours_run"], r["mcore"]
        anon_start = run["start"]["RssAnon"] - run["base"]["RssAnon"]
        anon_steady = run["steady"]["RssAnon"] - run["base"]["RssAnon"]
        file_steady = run["steady"]["RssFile"] - run["base"]["RssFile"]
        row = {"docs": r["docs"], "plan_build_s": round(b["build_s"], 3), "mcore_build_s": round(m["build_s"], 3),
               "build_ratio": round(b["build_s"] / m["build_s"], 3),
               "plan_peak_mb": round((b["peak"] - b["base"]["VmRSS"]) / mb, 1),
               "mcore_peak_mb": round((m["peak"] - m["base"]["VmRSS"]) / mb, 1),
               "plan_file_mb": round(b["plan_bytes"] / mb, 1),
               "first_batch_s": round(run["first_batch_s"], 3),
               "anon_start_mb": round(anon_start / mb, 1), "anon_steady_mb": round(anon_steady / mb, 1),
               "file_steady_mb": round(file_steady / mb, 1),
               "bytes_per_doc_steady": round(anon_steady / r["docs"], 3),
               "per_batch_ms": round(1000 * run["per_batch_s"], 2), "samples": b["samples"],
               "mcore_samples": m["samples"]}
        rows.append(row)
        print(f"{row['docs']:>12,} {row['plan_build_s']:>8.2f} {row['mcore_build_s']:>8.2f} {row['build_ratio']:>6.2f} "
              f"{row['plan_file_mb']:>8.1f} {row['plan_peak_mb']:>8.0f} {row['mcore_peak_mb']:>8.0f} "
              f"{row['first_batch_s']:>11.3f} {row['anon_start_mb']:>10.1f} {row['anon_steady_mb']:>11.1f} "
              f"{row['file_steady_mb']:>11.1f} {row['bytes_per_doc_steady']:>6.2f} {row['per_batch_ms']:>8.2f}")
    print(f"(one data set, seq_len {a.seq_len}, rank 0 of {DP}, micro-batch {MICRO}; memory above the process's RSS "
          f"after imports; plan = epoch 0 into a fresh cache; mcore = GPTDataset index build, one epoch, fresh "
          f"cache; total {time.perf_counter() - t0:.0f} s)")
    big = rows[-1]
    result = {"bench": "loader_scale", "baseline": "megatron-core GPTDataset index build (same documents)",
              "docs": big["docs"], "build_ratio": big["build_ratio"], "plan_build_s": big["plan_build_s"],
              "mcore_build_s": big["mcore_build_s"], "first_batch_s": big["first_batch_s"],
              "anon_steady_mb": big["anon_steady_mb"], "bytes_per_doc_steady": big["bytes_per_doc_steady"],
              "sizes": rows}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
