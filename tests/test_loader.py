"""The loader: a global order that is a pure function of (seed, epoch, consumed samples); packing; blending;
data-parallel slices; caption dropout; and records -> shards -> batches with the same tokens."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from megannm.data import packing
from megannm.toy import world as toy
from megannm.data.image_tokenizer import PatchVQ
from megannm.data.loader import (build_eval_batches, build_order, build_train_iterator, collate,
                                 rank_micro_batches)
from megannm.data.preprocess import preprocess
from megannm.data.shards import ShardDataset, write_dataset
from megannm.data.text_tokenizer import train_text_tokenizer
from megannm.data.tokenize import Tokenizers, encode_record
from megannm.vocab import Vocab, VocabMismatchError

V = Vocab(text_size=100, image_codes=50)
SEQ = 32


def make_docs(n, seed=0, max_len=60, caption_every=2, long_every=0):
    """Documents ``<bos> [caption] <boi> codes <eoi> <eos>`` (a caption on every ``caption_every``-th), some long."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        text = rng.integers(0, V.text_size, size=int(rng.integers(1, 8)))
        codes = V.image_ids(rng.integers(0, V.image_codes, size=int(rng.integers(1, max_len))))
        image = np.concatenate([[V.boi_id], codes, [V.eoi_id]])
        body = [text, image] if i % caption_every == 0 else [image, text]
        if long_every and i % long_every == 0:
            body.append(rng.integers(0, V.text_size, size=3 * SEQ))
        docs.append(np.concatenate([[V.bos_id], *body, [V.eos_id]]).astype(np.int64))
    return docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    a = make_docs(300, seed=1, long_every=25)
    b = make_docs(40, seed=2)
    write_dataset(root / "a", a, V, frame_bytes=1024)
    write_dataset(root / "b", b, V)
    return {"a": root / "a", "b": root / "b", "docs_a": a, "docs_b": b, "root": root}


def take(it, n):
    return [next(it) for _ in range(n)]


def same_batches(x, y):
    return len(x) == len(y) and all(all(torch.equal(p[k], q[k]) for k in p) for p, q in zip(x, y))


def segments(batch, b):
    """The token runs of sample b, one per document id (inputs plus the last label, i.e. the whole sample)."""
    ids = torch.cat([batch["input_ids"][b], batch["labels"][b, -1:]]).numpy()
    doc = torch.cat([batch["document_ids"][b], batch["document_ids"][b, -1:]]).numpy()
    return [ids[doc == d] for d in np.unique(doc)]


# ---------------------------------------------------------------------------------------------------------------------
# pure functions


def test_pack_next_fit_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    for _ in range(20):
        cap = int(rng.integers(4, 40))
        lengths = rng.integers(1, cap + 1, size=int(rng.integers(0, 200)))
        bounds, fill = [0], 0
        for i, n in enumerate(lengths):  # the definition, one piece at a time
            if fill + n > cap:
                bounds.append(i)
                fill = 0
            fill += n
        if len(lengths):
            bounds.append(len(lengths))
        assert packing.pack_next_fit(lengths, cap).tolist() == bounds


def test_pack_next_fit_in_blocks_and_frame_local_order_are_their_definitions():
    rng = np.random.default_rng(3)
    for t in range(30):
        n = int(rng.integers(0, 2000))
        lengths = rng.integers(1, 30, size=n)
        whole = packing.pack_next_fit(lengths, 40)  # one block: the walk as it always was
        assert np.array_equal(packing.pack_next_fit(lengths, 40, block=int(rng.integers(30, 300))), whole)
        # frame-local order: lexsort((uniform key, window of the document's frame)), sorted per window here
        frames = np.sort(rng.integers(0, 60, size=n))
        num_frames, window = 60 + int(rng.integers(0, 3)), int(rng.integers(1, 20))
        rng_a, rng_b = packing.rng_for(t, 0, 1, 0), packing.rng_for(t, 0, 1, 0)
        if num_frames <= window:
            continue
        rank = np.empty(num_frames, np.int64)
        rank[rng_a.permutation(num_frames)] = np.arange(num_frames)
        reference = np.lexsort((rng_a.random(n), rank[frames] // window))
        assert np.array_equal(packing.frame_local_order(frames, num_frames, rng_b, window), reference)


def test_long_documents_split_with_one_token_overlap():
    doc, start, length = packing.split_pieces(np.array([3, 33, 34, 100]), seq_len=32)
    assert doc.tolist() == [0, 1, 2, 2, 3, 3, 3, 3]
    assert start.tolist() == [0, 0, 0, 32, 0, 32, 64, 96]
    assert length.tolist() == [3, 33, 33, 2, 33, 33, 33, 4]


def test_blend_tracks_weights_and_is_resumable():
    for weights in ([0.25, 0.75], [1, 1, 1], [5, 1, 1, 3], [0.99, 0.01]):
        d, k = packing.blend(weights, 0, 5000)
        w = np.asarray(weights, float) / sum(weights)
        for n in (1, 10, 333, 5000):
            assert np.abs(np.bincount(d[:n], minlength=len(w)) - w * n).max() <= 1.0
        for i in range(len(w)):  # each data set's samples are consumed in order, none skipped or repeated
            assert k[d == i].tolist() == list(range(int((d == i).sum())))
        d2, k2 = packing.blend(weights, 1234, 777)
        assert np.array_equal(d2, d[1234:2011]) and np.array_equal(k2, k[1234:2011])
    far_d, far_k = packing.blend([0.25, 0.75], 10 ** 12, 8)  # resuming far away costs nothing
    assert abs(int(far_k[far_d == 0][0]) - 0.25 * 10 ** 12) <= 2


# ---------------------------------------------------------------------------------------------------------------------
# packing, positions, masks


def test_packed_batch_positions_documents_and_loss_mask(data):
    order = build_order([(data["a"], 1.0)], V, SEQ, seed=3)
    stream = order.streams[0]
    ds = stream.ds
    batch = order.batch(0, 16)
    samples = order.samples(0, 16)
    assert batch["input_ids"].shape == (16, SEQ) and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    multi = 0
    for b, (_, pieces) in enumerate(samples):
        segs = segments(batch, b)
        used = sum(n for *_, n in pieces)
        multi += len(pieces) > 1
        for s, (doc, drop, start, n) in enumerate(pieces):  # each segment is exactly its piece of the document
            assert not drop and np.array_equal(segs[s], ds.get(doc)[0][start:start + n])
        if used < SEQ + 1:
            assert (segs[-1] == V.pad_id).all() and len(segs) == len(pieces) + 1  # padding: a segment of its own
        docs_ids, pos, lm = batch["document_ids"][b], batch["position_ids"][b], batch["loss_mask"][b]
        starts = torch.cat([torch.tensor([True]), docs_ids[1:] != docs_ids[:-1]])
        assert (pos[starts] == 0).all() and (pos[~starts] == pos.roll(1)[~starts] + 1).all()
        # the segment of every token of the sample (inputs and the final label), from the plan
        full = torch.tensor([s for s, (*_, n) in enumerate(pieces) for _ in range(n)] + [-1] * (SEQ + 1 - used))
        assert torch.equal(docs_ids[:used], full[:SEQ][:used])
        # a target is real iff it is a token of the same document: not the next document's first, not padding
        assert torch.equal(lm.bool(), (full[1:] == full[:-1]) & (full[1:] >= 0))
    assert multi > 0  # the data does pack several documents per sample


def test_one_epoch_covers_every_document_once_and_every_transition_once(data):
    order = build_order([(data["a"], 1.0)], V, SEQ, seed=5)
    stream = order.streams[0]
    n = stream.epoch_index(0).num_samples
    batch = order.batch(0, n)
    seen = Counter()
    for b in range(n):
        x, y, m = batch["input_ids"][b], batch["labels"][b], batch["loss_mask"][b].bool()
        seen.update(zip(x[m].tolist(), y[m].tolist()))
    expected = Counter()
    for d in data["docs_a"]:
        expected.update(zip(d[:-1].tolist(), d[1:].tolist()))
    assert seen == expected  # long documents split with overlap lose no transition and repeat none
    docs = [p[0] for _, pieces in order.samples(0, n) for p in pieces if p[2] == 0]
    assert sorted(docs) == list(range(len(data["docs_a"])))
    assert order.samples(n, 1)[0][1] == stream.pieces(n)  # then epoch 1, a different permutation
    assert stream.locate(n) == (1, 0) and stream.epoch_index(1).doc.tolist() != stream.epoch_index(0).doc.tolist()


def test_document_loss_masks_reach_the_batch(tmp_path):
    docs = [np.array([V.bos_id, 5, 6, 7, 8, V.eos_id]), np.array([V.bos_id, 9, 10, V.eos_id])]
    masks = [np.array([0, 0, 1, 1, 0, 0], np.uint8), np.array([0, 1, 1, 0], np.uint8)]
    write_dataset(tmp_path / "sft", list(zip(docs, masks)), V)
    batch = build_eval_batches(tmp_path / "sft", V, seq_len=12, micro_batch_size=1)[0]
    # sample: bos 5 6 7 8 eos | bos 9 10 eos | pad...; target t+1 trained where its own mask says so
    assert batch["input_ids"][0, :10].tolist() == [*docs[0].tolist(), *docs[1].tolist()]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]


def test_no_packing_one_document_per_sample(data):
    it = build_train_iterator([(data["a"], 1.0)], V, SEQ, 4, 8, 0, 1, seed=0, pack=False)
    order = it.order
    with pytest.warns(UserWarning, match=r"documents are longer than seq_len \+ 1 = 33 tokens .* truncated"):
        batch = next(it)
    for b, (_, pieces) in enumerate(order.samples(0, 4)):
        assert len(pieces) == 1
        doc = data["docs_a"][pieces[0][0]]
        segs = segments(batch, b)
        n = min(len(doc), SEQ + 1)
        assert np.array_equal(segs[0], doc[:n])
        if n < SEQ + 1:
            assert (segs[1] == V.pad_id).all() and batch["loss_mask"][b, n - 1:].sum() == 0
        assert batch["loss_mask"][b].sum() == n - 1


# ---------------------------------------------------------------------------------------------------------------------
# determinism, resume, data parallel


def test_same_inputs_same_batches_and_seed_matters(data):
    args = ([(data["a"], 0.7), (data["b"], 0.3)], V, SEQ, 4, 8, 0, 1)
    x = take(build_train_iterator(*args, seed=11), 6)
    assert same_batches(x, take(build_train_iterator(*args, seed=11), 6))
    assert not same_batches(x, take(build_train_iterator(*args, seed=12), 6))


def test_resume_yields_exactly_the_tail(data):
    args = ([(data["a"], 0.6), (data["b"], 0.4)], V, SEQ, 2, 8, 0, 1)
    full = take(build_train_iterator(*args, seed=7, caption_dropout=0.3), 4 * 40)  # many epochs of b
    for steps in (1, 17, 39):
        it = build_train_iterator(*args, seed=7, caption_dropout=0.3, consumed_samples=steps * 8)
        assert same_batches(take(it, 4), full[4 * steps:4 * steps + 4])
        assert it.consumed_samples == (steps + 1) * 8


def test_data_parallel_slices_are_disjoint_covering_and_match_accumulation(data):
    gbs, mbs = 12, 2
    for consumed in (0, 36):
        ranges = [rank_micro_batches(consumed, gbs, mbs, r, 3) for r in range(3)]
        ids = [s + i for r in ranges for s, n in r for i in range(n)]
        assert sorted(ids) == list(range(consumed, consumed + gbs))  # disjoint and covering the global batch
        assert ranges[1][0][0] == consumed + 4  # contiguous slices: rank r starts at r * GB / dp
    ds = [(data["a"], 1.0)]
    dp1 = take(build_train_iterator(ds, V, SEQ, 4, 8, 0, 1, seed=2), 4)  # accumulation 2, two steps
    r0 = take(build_train_iterator(ds, V, SEQ, 4, 8, 0, 2, seed=2), 2)
    r1 = take(build_train_iterator(ds, V, SEQ, 4, 8, 1, 2, seed=2), 2)
    assert same_batches(dp1, [r0[0], r1[0], r0[1], r1[1]])
    with pytest.raises(ValueError, match="global_batch_size must divide by micro_batch_size x dp_size"):
        build_train_iterator(ds, V, SEQ, 4, 12, 0, 2, seed=2)


# ---------------------------------------------------------------------------------------------------------------------
# blending, caption dropout, eval, errors


def test_blending_fractions_and_independent_epochs(data):
    order = build_order([(data["a"], 0.25), (data["b"], 0.75)], V, SEQ, seed=1)
    a, b = order.streams
    n = 2000
    samples = order.samples(0, n)
    from_b = sum(s is b for s, _ in samples)
    assert abs(from_b - 0.75 * n) <= 1
    # b (40 documents) cycles through many epochs on its own count while a (300) is still in its first ones;
    # b's samples within each of its epochs hold each of its documents exactly once
    eb = [b.locate(k)[0] for k in range(from_b)]
    ea = [a.locate(k)[0] for k in range(n - from_b)]
    assert eb[-1] >= 10 and ea[-1] <= 2
    per_epoch = {}
    for k, (_, pieces) in enumerate(s for s in samples if s[0] is b):
        per_epoch.setdefault(eb[k], []).extend(doc for doc, _, start, _ in pieces if start == 0)
    for e in range(eb[-1]):  # complete epochs
        assert sorted(per_epoch[e]) == list(range(40))
    assert per_epoch[0] != per_epoch[1]


def test_caption_dropout_is_deterministic_and_at_the_rate(data):
    ds = ShardDataset(data["a"])
    eligible = ds.caption_lengths > 0
    assert eligible.sum() == 150  # every other document starts with a caption
    rates, plans = [], []
    for epoch in range(8):
        o = build_order([(data["a"], 1.0)], V, SEQ, seed=9, caption_dropout=0.3)
        p = o.streams[0].epoch_index(epoch)
        dropped = {d for d, x in zip(p.doc.tolist(), p.drop.tolist()) if x}
        assert all(eligible[d] for d in dropped)  # image-first documents are never touched
        rates.append(len(dropped) / eligible.sum())
        plans.append(dropped)
    again = build_order([(data["a"], 1.0)], V, SEQ, seed=9, caption_dropout=0.3).streams[0].epoch_index(3)
    assert {d for d, x in zip(again.doc.tolist(), again.drop.tolist()) if x} == plans[3]
    assert abs(np.mean(rates) - 0.3) < 0.04 and len({frozenset(p) for p in plans}) == 8  # new draws each epoch
    # a dropped document reaches the batch as <bos> <boi> ... : its caption removed, the rest intact
    o = build_order([(data["a"], 1.0)], V, SEQ, seed=9, caption_dropout=0.3)
    p = o.streams[0].epoch_index(0)
    j = int(np.flatnonzero(p.drop & (p.start == 0))[0])
    k = int(np.searchsorted(p.bounds, j, side="right")) - 1
    s = j - int(p.bounds[k])
    seg = segments(o.batch(k, 1), 0)[s]
    doc = data["docs_a"][int(p.doc[j])]
    cap = int(ds.caption_lengths[int(p.doc[j])])
    assert seg[0] == V.bos_id and seg[1] == V.boi_id
    assert np.array_equal(seg, np.concatenate([doc[:1], doc[1 + cap:]])[:len(seg)])


def test_eval_batches_are_deterministic_and_rank_balanced(data):
    full = build_eval_batches([(data["b"], 1.0)], V, SEQ, micro_batch_size=4)
    assert same_batches(full, build_eval_batches([(data["b"], 1.0)], V, SEQ, micro_batch_size=4))
    r = [build_eval_batches(data["b"], V, SEQ, micro_batch_size=2, dp_rank=k, dp_size=3) for k in range(3)]
    assert len(r[0]) == len(r[1]) == len(r[2])
    n_real = sum(int((b["loss_mask"].sum(1) > 0).sum()) for rank in r for b in rank)
    assert n_real == sum(int((b["loss_mask"].sum(1) > 0).sum()) for b in full)  # padding samples train nothing
    assert len(build_eval_batches([data["a"], data["b"]], V, SEQ, 4, num_batches=2)) == 4  # 2 per data set


def test_vocabulary_mismatch_between_loader_and_data(data, tmp_path):
    other = Vocab(text_size=100, image_codes=51)
    other.save(tmp_path / "vocab.json")
    with pytest.raises(VocabMismatchError) as e:
        build_train_iterator([(data["a"], 1.0)], tmp_path / "vocab.json", SEQ, 4, 8, 0, 1, seed=0)
    assert str(tmp_path / "vocab.json") in str(e.value) and str(data["a"] / "manifest.json") in str(e.value)
    write_dataset(tmp_path / "c", make_docs(5), other)
    with pytest.raises(VocabMismatchError, match="vocabulary mismatch"):
        build_train_iterator([(data["a"], 1.0), (tmp_path / "c", 1.0)], None, SEQ, 4, 8, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------------------------------------
# end to end: records -> shards -> batches


def test_records_to_batches_round_trip(tmp_path):
    toy.write_toy_dataset(tmp_path / "raw", n_train=30, n_valid=2, seed=4)
    rng = np.random.default_rng(0)
    text_dir = train_text_tokenizer([toy.caption(a, rng) for a in toy.sample_attrs(300, rng, "all")],
                                    tmp_path / "text", vocab_size=300)
    PatchVQ.train(toy.every_image()[1], codebook_size=1024).save(tmp_path / "vq.npz")
    Tokenizers.build(text_dir, tmp_path / "vq.npz").save(tmp_path / "tok")
    tok = Tokenizers.load(tmp_path / "tok")
    preprocess([tmp_path / "raw" / "train.jsonl"], tmp_path / "shards", tmp_path / "tok", progress=False)
    records = [json.loads(line) for line in (tmp_path / "raw" / "train.jsonl").read_text().splitlines()]
    expected = [encode_record(r, tok, tmp_path / "raw", f"train.jsonl:{i + 1}")[0] for i, r in enumerate(records)]
    it = build_train_iterator([(tmp_path / "shards", 1.0)], tmp_path / "shards" / "vocab.json", seq_len=128,
                              micro_batch_size=5, global_batch_size=10, dp_rank=0, dp_size=1, seed=0, pack=False)
    got = []
    for batch in take(it, 6):  # 30 samples: one epoch, one document each
        for b in range(batch["input_ids"].shape[0]):
            got.append(segments(batch, b)[0])
    assert sorted(map(tuple, got)) == sorted(map(tuple, expected))
    assert collate([], 8, V.pad_id)["input_ids"].shape == (0, 8)
