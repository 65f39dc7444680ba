#!/usr/bin/env python
"""Token read speed and bytes on disk: megannm shards vs megatron-core's IndexedDataset (mmap .bin/.idx).

Both sides get the same documents (toy-world token streams: real captions through the real byte-level BPE, real
toy pictures through the real PatchVQ), written once each (megannm: ``ShardWriter``; megatron-core:
``IndexedDatasetBuilder`` with the same uint16 dtype). Then both read every document once, in the same order,
and turn each into the same form (an int64 torch tensor): the order the loader uses (its seeded frame-local
epoch permutation) and the stored order. Each side reads with a fresh reader, 3 passes, best pass reported; the
files are in the page cache for both (just written), so this measures the readers, not the disk. One more row
reads 2,000 uniformly random documents with only 4 frames cached: the worst case of a frame-compressed format,
which the loader's frame-local shuffle avoids.

A second, smaller data set replaces the image codes with uniform random ones (what a VQ of natural photographs
looks like to a compressor) to show how much of the size win depends on the data.

    python tools/bench/data.py [--tokens 16e6] [--natural-tokens 4e6] [--passes 3]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megannm.data import packing  # noqa: E402
from megannm.toy import world as toy  # noqa: E402
from megannm.data.shards import ShardDataset, ShardWriter  # noqa: E402
from megannm.vocab import Vocab  # noqa: E402

WINDOW = 16  # the loader's default frame window (and reader cache 2 * WINDOW + 2)


def toy_documents(n_tokens: int, seed: int, natural: bool, work: Path):
    """Toy-world documents (uint16 arrays) totalling about ``n_tokens``: ``<bos> caption <boi> 64 codes <eoi>
    <eos>`` or image first (35%, as write_toy_dataset does)."""
    from megannm.data.image_tokenizer import PatchVQ
    from megannm.data.text_tokenizer import load_text_tokenizer, text_digest, train_text_tokenizer

    rng = np.random.default_rng(seed)
    attrs, images = toy.every_image()
    vq = PatchVQ.train(images, codebook_size=1024, seed=seed)
    captions = [toy.caption(a, rng) for a in toy.sample_attrs(4000, rng, "all")]
    text_dir = train_text_tokenizer(captions, work / "text", vocab_size=512)
    text = load_text_tokenizer(text_dir)
    vocab = Vocab(text_size=len(text), image_codes=vq.codebook_size, text_digest=text_digest(text_dir),
                  image_grid=vq.num_tokens)
    codes = vocab.image_ids(vq.encode(images))
    # every caption a picture can have: its attributes in each of the templates
    by_attrs = {}
    for a in set(attrs):
        seen = {toy.caption(a, np.random.default_rng(k)) for k in range(40)}
        by_attrs[a] = [np.asarray(text.encode(c, add_special_tokens=False), np.int64) for c in sorted(seen)]
    templates = [by_attrs[a] for a in attrs]
    per_doc = 4 + codes.shape[1] + 12
    n_docs = max(1, int(n_tokens // per_doc))
    pick = rng.integers(len(attrs), size=n_docs)
    which = rng.integers(1 << 30, size=n_docs)
    image_first = rng.random(n_docs) < 0.35
    bos, eos, boi, eoi = vocab.bos_id, vocab.eos_id, vocab.boi_id, vocab.eoi_id
    docs = []
    for k, w, first in zip(pick.tolist(), which.tolist(), image_first.tolist()):
        img = vocab.image_ids(rng.integers(vocab.image_codes, size=codes.shape[1])) if natural else codes[k]
        cap = templates[k][w % len(templates[k])]
        img = np.concatenate([[boi], img, [eoi]])
        body = (img, cap) if first else (cap, img)
        docs.append(np.concatenate([[bos], *body, [eos]]).astype(np.uint16))
    return vocab, docs


def write_both(docs, vocab: Vocab, work: Path) -> tuple[Path, Path, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    ours = work / "ours"
    t = time.perf_counter()
    with ShardWriter(ours, vocab) as w:
        for d in docs:
            w.add(d)
    t_ours = time.perf_counter() - t
    prefix = work / "megatron"
    t = time.perf_counter()
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for d in docs:
        b.add_document(torch.from_numpy(d.astype(np.int64)), [len(d)])
    b.finalize(str(prefix) + ".idx")
    t_meg = time.perf_counter() - t
    return ours, prefix, {"write_s_ours": t_ours, "write_s_megatron": t_meg}


def bytes_of(ours: Path, prefix: Path) -> tuple[int, int]:
    b_ours = sum(p.stat().st_size for p in ours.iterdir())
    b_meg = sum(Path(str(prefix) + ext).stat().st_size for ext in (".bin", ".idx"))
    return b_ours, b_meg


def read_pass(get, order: list[int]) -> tuple[float, int]:
    """Seconds to read ``order`` and make each document an int64 tensor; tokens read."""
    n = 0
    t = time.perf_counter()
    for i in order:
        x = torch.from_numpy(get(i).astype(np.int64))
        n += x.shape[0]
    return time.perf_counter() - t, n


def measure(ours: Path, prefix: Path, vocab: Vocab, docs, passes: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    probe = ShardDataset(ours, vocab)
    for i in (0, len(docs) // 2, len(docs) - 1):  # both sides hold the same documents
        assert np.array_equal(probe.get(i)[0], docs[i])
    loader_order = packing.frame_local_order(probe.doc_frames, probe.num_frames, packing.rng_for(1234, 0, 0, 0),
                                             WINDOW).tolist()
    orders = {"loader order": loader_order, "stored order": list(range(len(docs)))}
    # The adversarial case, for honesty: uniformly random documents over far more frames than the reader keeps
    # (here 4): nearly every read decompresses a whole frame. The loader never reads like this (frame-local
    # shuffle); a sample of 2,000 documents, one pass.
    worst = np.random.default_rng(0).permutation(len(docs))[:2000].tolist()
    out = {}
    ds = ShardDataset(ours, vocab, cache_frames=4)
    t, n_worst = read_pass(lambda i: ds.get(i)[0], worst)
    md = IndexedDataset(str(prefix))
    t_meg, _ = read_pass(md.__getitem__, worst)
    out["random, 4-frame cache"] = {"tokens": n_worst, "ours_tok_s": n_worst / t, "megatron_tok_s": n_worst / t_meg}
    for name, order in orders.items():
        best = {"ours": float("inf"), "megatron": float("inf")}
        for _ in range(passes):
            ds = ShardDataset(ours, vocab, cache_frames=2 * WINDOW + 2)  # fresh: cold frame cache every pass
            t, n_ours = read_pass(lambda i: ds.get(i)[0], order)
            best["ours"] = min(best["ours"], t)
            md = IndexedDataset(str(prefix))
            t, n_meg = read_pass(md.__getitem__, order)
            best["megatron"] = min(best["megatron"], t)
            assert n_ours == n_meg
        out[name] = {"tokens": n_ours, "ours_tok_s": n_ours / best["ours"], "megatron_tok_s": n_meg / best["megatron"]}
    return out


def loader_speed(ours: Path, vocab: Vocab, seconds: float = 2.0) -> float:
    """Tokens/s of whole packed training micro-batches (blend, plan, read, collate) from build_train_iterator."""
    from megannm.data.loader import build_train_iterator
    it = build_train_iterator([(ours, 1.0)], vocab, seq_len=1024, micro_batch_size=8, global_batch_size=64,
                              dp_rank=0, dp_size=1, seed=1234)
    next(it)  # epoch plan built outside the timed part
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        n += next(it)["input_ids"].numel()
    return n / (time.perf_counter() - t)


def run(n_tokens: int, seed: int, natural: bool, passes: int, loader: bool) -> dict:
    work = Path(tempfile.mkdtemp(prefix="megannm-bench-data-"))
    try:
        t = time.perf_counter()
        vocab, docs = toy_documents(n_tokens, seed, natural, work)
        gen_s = time.perf_counter() - t
        ours, prefix, writes = write_both(docs, vocab, work)
        b_ours, b_meg = bytes_of(ours, prefix)
        speeds = measure(ours, prefix, vocab, docs, passes)
        res = {"docs": len(docs), "tokens": int(sum(len(d) for d in docs)), "bytes_ours": b_ours,
               "bytes_megatron": b_meg, "gen_s": gen_s, **writes, "speeds": speeds}
        if loader:
            res["loader_tok_s"] = loader_speed(ours, vocab)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=16e6, help="tokens of the toy-world data set")
    p.add_argument("--natural-tokens", type=float, default=4e6, help="tokens of the random-code data set (0: skip)")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    toy_res = run(int(a.tokens), a.seed, natural=False, passes=a.passes, loader=True)
    nat = run(int(a.natural_tokens), a.seed, natural=True, passes=a.passes, loader=False) if a.natural_tokens else None

    def row(label, r):
        lines = []
        for order, s in r["speeds"].items():
            lines.append(f"{label:<19} {order:<22} {r['tokens'] / 1e6:>7.1f}M {s['ours_tok_s'] / 1e6:>10.1f} "
                         f"{s['megatron_tok_s'] / 1e6:>10.1f} {s['ours_tok_s'] / s['megatron_tok_s']:>6.2f}x "
                         f"{r['bytes_ours'] / 1e6:>9.2f} {r['bytes_megatron'] / 1e6:>9.2f} "
                         f"{r['bytes_ours'] / r['bytes_megatron']:>6.3f}")
        return lines

    print(f"{'data':<19} {'read order':<22} {'tokens':>8} {'ours Mt/s':>10} {'mcore Mt/s':>10} {'speed':>7} "
          f"{'ours MB':>9} {'mcore MB':>9} {'bytes':>6}")
    for line in row("toy world", toy_res) + (row("random image codes", nat) if nat else []):
        print(line)
    print(f"(per document: read + int64 torch tensor, best of {a.passes} passes with a fresh reader; mcore = "
          f"megatron-core IndexedDataset, mmap; ours reads zstd frames with crc32 checks, cache {2 * WINDOW + 2} "
          f"frames)")
    print(f"megannm loader, whole packed micro-batches (8 x 1024): {toy_res['loader_tok_s'] / 1e6:.1f} M tokens/s; "
          f"writing: ours {toy_res['write_s_ours']:.1f} s, mcore {toy_res['write_s_megatron']:.1f} s; "
          f"total {time.perf_counter() - t0:.0f} s")
    head = toy_res["speeds"]["loader order"]
    result = {
        "bench": "data", "baseline": "megatron-core IndexedDataset (mmap)",
        "read_speed_ratio": round(head["ours_tok_s"] / head["megatron_tok_s"], 3),
        "bytes_ratio": round(toy_res["bytes_ours"] / toy_res["bytes_megatron"], 4),
        "read_speed_ratio_stored_order": round(toy_res["speeds"]["stored order"]["ours_tok_s"] /
                                               toy_res["speeds"]["stored order"]["megatron_tok_s"], 3),
        "ours_tokens_per_s": round(head["ours_tok_s"]), "megatron_tokens_per_s": round(head["megatron_tok_s"]),
        "bytes_ours": toy_res["bytes_ours"], "bytes_megatron": toy_res["bytes_megatron"],
        "tokens": toy_res["tokens"], "docs": toy_res["docs"], "loader_tokens_per_s": round(toy_res["loader_tok_s"]),
        "data": "toy world (real BPE captions + real PatchVQ codes), uint16",
    }
    if nat:
        n = nat["speeds"]["loader order"]
        result["random_codes_read_speed_ratio"] = round(n["ours_tok_s"] / n["megatron_tok_s"], 3)
        result["random_codes_bytes_ratio"] = round(nat["bytes_ours"] / nat["bytes_megatron"], 4)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
