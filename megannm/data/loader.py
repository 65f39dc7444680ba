"""Deterministic, resumable training batches from shard folders.

The global sample order is a pure function of (seed, data sets, weights, seq_len, pack, caption_dropout) and the
sample's global index:

1. blending (``packing.blend``) gives global index g to data set d as its k-th sample;
2. data set d's k-th sample is sample j of its epoch e (each data set counts its own epochs);
3. epoch e of data set d is its epoch index (``epochs.py``): a seeded frame-local permutation of its documents,
   caption dropout decided per document, documents longer than a sample cut into pieces, and pieces packed
   greedily into samples of ``seq_len + 1`` tokens (``pack=False``: one document per sample, truncated or padded).
   Plans are built once, kept as .npy files in a cache folder and memory-mapped, so a rank's memory does not grow
   with the number of documents, and the shard indexes are read lazily, a shard at a time.

Resuming at ``consumed_samples=k`` therefore yields exactly the tail of the full order. For optimizer step s the
global batch is samples ``[consumed, consumed + GB)``; data-parallel rank r takes the contiguous slice
``[r * GB / dp, (r + 1) * GB / dp)`` and splits it into micro-batches in order, so DP=2 x accum 1 and DP=1 x
accum 2 see the same micro-batches. With ``balance=True`` the same global batch is instead dealt to the ranks so
that each gets a similar number of image tokens (``packing.balance``): the same samples, so the same gradient,
without the rank holding the image-heavy samples becoming the step's straggler; still a pure function of (seed,
consumed), so resume stays exact.

A batch (``collate``) is a dict of tensors ``input_ids``, ``labels`` (next token), ``loss_mask`` (1 where the label
is a real target of the same document and the document's own mask trains it), ``position_ids`` (reset at each
document start) and ``document_ids`` (segment index within the sample; padding is a segment of its own), from
which the model builds its block-diagonal causal mask. With continuous images also ``latents`` (the clean latent
of every slot, [B, seq_len, C]), ``noise`` ([B, seq_len, C]), ``timesteps`` and ``flow_mask`` ([B, seq_len]): an
image the sample generates (its slots are trained and no trained text follows it in its document) gets a
logit-normal timestep, noise and the flow loss; an image it reads (a picture to caption) is clean (t = 0) and
carries no loss. Timesteps and noise are a pure function of (seed, data set, the sample's index in its data set),
so they are the same at every layout and on resume.

Within a tensor-parallel group only the group's first rank reads: it builds each micro-batch (on a background
thread with ``prefetch`` > 0) and broadcasts it over the group, so the other ranks open no data set and hold no plan.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import queue
import threading
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megannm.data import packing
from megannm.data.epochs import EpochSpec, EpochStore, data_fingerprint, image_token_counts
from megannm.data.shards import ShardDataset
from megannm.fileio import atomic_write_json
from megannm.vocab import Vocab

# what a micro-batch holds, for receivers that do not read: name -> dtype (every tensor is [B, seq_len])
BATCH_DTYPES = {"input_ids": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64, "document_ids": torch.int64}
# and with continuous images ([B, seq_len], or [B, seq_len, latent_channels] for the latents and noise)
FLOW_DTYPES = {"latents": torch.float32, "noise": torch.float32, "timesteps": torch.float32,
               "flow_mask": torch.float32}


class SampleStream:
    """One data set's infinite sequence of samples, epoch after epoch (its plans: ``store``, in memory if None)."""

    def __init__(self, ds: ShardDataset, stream_id: int, seq_len: int, seed: int, pack: bool = True,
                 caption_dropout: float = 0.0, shuffle: bool = True, window_frames: int = 16,
                 plan_dir: Optional[Path] = None):
        if len(ds) == 0:
            raise ValueError(f"{ds.folder}: data set has no documents")
        self.ds, self.stream_id, self.seq_len, self.seed = ds, stream_id, seq_len, seed
        self.pack, self.caption_dropout = pack, caption_dropout
        self.spec = EpochSpec(data_fingerprint(ds.manifest), stream_id, int(seed), int(seq_len), bool(pack),
                             float(caption_dropout), bool(shuffle), int(window_frames))
        self.plan_dir = plan_dir
        self.store = EpochStore(self.spec, ds, plan_dir)
        self._epoch_starts = [0]  # cumulative samples before epoch e (grown lazily)
        self._warned = False
        self._image_tokens = None

    def epoch_index(self, epoch: int):
        p = self.store.epoch(epoch)
        cut = p.info.get("truncated", 0)
        if cut and not self._warned:  # truncation silently drops document ends (an image's last codes, <eos>)
            self._warned = True
            warnings.warn(f"{self.ds.folder}: {cut} of {len(self.ds)} documents are longer than seq_len + 1 = "
                          f"{self.seq_len + 1} tokens (longest {p.info['longest']}) and are truncated (pack=False)",
                          stacklevel=2)
        return p

    def locate(self, k: int) -> tuple[int, int]:
        """Sample k of this stream -> (epoch, sample within the epoch)."""
        if not self.pack:  # one sample per document: every epoch has the same size
            return divmod(k, len(self.ds))
        starts = self._epoch_starts
        while starts[-1] <= k:  # epochs differ in sample count (packing), so they are counted, in order, once
            starts.append(starts[-1] + self.epoch_index(len(starts) - 1).num_samples)
        e = bisect.bisect_right(starts, k) - 1
        return e, k - starts[e]

    def ensure(self, num_samples: int) -> None:
        """Have the epochs holding this stream's first ``num_samples`` samples built (in the cache, if any)."""
        if num_samples <= 0:
            return
        if not self.pack:
            self.store.ensure(range(self.locate(num_samples - 1)[0] + 1))
            return
        e = 0
        while True:  # each epoch's size is known once it is built
            self.store.ensure([e])
            if self.locate(num_samples - 1)[0] <= e:
                return
            e += 1

    def pieces(self, k: int) -> "Pieces":
        e, j = self.locate(k)
        return Pieces(self.epoch_index(e).sample(j), k)

    def read(self, doc: int, drop: bool) -> tuple[np.ndarray, np.ndarray | None]:
        tokens, mask = self.ds.get(doc)
        if drop:  # remove the caption between <bos> and the first <boi>: the image becomes unconditional
            c = self.ds.caption_of(doc)
            tokens = np.concatenate([tokens[:1], tokens[1 + c:]])
            mask = None if mask is None else np.concatenate([mask[:1], mask[1 + c:]])
        return tokens, mask

    def image_counts(self):
        """Per document, its image tokens (counted once over the data set, then cached beside the plans)."""
        if self._image_tokens is None:
            self._image_tokens = image_token_counts(self.ds, self.plan_dir)
        return self._image_tokens

    def image_tokens(self, pieces: list[tuple[int, bool, int, int]]) -> int:
        """Image tokens of a sample (exact for whole documents, proportional for a piece of a longer one)."""
        docs = np.array([p[0] for p in pieces], np.int64)
        counts = self.image_counts().gather(docs).tolist() if len(docs) else []
        total = 0
        for (doc, drop, _, n), img in zip(pieces, counts):
            full = self.ds.length_of(doc) - (self.ds.caption_of(doc) if drop else 0)
            total += img if n >= full else round(img * n / full)  # a piece of a longer document: its share
        return total


class Pieces(list):
    """A sample: its (document, caption dropped, start, length) pieces, and ``key``, the sample's index in its data
    set's stream (what its continuous images' timesteps and noise are drawn from)."""

    def __init__(self, pieces, key: int):
        super().__init__(pieces)
        self.key = key


class GlobalOrder:
    """The blended global sample order over several streams."""

    def __init__(self, streams: list[SampleStream], weights: list[float]):
        if len(streams) != len(weights) or not streams:
            raise ValueError("loader: need one weight per data set, and at least one data set")
        self.streams, self.weights = streams, list(weights)
        self.seq_len = streams[0].seq_len
        self.vocab = streams[0].ds.vocab

    def samples(self, start: int, count: int) -> list[tuple[SampleStream, list]]:
        """Global samples [start, start + count): (stream, pieces) each."""
        ds, k = packing.blend(self.weights, start, count)
        return [(self.streams[d], self.streams[d].pieces(j)) for d, j in zip(ds.tolist(), k.tolist())]

    def batch(self, start: int, count: int) -> dict:
        return collate(self.samples(start, count), self.seq_len, self.vocab.pad_id)

    def key(self) -> str:
        """The whole order's identity: every data set's plan key and the blend weights. A changed weight gives a
        new order (and a new ``order-<key>.json``) over the same per-data-set plans, which weights do not enter:
        blending is closed-form (``packing.blend``), so nothing of it needs building."""
        ident = [[s.spec.key() for s in self.streams], packing._integer_weights(self.weights)]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:20]

    def ensure(self, num_samples: int) -> None:
        """Build (once, in the cache) every epoch plan the first ``num_samples`` global samples need, so that no
        epoch is planned in the middle of a run; record what they are in ``order-<key>.json`` beside the first
        data set's plans (for people and the offline command; nothing reads it back)."""
        w = packing._integer_weights(self.weights)
        need = [packing._first_at_or_after(w, d, num_samples) for d in range(len(self.streams))]
        for stream, n in zip(self.streams, need):
            stream.ensure(n)
        first = self.streams[0].store.dir
        if first is not None:
            atomic_write_json(first.parent / f"order-{self.key()}.json", {
                "weights": self.weights, "num_samples": int(num_samples),
                "data_sets": [{"path": str(s.ds.folder), "plans": str(s.store.dir), "samples": int(n),
                               "epochs": s.locate(n - 1)[0] + 1 if n else 0} for s, n in zip(self.streams, need)]})

    def costs(self, samples: list[tuple[SampleStream, list]]) -> tuple[np.ndarray, np.ndarray]:
        """(image tokens, tokens) of each sample: what balancing deals by."""
        img = np.array([s.image_tokens(p) for s, p in samples], np.int64)
        tok = np.array([sum(n for *_, n in p) for _, p in samples], np.int64)
        return img, tok


FLOW_DRAWS = 7  # rng_for purpose of a sample's timesteps and noise (continuous images)


def collate(samples: list[tuple[SampleStream, list]], seq_len: int, pad_id: int) -> dict:
    """Samples (stream, pieces) -> the micro-batch dict of tensors (shapes [B, seq_len]; see the module
    docstring)."""
    B, L = len(samples), seq_len + 1
    vocab = samples[0][0].ds.vocab if samples else None
    lat = np.zeros((B, L, vocab.latent_channels), np.float32) if vocab is not None and vocab.continuous else None
    tokens = np.full((B, L), pad_id, np.int64)
    seg = np.zeros((B, L), np.int64)
    pos = np.zeros((B, L), np.int64)
    train = np.zeros((B, L), bool)  # whether token t may be a target (per the document's own mask)
    ar = np.arange(L)
    for b, (stream, pieces) in enumerate(samples):
        at = 0
        for s, (doc, drop, start, n) in enumerate(pieces):
            t, m = stream.read(doc, drop)
            tokens[b, at:at + n] = t[start:start + n]
            if lat is not None:  # this piece's slots take the document's latents from the slots before it on
                slots = t[:start + n] == vocab.slot_id
                first = int(np.count_nonzero(slots[:start]))
                here = np.flatnonzero(slots[start:]) + at
                lat[b, here] = stream.ds.latents(doc)[first:first + len(here)]
            seg[b, at:at + n] = s
            pos[b, at:at + n] = ar[:n]
            train[b, at:at + n] = True if m is None else m[start:start + n].astype(bool)
            at += n
        seg[b, at:] = len(pieces)  # padding: its own segment, never a target
        pos[b, at:] = ar[:L - at]
        train[b, at:] = False
    # target of input t is token t+1: real only inside one segment, and only where that document trains token t+1
    same = seg[:, 1:] == seg[:, :-1]
    loss_mask = same & train[:, 1:]
    out = {
        "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
        "labels": torch.from_numpy(tokens[:, 1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "position_ids": torch.from_numpy(pos[:, :-1].copy()),
        "document_ids": torch.from_numpy(seg[:, :-1].copy()),
    }
    if lat is not None:
        out.update(_flow_fields(samples, tokens[:, :-1], seg[:, :-1], train[:, :-1], lat[:, :-1], vocab))
    return out


def _flow_fields(samples, tokens, seg, train, lat, vocab) -> dict:
    """The continuous images' tensors of a micro-batch (see the module docstring): which images are generated,
    their timesteps and noise, drawn per sample from ``(seed, data set, sample key)``."""
    B, S, C = lat.shape
    noise = np.zeros_like(lat)
    t = np.zeros((B, S), np.float32)
    flow = np.zeros((B, S), np.float32)
    slot = tokens == vocab.slot_id
    trained_text = train & (tokens < vocab.text_size)
    for b, (stream, pieces) in enumerate(samples):
        rng = packing.rng_for(stream.seed, stream.stream_id, getattr(pieces, "key", 0), FLOW_DRAWS)
        starts = np.flatnonzero(slot[b] & ~np.concatenate([[False], slot[b, :-1]]))
        for a in starts.tolist():
            e = a + int(np.argmin(slot[b, a:])) if not slot[b, a:].all() else S
            later = (seg[b, e:] == seg[b, a]) & trained_text[b, e:]
            if not train[b, a:e].any() or later.any():
                continue  # read, not generated: clean, no loss
            t[b, a:e] = 1.0 / (1.0 + np.exp(-rng.standard_normal()))  # logit-normal
            noise[b, a:e] = rng.standard_normal((e - a, C))
            flow[b, a:e] = 1.0
    return {"latents": torch.from_numpy(np.ascontiguousarray(lat)), "noise": torch.from_numpy(noise),
            "timesteps": torch.from_numpy(t), "flow_mask": torch.from_numpy(flow)}


# ---------------------------------------------------------------------------------------------------------------------
# data-parallel slicing


def rank_micro_batches(consumed: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int) -> list[tuple[int, int]]:
    """(start, count) of each of this rank's micro-batches for the global batch beginning at sample ``consumed``."""
    check_batch_sizes(global_batch_size, micro_batch_size, dp_size, dp_rank)
    per_rank = global_batch_size // dp_size
    first = consumed + dp_rank * per_rank
    return [(first + m, micro_batch_size) for m in range(0, per_rank, micro_batch_size)]


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp_size: int, dp_rank: int = 0) -> None:
    if min(global_batch_size, micro_batch_size, dp_size) <= 0:
        raise ValueError(f"loader: batch sizes and dp_size must be positive (got global_batch_size="
                         f"{global_batch_size}, micro_batch_size={micro_batch_size}, dp_size={dp_size})")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"loader: global_batch_size must divide by micro_batch_size x dp_size (got "
                         f"{global_batch_size}, expected a multiple of {micro_batch_size} x {dp_size})")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"loader: dp_rank {dp_rank} outside 0..{dp_size - 1}")


def step_micro_batches(order: GlobalOrder, consumed: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int, balance: bool = False) -> list[list[tuple[SampleStream, list]]]:
    """This rank's micro-batches (each a list of (stream, pieces)) of the global batch starting at ``consumed``.

    Unbalanced: the rank's contiguous slice, in order. Balanced: the whole global batch is costed and dealt to the
    ranks by ``packing.balance`` (each rank's samples then go in global order); every rank computes the same deal."""
    if not balance or dp_size == 1:
        return [order.samples(s, n) for s, n in rank_micro_batches(consumed, global_batch_size, micro_batch_size,
                                                                   dp_rank, dp_size)]
    check_batch_sizes(global_batch_size, micro_batch_size, dp_size, dp_rank)
    samples = order.samples(consumed, global_batch_size)
    img, tok = order.costs(samples)
    mine = np.flatnonzero(packing.balance(img, tok, dp_size) == dp_rank).tolist()
    return [[samples[i] for i in mine[m:m + micro_batch_size]] for m in range(0, len(mine), micro_batch_size)]


class TrainIterator:
    """Infinite iterator of this rank's micro-batches; ``consumed_samples`` is the first global sample of the
    global batch the next micro-batch belongs to (what a checkpoint records after a completed step).

    ``order`` is None on a rank that does not read: it receives every micro-batch from the first rank of
    ``tp_group`` (which must then be given). ``prefetch`` > 0: the reader builds up to that many micro-batches
    ahead on a background thread (started by the first ``next``); the broadcast itself always runs on the calling
    thread, in program order with the model's own collectives over the same group."""

    def __init__(self, order: Optional[GlobalOrder], micro_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0, *, seq_len: Optional[int] = None, prefetch: int = 0,
                 tp_group=None, balance: bool = False, latent_channels: int = 0):
        check_batch_sizes(global_batch_size, micro_batch_size, dp_size, dp_rank)
        if order is None and tp_group is None:
            raise ValueError("loader: a rank that does not read needs the tensor-parallel group to receive from")
        self.order, self.mbs, self.gbs, self.dp_rank, self.dp_size = (order, micro_batch_size, global_batch_size,
                                                                      dp_rank, dp_size)
        self.seq_len = order.seq_len if order is not None else int(seq_len)
        self.consumed_samples = int(consumed_samples)
        self.prefetch, self.tp_group, self.balance = int(prefetch), tp_group, bool(balance)
        self.latent_channels = int(latent_channels)
        self._per_step = global_batch_size // (micro_batch_size * dp_size)
        self._left = 0  # micro-batches of the current global batch still to hand out
        self._made = self._produce(self.consumed_samples) if order is not None else None
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()

    def _produce(self, consumed: int):
        """This rank's micro-batches from global sample ``consumed`` on, forever (the reader's side)."""
        return _micro_batches(self.order, consumed, self.gbs, self.mbs, self.dp_rank, self.dp_size, self.balance)

    def _read(self) -> dict:
        if self.prefetch <= 0:
            return next(self._made)
        if self._queue is None:  # the thread holds the generator, queue and flag, not the iterator: when the
            self._queue = queue.Queue(maxsize=self.prefetch)  # iterator goes, __del__ stops the thread
            threading.Thread(target=_fill, args=(self._made, self._queue, self._stop), name="megannm-prefetch",
                             daemon=True).start()
        got = self._queue.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._left == 0:
            self._left = self._per_step
            self.consumed_samples += self.gbs
        self._left -= 1
        batch = self._read() if self.order is not None else None
        if self.tp_group is not None:
            from megannm import parallel
            shapes = {k: ((self.mbs, self.seq_len), dt) for k, dt in BATCH_DTYPES.items()}
            if self.latent_channels:
                c = self.latent_channels
                shapes.update({k: ((self.mbs, self.seq_len) + ((c,) if k in ("latents", "noise") else ()), dt)
                               for k, dt in FLOW_DTYPES.items()})
            batch = parallel.broadcast_tensors(batch, shapes, self.tp_group)
        return batch

    def close(self) -> None:
        """Stop the prefetching thread (it also stops with the process: it is a daemon)."""
        self._stop.set()

    def __del__(self):
        stop = getattr(self, "_stop", None)  # (absent when __init__ refused its arguments)
        if stop is not None:
            stop.set()


def _micro_batches(order: GlobalOrder, consumed: int, gbs: int, mbs: int, dp_rank: int, dp_size: int,
                   balance: bool):
    while True:
        for samples in step_micro_batches(order, consumed, gbs, mbs, dp_rank, dp_size, balance):
            yield collate(samples, order.seq_len, order.vocab.pad_id)
        consumed += gbs


def _fill(made, q: queue.Queue, stop: threading.Event) -> None:
    """The prefetching thread: micro-batches into ``q`` in order until ``stop``; an exception is handed over."""
    try:
        for batch in made:
            while not stop.is_set():
                try:
                    q.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
    except BaseException as e:  # raised on the consumer's side, with its own message
        q.put(e)


# ---------------------------------------------------------------------------------------------------------------------
# builders


def _open(path, vocab, cache_frames: int) -> ShardDataset:
    if isinstance(path, ShardDataset):
        if vocab is not None:
            vocab_obj, here = (vocab, "the given vocabulary") if isinstance(vocab, Vocab) else (Vocab.load(vocab),
                                                                                                 str(vocab))
            vocab_obj.check_same(path.vocab.fingerprint, here=here, there=str(path.folder / "manifest.json"))
        return path
    return ShardDataset(Path(path), vocab, cache_frames=cache_frames, lazy=True,
                        index_cache=max(4, cache_frames))


def _pairs(datasets) -> list[tuple[object, float]]:
    out = []
    for d in datasets:
        if hasattr(d, "path") and hasattr(d, "weight"):  # config.DatasetRef
            out.append((d.path, float(d.weight)))
        elif isinstance(d, (tuple, list)):
            out.append((d[0], float(d[1])))
        else:
            out.append((d, 1.0))
    return out


def build_order(datasets, vocab, seq_len: int, seed: int, pack: bool = True, caption_dropout: float = 0.0,
                shuffle: bool = True, window_frames: int = 16, plan_dir=None, cache: bool = True) -> GlobalOrder:
    """The global sample order over ``datasets`` ((path | ShardDataset, weight) pairs or DatasetRefs).

    Plans are cached in ``plan_dir`` (None: a ``plans/`` folder inside each data set's folder); ``cache=False``
    builds them in memory in this process instead."""
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"loader: caption_dropout must be in [0, 1) (got {caption_dropout})")
    pairs = _pairs(datasets)
    # the reader keeps two windows decompressed: ranks straddle a window boundary, never more
    opened = [_open(p, vocab, cache_frames=2 * window_frames + 2) for p, _ in pairs]
    fps = {d.vocab.fingerprint for d in opened}
    if len(fps) > 1:
        a, b = opened[0], next(d for d in opened if d.vocab.fingerprint != opened[0].vocab.fingerprint)
        a.vocab.check_same(b.vocab.fingerprint, here=str(a.folder / "manifest.json"),
                           there=str(b.folder / "manifest.json"))

    def where(d: ShardDataset) -> Optional[Path]:
        if not cache:
            return None
        return Path(plan_dir) if plan_dir is not None else d.folder / "plans"

    streams = [SampleStream(d, i, seq_len, seed, pack, caption_dropout, shuffle, window_frames, where(d))
               for i, d in enumerate(opened)]
    return GlobalOrder(streams, [w for _, w in pairs])


def build_train_iterator(datasets, vocab, seq_len: int, micro_batch_size: int, global_batch_size: int,
                         dp_rank: int, dp_size: int, seed: int, consumed_samples: int = 0, pack: bool = True,
                         caption_dropout: float = 0.0, *, plan_dir=None, plan_samples: Optional[int] = None,
                         prefetch: int = 0, tp_group=None, balance: bool = False) -> TrainIterator:
    """This rank's infinite iterator of micro-batch dicts (see the module docstring for the order).

    ``datasets``: (path | ShardDataset, weight) pairs or ``config.DatasetRef``s; ``vocab``: a ``Vocab``, a path to
    vocab.json, or None (then the data sets only have to agree with each other). ``plan_dir``: the plan cache
    (None: inside each data set's folder). ``plan_samples``: build the plans of the first that many global samples
    now (the run's length), not when the run gets there. ``tp_group``: the rank's tensor-parallel group; only its
    first rank reads, the others receive. ``prefetch``: micro-batches built ahead on a background thread.
    ``balance``: deal each global batch to the data-parallel ranks by image tokens."""
    reader = True
    if tp_group is not None:
        from megannm import parallel
        reader = parallel.group_rank(tp_group) == 0
        if parallel.group_size(tp_group) == 1:
            tp_group = None  # nothing to broadcast to
    order = None
    if reader:
        order = build_order(datasets, vocab, seq_len, seed, pack, caption_dropout, plan_dir=plan_dir)
        if plan_samples:
            order.ensure(int(plan_samples))
        if balance:  # balancing weighs samples by image tokens: count them now (once: cached), not at step one
            for stream in order.streams:
                stream.image_counts()
    return TrainIterator(order, micro_batch_size, global_batch_size, dp_rank, dp_size, consumed_samples,
                         seq_len=seq_len, prefetch=prefetch, tp_group=tp_group, balance=balance,
                         latent_channels=getattr(vocab, "latent_channels", 0))


def build_eval_batches(datasets, vocab, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                       num_batches: int | None = None, pack: bool = True, seed: int = 0) -> list[dict]:
    """Validation micro-batches for this rank: each data set in stored order (no shuffle, no caption dropout).

    ``datasets``: one path or ShardDataset, or a list of them / (path, weight) pairs (weights are ignored). For
    every data set, micro-batch m goes to rank m % dp_size, and every rank gets the same number of micro-batches
    (missing samples are empty, loss mask all zero), so collective ops stay matched. ``num_batches`` caps the
    micro-batches per rank and per data set. ``seed`` is accepted for symmetry; the order does not depend on it.
    The stored order of a validation set is planned in memory (it writes nothing beside the data)."""
    del seed
    check_batch_sizes(micro_batch_size * dp_size, micro_batch_size, dp_size, dp_rank)
    if isinstance(datasets, (str, Path, ShardDataset)):
        datasets = [datasets]
    out = []
    for path, _ in _pairs(datasets):
        order = build_order([(path, 1.0)], vocab, seq_len, seed=0, pack=pack, shuffle=False, cache=False)
        stream = order.streams[0]
        total = stream.epoch_index(0).num_samples
        per_rank = -(-total // (micro_batch_size * dp_size))
        if num_batches is not None:
            per_rank = min(per_rank, num_batches)
        for m in range(per_rank):
            first = (m * dp_size + dp_rank) * micro_batch_size
            samples = [(stream, stream.pieces(k) if k < total else []) for k in range(first, first + micro_batch_size)]
            out.append(collate(samples, seq_len, order.vocab.pad_id))
    return out


def build_recipe_order(recipe) -> int:
    """Build (or find built) every epoch a recipe's run reads: the train order for all its steps (and its image
    counts when ``data.balance``), and each validation set's order. Returns the run's training samples."""
    d = recipe.data
    samples = recipe.schedule.train_steps * d.global_batch_size
    if d.train:
        order = build_order(d.train, d.vocab, d.seq_len, d.seed, d.pack, d.caption_dropout, plan_dir=d.plan_dir)
        order.ensure(samples)
        if d.balance:
            for stream in order.streams:
                stream.image_counts()
    for ref in d.valid:
        build_order([ref], d.vocab, d.seq_len, seed=0, pack=d.pack, shuffle=False, plan_dir=d.plan_dir).ensure(1)
    return samples
