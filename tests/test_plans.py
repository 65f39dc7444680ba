"""Sample plans built once and memory-mapped: the same order as the loader before plans existed, exact resume from
the cache, keys that change with what determines them, damaged caches rebuilt or refused, lazy shard indexes;
tensor-parallel groups that read once (TP=2 x DP=2 on gloo); modality-balanced global batches."""
import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from megannm.data import packing
from megannm.data.loader import build_eval_batches, build_order, build_train_iterator, step_micro_batches
from megannm.data.epochs import EpochError, EpochSpec
from megannm.data.shards import ShardDataset, write_dataset
from megannm.vocab import Vocab
from tests import dist

V = Vocab(text_size=100, image_codes=50)


def docs(n, seed, long_every=0, seq=32):
    """``<bos> [caption] <boi> codes <eoi> [text] <eos>`` documents, some longer than a sample."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = rng.integers(0, V.text_size, size=int(rng.integers(1, 8)))
        codes = V.image_ids(rng.integers(0, V.image_codes, size=int(rng.integers(1, 60))))
        image = np.concatenate([[V.boi_id], codes, [V.eoi_id]])
        body = [text, image] if i % 2 == 0 else [image, text]
        if long_every and i % long_every == 0:
            body.append(rng.integers(0, V.text_size, size=3 * seq))
        out.append(np.concatenate([[V.bos_id], *body, [V.eos_id]]).astype(np.int64))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("plans")
    write_dataset(root / "a", docs(2000, 1, long_every=25), V, frame_bytes=512)  # 100+ frames: windowed shuffle
    write_dataset(root / "b", docs(150, 2), V)
    write_dataset(root / "c", docs(60, 3, long_every=7), V, frame_bytes=256)
    return root


def digest_samples(order, start, count):
    h = hashlib.sha256()
    for s, pieces in order.samples(start, count):
        h.update(np.array([s.stream_id, len(pieces)], np.int64).tobytes())
        h.update(np.array(pieces, np.int64).tobytes())
    return h.hexdigest()[:16]


def digest_batches(batches):
    h = hashlib.sha256()
    for b in batches:
        for k in sorted(b):
            h.update(k.encode())
            h.update(b[k].numpy().tobytes())
    return h.hexdigest()[:16]


# Captured from the loader as it was before sample plans (in-memory epoch plans, commit 5b21d44), on this data.
BEFORE = {
    "blend3_pack_drop": ({"ds": [("a", .5), ("b", .3), ("c", .2)], "seq": 32, "seed": 7, "pack": True, "cd": 0.2},
                         "f198af7ad4334a2d", "3c048b27698a80f4", "9abb6c6b69b67d01",
                         [(0, [(649, False, 0, 33)]), (1, [(112, True, 0, 33)]), (2, [(16, False, 0, 33)])]),
    "blend2_pack": ({"ds": [("a", .7), ("c", .3)], "seq": 32, "seed": 11, "pack": True, "cd": 0.0},
                    "63c8cdfdbf12f6b0", "ab86da16cfd71f99", "996e8a6e51f96832",
                    [(0, [(1282, False, 0, 33)]), (1, [(9, False, 0, 22)]), (0, [(1282, False, 32, 17)])]),
    "blend2_nopack": ({"ds": [("b", .6), ("c", .4)], "seq": 48, "seed": 3, "pack": False, "cd": 0.3},
                      "e8b41d9b513dfcc0", "a31360c338043ec9", "0b52178d3a7f04e5",
                      [(0, [(139, False, 0, 35)]), (1, [(36, False, 0, 36)]), (0, [(32, False, 0, 49)])]),
    "single_seq64": ({"ds": [("a", 1.0)], "seq": 64, "seed": 0, "pack": True, "cd": 0.1},
                     "f3cc17eadc18a164", "1a5c755c15fb1ce4", "bd4305b70da2d4c2",
                     [(0, [(926, False, 0, 62)]), (0, [(1517, False, 0, 14)]), (0, [(1085, False, 0, 62)])]),
}


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "memory"])
def test_order_equals_the_loader_before_plans(data, tmp_path, cache):
    warnings.simplefilter("ignore")  # pack=False truncates some long documents (warned, tested in test_loader)
    for name, (c, first5000, tail, batches, first) in BEFORE.items():
        ds = [(data / p, w) for p, w in c["ds"]]
        args = (ds, V, c["seq"], c["seed"], c["pack"], c["cd"])
        for _ in range(2 if cache else 1):  # built, then read back from the cache by a fresh order
            order = build_order(*args, plan_dir=tmp_path / "plans", cache=cache)
            assert [(s.stream_id, p) for s, p in order.samples(0, 3)] == first, name
            assert digest_samples(order, 0, 5000) == first5000, name
            assert digest_samples(build_order(*args, plan_dir=tmp_path / "plans", cache=cache), 4000, 500) == tail
        it = build_train_iterator(ds, V, c["seq"], 4, 16, 1, 2, c["seed"], consumed_samples=160, pack=c["pack"],
                                  caption_dropout=c["cd"], plan_dir=tmp_path / "plans")
        assert digest_batches([next(it) for _ in range(6)]) == batches, name
    ev = build_eval_batches([data / "a", data / "c"], V, 32, 4, dp_rank=1, dp_size=2, num_batches=3)
    assert digest_batches(ev) == "f05ec3423f554a45"


def test_resume_from_the_cache_at_several_consumed_counts(data, tmp_path):
    ds = [(data / "b", 0.6), (data / "c", 0.4)]
    args = (ds, V, 32, 2, 8, 1, 2)
    full = [next(it) for it in [build_train_iterator(*args, seed=5, caption_dropout=0.2, plan_dir=tmp_path)]
            for _ in range(2 * 60)]  # 60 steps: many epochs of c
    for steps in (0, 1, 23, 59):
        for prefetch in (0, 3):
            it = build_train_iterator(*args, seed=5, caption_dropout=0.2, consumed_samples=steps * 8,
                                      plan_dir=tmp_path, prefetch=prefetch)
            got = [next(it) for _ in range(2)]
            assert all(torch.equal(g[k], f[k]) for g, f in zip(got, full[2 * steps:]) for k in g), (steps, prefetch)
            it.close()


def test_plans_are_built_once_and_keyed_by_what_determines_them(data, tmp_path):
    base = dict(seq_len=32, seed=7, pack=True, caption_dropout=0.1)
    order = build_order([(data / "a", 0.5), (data / "b", 0.5)], V, plan_dir=tmp_path, **base)
    order.ensure(3000)
    built = [s.store.built for s in order.streams]
    assert all(built) and len(built[1]) > 1  # b (150 documents) needs several epochs for 1500 samples
    again = build_order([(data / "a", 0.5), (data / "b", 0.5)], V, plan_dir=tmp_path, **base)
    again.ensure(3000)
    assert [s.store.built for s in again.streams] == [[], []]  # found, not rebuilt
    assert again.key() == order.key() and (tmp_path / f"order-{order.key()}.json").exists()
    # a changed weight: a new order, over the very same per-data-set plans (weights do not enter them)
    reweighted = build_order([(data / "a", 0.3), (data / "b", 0.7)], V, plan_dir=tmp_path, **base)
    assert reweighted.key() != order.key()
    assert [s.store.dir for s in reweighted.streams] == [s.store.dir for s in order.streams]
    # seed, seq_len, packing, dropout, position in the blend or the data itself: new plan keys
    spec = order.streams[0].spec
    for change in ({"seed": 8}, {"seq_len": 64}, {"pack": False}, {"caption_dropout": 0.2}, {"stream": 1},
                   {"data": "0" * 24}, {"window_frames": 8}):
        assert EpochSpec(**{**spec.__dict__, **change}).key() != spec.key(), change
    assert build_order([(data / "a", 1)], V, plan_dir=tmp_path, **{**base, "seed": 8}).key() != \
        build_order([(data / "a", 1)], V, plan_dir=tmp_path, **base).key()
    # the plans are .npy files read with mmap; the reader holds no whole-data-set index
    stream = again.streams[0]
    plan = stream.epoch_index(0)
    assert isinstance(plan.bounds.base, np.memmap) and isinstance(plan.pieces.base, np.memmap)  # views of maps
    stream.pieces(5)
    assert stream.ds.lazy and len(stream.ds._indexes) <= stream.ds.index_cache


def test_damaged_plans_are_rebuilt_or_refused(data, tmp_path):
    args = ([(data / "a", 1.0)], V, 32, 3)
    reference = [p for _, p in build_order(*args, cache=False).samples(0, 200)]
    order = build_order(*args, plan_dir=tmp_path)
    order.ensure(200)
    folder = order.streams[0].store.dir / "epoch-00000"
    # truncated: found unreadable when opened, rebuilt, same order
    data_file = folder / "pieces.npy"
    data_file.write_bytes(data_file.read_bytes()[:1000])
    with pytest.warns(UserWarning, match=r"epoch-00000: damaged sample plan .*rebuilding it"):
        again = build_order(*args, plan_dir=tmp_path)
        assert [p for _, p in again.samples(0, 200)] == reference
    assert again.streams[0].store.built == [0]
    # one flipped byte inside the data: caught by its block's crc32 when read, and refused with the file named
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data_file.write_bytes(bytes(raw))
    with pytest.raises(EpochError, match=r"pieces\.npy: corrupt sample plan \(crc32 mismatch in MiB 0\); delete"):
        build_order(*args, plan_dir=tmp_path).samples(0, 200)
    # a plan folder whose description is not its key's: refused
    marker = order.streams[0].store.dir / "plan.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "seed": 99}))
    with pytest.raises(EpochError, match=r"plan\.json: describes another plan than its key"):
        build_order(*args, plan_dir=tmp_path).samples(0, 1)


def test_lazy_shard_index_reads_a_shard_when_needed_and_names_damage(data, tmp_path):
    d = docs(300, 5)
    write_dataset(tmp_path / "ds", d, V, docs_per_shard=50, frame_bytes=512)
    lazy = ShardDataset(tmp_path / "ds", lazy=True, index_cache=2)
    assert len(lazy) == 300 and lazy.num_frames == ShardDataset(tmp_path / "ds").num_frames
    assert lazy.index_bytes() == 0  # nothing but the manifest read at open
    for i in (0, 299, 120, 121, 51):
        assert np.array_equal(lazy.get(i)[0], d[i])
    assert len(lazy._indexes) == 2 and sorted(lazy._indexes) == [1, 2]  # shards of the two latest reads
    assert lazy.doc_lengths.tolist() == [len(x) for x in d]
    assert [lazy.caption_of(i) for i in range(4)] == ShardDataset(tmp_path / "ds").caption_lengths[:4].tolist()
    counts = lazy.image_token_counts()
    assert counts.tolist() == [int(V.is_image(x).sum()) for x in d]
    idx = tmp_path / "ds" / "shard-00004.idx"
    idx.write_bytes(idx.read_bytes()[:-3])
    reopened = ShardDataset(tmp_path / "ds", lazy=True)  # opens: its index is only read when needed ...
    assert np.array_equal(reopened.get(0)[0], d[0])
    with pytest.raises(Exception, match=r"shard-00004\.idx: index checksum mismatch"):
        reopened.get(210)  # ... and refused then, named


# ---------------------------------------------------------------------------------------------------------------------
# modality balancing


@pytest.fixture(scope="module")
def modal(tmp_path_factory):
    """A blend where 30% of the documents are image-heavy (most of a 64-token sample is image codes), mixed with
    text documents inside one data set (a blend of separate sets is already spread evenly by the stride blend)."""
    root = tmp_path_factory.mktemp("modal")
    rng = np.random.default_rng(0)
    mixed = []
    for heavy in rng.random(300) < 0.3:
        if heavy:
            body = [5, V.boi_id, *V.image_ids(rng.integers(0, 50, 56)).tolist(), V.eoi_id]
        else:
            body = rng.integers(0, V.text_size, int(rng.integers(20, 60))).tolist()
        mixed.append(np.array([V.bos_id, *body, V.eos_id]))
    write_dataset(root / "mixed", mixed, V)
    write_dataset(root / "text", docs(50, 9), V)
    return [(root / "mixed", 0.8), (root / "text", 0.2)]


def test_balance_deals_equal_counts_and_evens_the_load():
    rng = np.random.default_rng(1)
    img = np.where(rng.random(64) < 0.3, rng.integers(400, 600, 64), rng.integers(0, 20, 64))
    tok = rng.integers(500, 513, 64)
    part = packing.balance(img, tok, 8)
    assert np.bincount(part, minlength=8).tolist() == [8] * 8
    assert np.array_equal(part, packing.balance(img, tok, 8))  # a pure function
    load = np.bincount(part, weights=img, minlength=8)
    before = np.bincount(np.repeat(np.arange(8), 8), weights=img, minlength=8)
    # 19 heavy samples over 8 ranks: some rank holds 3, the best any deal can do is near 1.2
    assert load.max() / load.mean() < 1.25 < before.max() / before.mean()
    with pytest.raises(ValueError, match="do not divide"):
        packing.balance(img[:63], tok[:63], 8)


def test_balanced_ranks_are_deterministic_resumable_and_less_uneven(modal, tmp_path):
    gbs, mbs, dp = 16, 2, 4
    order = build_order(modal, V, 64, seed=3, plan_dir=tmp_path)

    ratios = {False: [], True: []}
    for step in range(12):
        consumed = step * gbs
        per_rank = {}
        for balance in (False, True):
            micro = [step_micro_batches(order, consumed, gbs, mbs, r, dp, balance) for r in range(dp)]
            ids = sorted(d for rank in micro for mb in rank for s, p in mb for d, *_ in p)
            per_rank[balance] = ids
            assert all(len(rank) == gbs // dp // mbs and all(len(mb) == mbs for mb in rank) for rank in micro)
            loads = np.array([sum(order.costs(mb)[0].sum() for mb in rank) for rank in micro], float)
            ratios[balance].append(loads.max() / loads.mean())
        assert per_rank[True] == per_rank[False]  # the same samples in the global batch, only dealt differently
    assert np.mean(ratios[True]) < 1.3 < 1.5 < np.mean(ratios[False])  # measured 1.19 vs 1.64
    # each rank's slice: a pure function of (seed, consumed); resume exact
    args = (modal, V, 64, mbs, gbs, 1, dp)
    full = [next(it) for it in [build_train_iterator(*args, seed=3, plan_dir=tmp_path, balance=True)]
            for _ in range(8 * gbs // dp // mbs)]
    for steps in (3, 5):
        it = build_train_iterator(*args, seed=3, plan_dir=tmp_path, balance=True, consumed_samples=steps * gbs,
                                  prefetch=2)
        got = [next(it) for _ in range(2)]
        k = steps * gbs // dp // mbs
        assert all(torch.equal(g[x], f[x]) for g, f in zip(got, full[k:k + 2]) for x in g)
        it.close()
    # and a sample's counted image tokens are its real ones (exact for whole documents)
    samples = step_micro_batches(order, 0, gbs, mbs, 1, dp, True)[0]
    batch = full[0]
    tokens = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1)
    for b, (stream, pieces) in enumerate(samples):
        if all(start == 0 and n == stream.ds.length_of(d) for d, _, start, n in pieces):
            assert order.costs([(stream, pieces)])[0][0] == int(V.is_image(tokens[b]).sum())


# ---------------------------------------------------------------------------------------------------------------------
# tensor parallel: one reader per group


WORKER = r'''
import hashlib, json, os, sys
import torch
from megannm import parallel
from megannm.data.loader import build_train_iterator
layout = parallel.init_parallel(tp=2, pp=1)
data, out = sys.argv[1], sys.argv[2]
it = build_train_iterator([(data + "/a", 0.6), (data + "/b", 0.4)], None, 32, 2, 8, layout.dp_rank, layout.dp,
                          seed=4, consumed_samples=16, plan_dir=data + "/tp_plans", prefetch=2,
                          tp_group=layout.tp_group)
batches = [next(it) for _ in range(5)]
h = hashlib.sha256()
for b in batches:
    for k in sorted(b):
        h.update(b[k].numpy().tobytes())
json.dump({"rank": layout.rank, "tp_rank": layout.tp_rank, "dp_rank": layout.dp_rank, "digest": h.hexdigest(),
           "reads": it.order is not None}, open(os.path.join(out, f"rank{layout.rank}.json"), "w"))
it.close()
parallel.shutdown()
'''


@pytest.mark.distributed
def test_tp2_dp2_tensor_ranks_see_identical_batches_read_once(data, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    dist.run([str(script), str(data), str(out)], nproc=4, timeout=240)
    ranks = {r["rank"]: r for r in (json.loads(p.read_text()) for p in out.iterdir())}
    assert sorted(ranks) == [0, 1, 2, 3]
    for dp_rank in (0, 1):
        group = [r for r in ranks.values() if r["dp_rank"] == dp_rank]
        assert len(group) == 2 and group[0]["digest"] == group[1]["digest"]  # identical batches in a TP group
        assert sorted(r["reads"] for r in group) == [False, True]  # read once: by its first rank only
        assert [r["tp_rank"] for r in group if r["reads"]] == [0]
        # ... and equal to what a single process reads for that data-parallel rank
        it = build_train_iterator([(data / "a", 0.6), (data / "b", 0.4)], None, 32, 2, 8, dp_rank, 2, seed=4,
                                  consumed_samples=16, plan_dir=data / "tp_plans")
        h = hashlib.sha256()
        for b in [next(it) for _ in range(5)]:
            for k in sorted(b):
                h.update(b[k].numpy().tobytes())
        assert group[0]["digest"] == h.hexdigest()
    assert ranks[0]["digest"] != ranks[2]["digest"]


def test_offline_command_builds_a_recipes_plans(data, tmp_path, capsys):
    from megannm.cli import main
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: offline\ndata:\n  train: [{{path: {data / 'b'}}}, {{path: {data / 'c'}, weight: 0.5}}]\n"
                      f"  seq_len: 32\n  micro_batch_size: 2\n  global_batch_size: 8\nschedule: {{train_steps: 100}}\n")
    assert main(["sample-order", str(recipe), f"data.plan_dir={tmp_path / 'plans'}"]) == 0
    assert "800 training samples ready" in capsys.readouterr().out
    it = build_train_iterator([(data / "b", 1.0), (data / "c", 0.5)], None, 32, 2, 8, 0, 1, seed=1234,
                              plan_dir=tmp_path / "plans", plan_samples=800)
    assert [s.store.built for s in it.order.streams] == [[], []]  # the run finds every epoch it needs built
    assert main(["sample-order", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
