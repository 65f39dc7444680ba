"""Deterministic, resumable training batches from shard folders.

The global sample order is a pure function of (seed, data sets, weights, seq_len, pack, caption_dropout) and the
sample's global index:

1. blending (``packing.blend``) gives global index g to data set d as its k-th sample;
2. data set d's k-th sample is sample j of its epoch e (each data set counts its own epochs);
3. epoch e of data set d is a seeded permutation of its documents (frame-local: ``packing.frame_local_order``),
   caption dropout decided per document, documents longer than a sample cut into pieces, and pieces packed greedily
   into samples of ``seq_len + 1`` tokens (``pack=False``: one document per sample, truncated or padded).

Resuming at ``consumed_samples=k`` therefore yields exactly the tail of the full order. For optimizer step s the
global batch is samples ``[consumed, consumed + GB)``; data-parallel rank r takes the contiguous slice
``[r * GB / dp, (r + 1) * GB / dp)`` and splits it into micro-batches in order, so DP=2 x accum 1 and DP=1 x
accum 2 see the same micro-batches.

A batch (``collate``) is a dict of tensors ``input_ids``, ``labels`` (next token), ``loss_mask`` (1 where the label
is a real target of the same document and the document's own mask trains it), ``position_ids`` (reset at each
document start) and ``document_ids`` (segment index within the sample; padding is a segment of its own), from
which the model builds its block-diagonal causal mask.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megannm.data import packing
from megannm.data.shards import ShardDataset
from megannm.vocab import Vocab

_PURPOSE_ORDER, _PURPOSE_CAPTION = 0, 1


@dataclass
class EpochPlan:
    """One data set's epoch: pieces (document, caption dropped, start, length) grouped into samples."""
    doc: np.ndarray
    drop: np.ndarray
    start: np.ndarray
    length: np.ndarray
    bounds: np.ndarray  # sample s = pieces bounds[s]:bounds[s+1]

    @property
    def num_samples(self) -> int:
        return len(self.bounds) - 1


class SampleStream:
    """One data set's infinite sequence of samples, epoch after epoch."""

    def __init__(self, ds: ShardDataset, stream_id: int, seq_len: int, seed: int, pack: bool = True,
                 caption_dropout: float = 0.0, shuffle: bool = True, window_frames: int = 16):
        if len(ds) == 0:
            raise ValueError(f"{ds.folder}: data set has no documents")
        self.ds, self.stream_id, self.seq_len, self.seed = ds, stream_id, seq_len, seed
        self.pack, self.caption_dropout = pack, caption_dropout
        self.shuffle, self.window_frames = shuffle, window_frames
        self._plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._epoch_starts = [0]  # cumulative samples before epoch e (grown lazily)
        self._warned = False

    def plan(self, epoch: int) -> EpochPlan:
        hit = self._plans.get(epoch)
        if hit is not None:
            self._plans.move_to_end(epoch)
            return hit
        ds = self.ds
        if self.shuffle:
            order = packing.frame_local_order(ds.doc_frames, ds.num_frames,
                                              packing.rng_for(self.seed, self.stream_id, epoch, _PURPOSE_ORDER),
                                              self.window_frames)
        else:
            order = np.arange(len(ds))
        drop = packing.caption_drops(ds.caption_lengths, self.caption_dropout,
                                     packing.rng_for(self.seed, self.stream_id, epoch, _PURPOSE_CAPTION))[order]
        lengths = ds.doc_lengths[order].astype(np.int64) - np.where(drop, ds.caption_lengths[order], 0)
        cap = self.seq_len + 1
        if self.pack:
            pos, start, length = packing.split_pieces(lengths, self.seq_len)
            bounds = packing.pack_next_fit(length, cap)
        else:  # one document per sample, truncated to the sample length
            pos, start, length = np.arange(len(order)), np.zeros(len(order), np.int64), np.minimum(lengths, cap)
            cut = int((lengths > cap).sum())
            if cut and not self._warned:  # truncation silently drops document ends (an image's last codes, <eos>)
                self._warned = True
                warnings.warn(f"{ds.folder}: {cut} of {len(lengths)} documents are longer than seq_len + 1 = {cap} "
                              f"tokens (longest {int(lengths.max())}) and are truncated (pack=False)", stacklevel=2)
            bounds = np.arange(len(order) + 1)
        plan = EpochPlan(order[pos], drop[pos], start, length, bounds)
        self._plans[epoch] = plan
        if len(self._plans) > 3:
            self._plans.popitem(last=False)
        return plan

    def locate(self, k: int) -> tuple[int, int]:
        """Sample k of this stream -> (epoch, sample within the epoch)."""
        if not self.pack:  # one sample per document: every epoch has the same size
            return divmod(k, len(self.ds))
        starts = self._epoch_starts
        while starts[-1] <= k:  # epochs differ in sample count (packing), so they are counted, in order, once
            starts.append(starts[-1] + self.plan(len(starts) - 1).num_samples)
        e = int(np.searchsorted(starts, k, side="right")) - 1
        return e, k - starts[e]

    def pieces(self, k: int) -> list[tuple[int, bool, int, int]]:
        e, j = self.locate(k)
        p = self.plan(e)
        a, b = p.bounds[j], p.bounds[j + 1]
        return list(zip(p.doc[a:b].tolist(), p.drop[a:b].tolist(), p.start[a:b].tolist(), p.length[a:b].tolist()))

    def read(self, doc: int, drop: bool) -> tuple[np.ndarray, np.ndarray | None]:
        tokens, mask = self.ds.get(doc)
        if drop:  # remove the caption between <bos> and the first <boi>: the image becomes unconditional
            c = int(self.ds.caption_lengths[doc])
            tokens = np.concatenate([tokens[:1], tokens[1 + c:]])
            mask = None if mask is None else np.concatenate([mask[:1], mask[1 + c:]])
        return tokens, mask


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


def collate(samples: list[tuple[SampleStream, list]], seq_len: int, pad_id: int) -> dict:
    """Samples (stream, pieces) -> the micro-batch dict of tensors (shapes [B, seq_len])."""
    B, L = len(samples), seq_len + 1
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
    return {
        "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
        "labels": torch.from_numpy(tokens[:, 1:].copy()),
        "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
        "position_ids": torch.from_numpy(pos[:, :-1].copy()),
        "document_ids": torch.from_numpy(seg[:, :-1].copy()),
    }


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


class TrainIterator:
    """Infinite iterator of this rank's micro-batches; ``consumed_samples`` is the first global sample of the
    global batch the next micro-batch belongs to (what a checkpoint records after a completed step)."""

    def __init__(self, order: GlobalOrder, micro_batch_size: int, global_batch_size: int, dp_rank: int,
                 dp_size: int, consumed_samples: int = 0):
        check_batch_sizes(global_batch_size, micro_batch_size, dp_size, dp_rank)
        self.order, self.mbs, self.gbs, self.dp_rank, self.dp_size = (order, micro_batch_size, global_batch_size,
                                                                      dp_rank, dp_size)
        self.consumed_samples = int(consumed_samples)
        self._queue: list[tuple[int, int]] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self._queue:
            self._queue = rank_micro_batches(self.consumed_samples, self.gbs, self.mbs, self.dp_rank, self.dp_size)
            self.consumed_samples += self.gbs
        start, count = self._queue.pop(0)
        return self.order.batch(start, count)

# ---------------------------------------------------------------------------------------------------------------------
# builders


def _open(path, vocab, cache_frames: int) -> ShardDataset:
    if isinstance(path, ShardDataset):
        if vocab is not None:
            vocab_obj, here = (vocab, "the given vocabulary") if isinstance(vocab, Vocab) else (Vocab.load(vocab),
                                                                                                 str(vocab))
            vocab_obj.check_same(path.vocab.fingerprint, here=here, there=str(path.folder / "manifest.json"))
        return path
    return ShardDataset(Path(path), vocab, cache_frames=cache_frames)


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
                shuffle: bool = True, window_frames: int = 16) -> GlobalOrder:
    """The global sample order over ``datasets`` ((path | ShardDataset, weight) pairs or DatasetRefs)."""
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
    streams = [SampleStream(d, i, seq_len, seed, pack, caption_dropout, shuffle, window_frames)
               for i, d in enumerate(opened)]
    return GlobalOrder(streams, [w for _, w in pairs])


def build_train_iterator(datasets, vocab, seq_len: int, micro_batch_size: int, global_batch_size: int,
                         dp_rank: int, dp_size: int, seed: int, consumed_samples: int = 0, pack: bool = True,
                         caption_dropout: float = 0.0) -> TrainIterator:
    """This rank's infinite iterator of micro-batch dicts (see the module docstring for the order).

    ``datasets``: (path | ShardDataset, weight) pairs or ``config.DatasetRef``s; ``vocab``: a ``Vocab``, a path to
    vocab.json, or None (then the data sets only have to agree with each other)."""
    order = build_order(datasets, vocab, seq_len, seed, pack, caption_dropout)
    return TrainIterator(order, micro_batch_size, global_batch_size, dp_rank, dp_size, consumed_samples)


def build_eval_batches(datasets, vocab, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                       num_batches: int | None = None, pack: bool = True, seed: int = 0) -> list[dict]:
    """Validation micro-batches for this rank: each data set in stored order (no shuffle, no caption dropout).

    ``datasets``: one path or ShardDataset, or a list of them / (path, weight) pairs (weights are ignored). For
    every data set, micro-batch m goes to rank m % dp_size, and every rank gets the same number of micro-batches
    (missing samples are empty, loss mask all zero), so collective ops stay matched. ``num_batches`` caps the
    micro-batches per rank and per data set. ``seed`` is accepted for symmetry; the order does not depend on it."""
    del seed
    check_batch_sizes(micro_batch_size * dp_size, micro_batch_size, dp_size, dp_rank)
    if isinstance(datasets, (str, Path, ShardDataset)):
        datasets = [datasets]
    out = []
    for path, _ in _pairs(datasets):
        order = build_order([(path, 1.0)], vocab, seq_len, seed=0, pack=pack, shuffle=False)
        stream = order.streams[0]
        total = stream.plan(0).num_samples
        per_rank = -(-total // (micro_batch_size * dp_size))
        if num_batches is not None:
            per_rank = min(per_rank, num_batches)
        for m in range(per_rank):
            first = (m * dp_size + dp_rank) * micro_batch_size
            samples = [(stream, stream.pieces(k) if k < total else []) for k in range(first, first + micro_batch_size)]
            out.append(collate(samples, seq_len, order.vocab.pad_id))
    return out
