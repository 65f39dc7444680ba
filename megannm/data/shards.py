"""Token shards: zstd-compressed documents that a reader can seek into, with checksums and a manifest.

A dataset folder holds::

    manifest.json       format version, vocabulary (dict + fingerprint), counts, per-shard sizes and sha256
    vocab.json          a copy of the vocabulary, so a folder is self-describing
    shard-00000.zst     independent zstd frames, each holding whole documents (~1 MiB uncompressed)
    shard-00000.idx     the shard's index (zstd-compressed): per document (frame, offset, length, mask offset,
                        caption length), per frame (byte offset, compressed size, size, crc32 of the compressed bytes)

A frame's payload is the tokens of its documents (``vocab.token_dtype()``, little-endian), then (continuous images)
the float16 latents of their latent slots, ``latent_channels`` numbers a slot in the order the slots appear, then
the bit-packed loss masks of those documents that have one. Frames are independent, so reading a
document costs one ``pread`` and one ~1 MiB decompression, amortised over every other document of that frame (the
loader reads documents frame-locally and keeps recent frames decompressed).

Safety: a folder is written under a temporary name and renamed when complete, so a partial dataset is never
visible. The reader checks the index's sha256 and every shard's size when it opens (``lazy=True``: when it first
reads from that shard, so that opening does not grow with the data set), and each frame's crc32 when it reads
one; ``verify()`` checks whole-shard sha256. A corrupt or truncated shard is a ``ShardError`` naming the shard
and the document, never a silent short read.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import shutil
import zlib
from array import array
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zstandard

from megannm.fileio import WriteError, reclaim_stale, temp_name, write_error
from megannm.vocab import Vocab, VocabMismatchError

FORMAT = "megannm-shards"
VERSION = 1
NO_MASK = np.iinfo(np.uint32).max

DOC_DTYPE = np.dtype([("frame", "<u4"), ("offset", "<u4"), ("length", "<u4"), ("mask", "<u4"), ("caption", "<u4")])
FRAME_DTYPE = np.dtype([("offset", "<u8"), ("csize", "<u4"), ("size", "<u4"), ("crc", "<u4"), ("first_doc", "<u4"),
                        ("docs", "<u4")])


class ShardError(ValueError):
    """A dataset folder that cannot be read correctly; one line naming the file (and document) at fault."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.zst"


def index_name(k: int) -> str:
    return f"shard-{k:05d}.idx"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def caption_length(tokens: np.ndarray, vocab: Vocab) -> int:
    """Text tokens between a leading ``<bos>`` and the first ``<boi>`` (0 unless the document starts
    ``<bos> text... <boi>``): what caption dropout may remove. Stored per document so that the loader can plan its
    packing without reading any tokens."""
    tokens = np.asarray(tokens)
    return int(caption_lengths(tokens, np.zeros(1, np.int64), np.array([len(tokens)]), vocab)[0])


def caption_lengths(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, vocab: Vocab) -> np.ndarray:
    """``caption_length`` of every document of a concatenation, vectorised (no per-document Python)."""
    n = len(tokens)
    if n == 0:
        return np.zeros(len(starts), np.int64)
    ends = starts + lengths
    # position of each document's first <boi> (or its end): a running minimum from the right over <boi> positions
    boi_at = np.where(tokens == vocab.boi_id, np.arange(n), n)
    next_boi = np.minimum.accumulate(boi_at[::-1])[::-1]
    first = next_boi[starts]
    # non-text tokens strictly between <bos> and that <boi>: prefix sums of "not text"
    nontext = np.concatenate([[0], np.cumsum(tokens >= vocab.text_size)])
    inner_nontext = nontext[np.minimum(first, n)] - nontext[starts + 1]
    ok = (tokens[starts] == vocab.bos_id) & (first < ends) & (first - starts >= 2) & (inner_nontext == 0)
    return np.where(ok, first - starts - 1, 0).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Append documents; ``close()`` makes the folder appear complete (or not at all: ``abort()``, or an exception
    inside a ``with`` block, removes the temporary folder).

    The bytes written are a pure function of the documents and the settings, so that the same inputs give the same
    dataset (no timestamps, no host names)."""

    def __init__(self, out_dir, vocab: Vocab, docs_per_shard: int = 100_000, frame_bytes: int = 1 << 20,
                 level: int = 9, overwrite: bool = False, metadata: dict | None = None):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir}: already exists (remove it, or pass overwrite)")
        if docs_per_shard <= 0 or frame_bytes <= 0:
            raise ValueError(f"shards: docs_per_shard and frame_bytes must be positive (got {docs_per_shard}, "
                             f"{frame_bytes})")
        self.vocab, self.dtype = vocab, np.dtype(vocab.token_dtype())
        self.docs_per_shard, self.frame_tokens = docs_per_shard, max(1, frame_bytes // self.dtype.itemsize)
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.tmp = temp_name(self.out_dir)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._file = None
        try:
            reclaim_stale(self.out_dir)  # what killed runs into the same folder left
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise self._failed(e) from None
        # content checksums inside each frame too (zstd's xxhash64 of the payload), on top of our crc32 of the bytes
        self._cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._shards: list[dict] = []
        self._num_docs = self._num_tokens = self._num_masked = 0
        # per document: its image codes and its other tokens (4 bytes each: the manifest's tokens_per_doc summary)
        self._image_counts, self._text_counts, self._num_images = array("I"), array("I"), 0
        self._closed = False
        self._open_shard()

    # shard and frame bookkeeping ---------------------------------------------------------------------------------
    def _open_shard(self):
        self._k = len(self._shards)
        self._file = open(self.tmp / shard_name(self._k), "wb")
        self._docs: list[tuple] = []
        self._frames: list[tuple] = []
        self._pending: list[tuple] = []  # (tokens, mask, latents or None) of the open frame
        self._wheres: dict[int, str] = {}  # pending document (global index) -> where it came from, for errors
        self._pending_tokens = 0
        self._bytes = 0

    def _flush_frame(self):
        if not self._pending:
            return
        tokens = np.concatenate([t for t, _, _ in self._pending])
        lengths = np.array([len(t) for t, _, _ in self._pending], np.int64)
        starts = np.cumsum(lengths) - lengths
        self._check_ids(tokens, starts)
        caps = caption_lengths(tokens, starts, lengths, self.vocab).tolist()
        tokens = tokens.astype(self.dtype, copy=False)
        payload = [tokens.tobytes()]
        if self.vocab.continuous:
            payload += [lat.astype("<f2").tobytes() for _, _, lat in self._pending]
        mask_at = sum(len(b) for b in payload)
        frame, first_doc, offset = len(self._frames), len(self._docs), 0
        for (t, m, _), cap in zip(self._pending, caps):
            if m is None:
                self._docs.append((frame, offset, len(t), NO_MASK, cap))
            else:
                packed = np.packbits(m.astype(bool)).tobytes()
                self._docs.append((frame, offset, len(t), mask_at, cap))
                payload.append(packed)
                mask_at += len(packed)
            offset += len(t)
        blob = self._cctx.compress(b"".join(payload))
        self._frames.append((self._bytes, len(blob), mask_at, zlib.crc32(blob), first_doc, len(self._pending)))
        self._file.write(blob)
        self._bytes += len(blob)
        self._pending, self._pending_tokens = [], 0
        self._wheres.clear()

    def _close_shard(self):
        self._flush_frame()
        self._file.close()
        if not self._docs:  # only possible for an empty dataset: keep no empty shard
            os.remove(self.tmp / shard_name(self._k))
            return
        docs = np.array(self._docs, dtype=DOC_DTYPE)
        frames = np.array(self._frames, dtype=FRAME_DTYPE)
        buf = io.BytesIO()
        np.save(buf, docs, allow_pickle=False)
        np.save(buf, frames, allow_pickle=False)
        idx_path = self.tmp / index_name(self._k)
        idx_path.write_bytes(zstandard.ZstdCompressor(level=19, write_checksum=True).compress(buf.getvalue()))
        shard_path = self.tmp / shard_name(self._k)
        self._shards.append({
            "file": shard_name(self._k), "index": index_name(self._k),
            "docs": len(docs), "tokens": int(docs["length"].sum(dtype=np.int64)), "frames": len(frames),
            "bytes": shard_path.stat().st_size, "sha256": _sha256(shard_path),
            "index_bytes": idx_path.stat().st_size, "index_sha256": _sha256(idx_path),
        })

    def _check_ids(self, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Every id inside the vocabulary (checked once per frame; the culprit is found only on failure)."""
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab.size):
            at = int(np.flatnonzero((tokens < 0) | (tokens >= self.vocab.size))[0])
            doc = self._num_docs - len(self._pending) + int(np.searchsorted(starts, at, side="right")) - 1
            where = self._wheres.get(doc, f"document {doc}")
            raise ValueError(f"{where}: token id {int(tokens[at])} outside the vocabulary [0, {self.vocab.size})")

    def _failed(self, error: OSError) -> WriteError:
        """The temporary folder removed, and one line: the folder, why, the free space there."""
        self.abort()
        return write_error(self.out_dir, error, "data set", removed=self.tmp.name)

    # public -------------------------------------------------------------------------------------------------------
    def add(self, tokens, mask=None, latents=None, where: str = "") -> None:
        """Append one document: token ids (any integer array), an optional per-token loss mask (0/1) and, with
        continuous images, the latents [slots, latent_channels] of its latent slots in order."""
        try:
            self._add(tokens, mask, latents, where)
        except OSError as e:
            raise self._failed(e) from None

    def _add(self, tokens, mask=None, latents=None, where: str = "") -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or len(tokens) == 0 or tokens.dtype.kind not in "iu":
            raise ValueError(f"{where or f'document {self._num_docs}'}: a document is a non-empty 1-d array of "
                             f"integer ids (got shape {tokens.shape}, dtype {tokens.dtype})")
        if where:
            self._wheres[self._num_docs] = where
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tokens.shape:
                raise ValueError(f"{where or f'document {self._num_docs}'}: loss mask shape {mask.shape} differs "
                                 f"from tokens {tokens.shape}")
            self._num_masked += 1
        n_image = int(np.count_nonzero((tokens >= self.vocab.image_start) & (tokens < self.vocab.image_end)))
        if self.vocab.continuous:
            c = self.vocab.latent_channels
            latents = np.zeros((0, c), np.float16) if latents is None and n_image == 0 else latents
            if latents is None or np.shape(latents) != (n_image, c):
                raise ValueError(f"{where or f'document {self._num_docs}'}: latents of shape "
                                 f"{None if latents is None else list(np.shape(latents))} for {n_image} latent slots "
                                 f"(expected [{n_image}, {c}])")
            latents = np.asarray(latents, np.float16)
            if not np.isfinite(latents).all():
                raise ValueError(f"{where or f'document {self._num_docs}'}: latents not finite in float16 (an "
                                 f"autoencoder's latents must be scaled to a few units)")
        elif latents is not None:
            raise ValueError(f"{where or f'document {self._num_docs}'}: latents given, but the vocabulary's images "
                             f"are discrete codes")
        self._image_counts.append(n_image)
        self._text_counts.append(len(tokens) - n_image)
        self._num_images += int(np.count_nonzero(tokens == self.vocab.boi_id))
        if self._pending_tokens and self._pending_tokens + len(tokens) > self.frame_tokens:
            self._flush_frame()  # whole documents per frame: a long document gets a frame of its own size
        self._pending.append((tokens, mask, latents))
        self._pending_tokens += len(tokens)
        self._num_docs += 1
        self._num_tokens += len(tokens)
        if len(self._docs) + len(self._pending) >= self.docs_per_shard:
            self._close_shard()
            self._open_shard()

    def close(self) -> dict:
        """Finish the last shard, write index, manifest and vocab.json, and rename the folder into place."""
        if self._closed:
            raise RuntimeError("shards: writer already closed")
        try:
            return self._close()
        except OSError as e:
            if isinstance(e, FileExistsError):
                raise
            raise self._failed(e) from None

    def _close(self) -> dict:
        self._close_shard()
        manifest = {
            "format": FORMAT, "version": VERSION,
            "vocab_fingerprint": self.vocab.fingerprint, "vocab": self.vocab.to_dict(),
            "token_dtype": self.dtype.name,
            "num_docs": self._num_docs, "num_tokens": self._num_tokens, "num_masked_docs": self._num_masked,
            "shards": self._shards,
            # what a recipe's seq_len must hold (check_seq_len): an image's span, and documents' sizes per modality
            "image_tokens_per_image": int(self.vocab.image_grid), "num_images": self._num_images,
            **({"latent_channels": self.vocab.latent_channels, "latent_dtype": "float16"}
               if self.vocab.continuous else {}),
            "tokens_per_doc": tokens_per_doc(np.frombuffer(self._text_counts, np.uint32),
                                             np.frombuffer(self._image_counts, np.uint32)),
            **self.metadata,
        }
        self.vocab.save(self.tmp / "vocab.json")
        # the manifest last: a folder with a manifest is complete (and the rename makes the whole folder appear)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        _fsync_dir(self.tmp)
        if self.out_dir.exists():
            if not self.overwrite:
                self.abort()
                raise FileExistsError(f"{self.out_dir}: appeared while writing (not overwritten)")
            old = temp_name(self.out_dir, "old")
            self.out_dir.rename(old)
            self.tmp.rename(self.out_dir)
            shutil.rmtree(old)
        else:
            self.tmp.rename(self.out_dir)
        self._closed = True
        return manifest

    def abort(self) -> None:
        self._closed = True
        try:
            if self._file is not None:
                self._file.close()
        except OSError:  # its buffer could not be flushed (a full disk): the folder goes anyway
            pass
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _spread(counts: np.ndarray) -> dict:
    if len(counts) == 0:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": int(counts.min()), "median": float(np.median(counts)), "max": int(counts.max())}


def tokens_per_doc(text: np.ndarray, image: np.ndarray) -> dict:
    """min / median / max tokens per document: ``text`` (everything but image codes: text, specials, <boi>/<eoi>),
    ``image`` (image codes) and ``total``."""
    total = text.astype(np.int64) + image
    return {"text": _spread(text), "image": _spread(image), "total": _spread(total)}


def seq_len_that_fits(manifest: dict) -> int:
    """The shortest ``data.seq_len`` that keeps every document of the data set whole in one sample (a sample is
    ``seq_len + 1`` tokens: inputs and next-token labels)."""
    return max(1, int(manifest.get("tokens_per_doc", {}).get("total", {}).get("max", 2)) - 1)


def check_seq_len(manifest: dict, seq_len: int, source: str) -> None:
    """One line naming the data set and ``seq_len`` if an image cannot fit in one sample: a longer document is cut
    into pieces, but an image cut in two trains the model on codes without the start of their picture (and the
    generator could never produce it). ``source`` names the manifest for the message."""
    grid = int(manifest.get("image_tokens_per_image") or manifest.get("vocab", {}).get("image_grid", 0))
    if manifest.get("num_images", 1) and grid and grid + 2 > seq_len + 1:
        raise ValueError(f"{source}: an image takes {grid + 2} tokens (<boi> + {grid} codes + <eoi>) but data.seq_len "
                         f"is {seq_len}: set data.seq_len >= {grid + 1}, or use an image tokenizer with fewer tokens "
                         f"per image")


def token_summary(manifest: dict) -> list[str]:
    """What ``megannm preprocess`` prints after the totals: tokens per document per modality, and the seq_len."""
    t = manifest.get("tokens_per_doc")
    if not t:
        return []
    f = lambda d: f"{d['min']} / {d['median']:g} / {d['max']}"
    grid = int(manifest.get("image_tokens_per_image") or 0)
    lines = [f"  tokens per document (min / median / max): text {f(t['text'])}, image {f(t['image'])}, "
             f"total {f(t['total'])}"]
    if manifest.get("num_images"):
        lines.append(f"  {manifest['num_images']} images of {grid} tokens each ({grid + 2} with <boi> and <eoi>)")
    fits = seq_len_that_fits(manifest)
    lines.append(f"  data.seq_len >= {fits} keeps every document whole in one sample (e.g. seq_len: "
                 f"{-(-fits // 64) * 64}); shorter documents are packed together, longer ones cut into pieces")
    return lines


def write_dataset(out_dir, docs, vocab: Vocab, **kwargs) -> dict:
    """Write an iterable of ``tokens``, ``(tokens, mask)`` or ``(tokens, mask, latents)`` documents; returns the
    manifest."""
    with ShardWriter(out_dir, vocab, **kwargs) as w:
        for d in docs:
            w.add(*(d if isinstance(d, tuple) else (d,)))
        return w.close()


# ---------------------------------------------------------------------------------------------------------------------
# reading


def _load_vocab_arg(vocab) -> tuple[Vocab | None, str]:
    if vocab is None or isinstance(vocab, Vocab):
        return vocab, "the given vocabulary"
    return Vocab.load(vocab), str(vocab)


class _Index:
    """The index of a run of documents (one shard, or all of them): per-document fields as plain uint32 arrays with
    global frame numbers, and their frames. The per-document hot path indexes memoryviews of the arrays: they hand
    back Python ints ~6x faster than numpy scalar indexing, which matters at a few hundred nanoseconds a document."""

    def __init__(self, docs: np.ndarray, frames: np.ndarray, frame_shard: np.ndarray, first_doc: int,
                 first_frame: int):
        self.first_doc, self.first_frame = first_doc, first_frame
        self.frame, self.offset, self.length, self.mask, self.caption = (
            np.ascontiguousarray(docs[name]) for name in DOC_DTYPE.names)
        self.frames, self.frame_shard = frames, frame_shard
        last = (frames["first_doc"].astype(np.int64) - first_doc + frames["docs"]) - 1
        self.frame_tokens = (self.offset[last].astype(np.int64) + self.length[last]).tolist()
        self.mv = tuple(memoryview(a) for a in (self.frame, self.offset, self.length, self.mask))

    @property
    def nbytes(self) -> int:
        return 20 * len(self.frame) + self.frames.nbytes + 8 * len(self.frame_tokens)


class ShardDataset:
    """Random access to the documents of a dataset folder.

    ``vocab`` (a ``Vocab`` or a path to a vocab.json) is checked against the folder's fingerprint. Tokens come back
    as read-only views into a decompressed frame; the last ``cache_frames`` frames stay decompressed (so reading
    documents frame by frame, or window by window as the loader does, decompresses each frame once).

    By default every shard index is read, checked and kept at open (20 bytes a document). ``lazy=True`` reads only
    the manifest at open: a shard's index is read and checked (sha256, shard size) when one of its documents is
    first read, and at most ``index_cache`` shard indexes are kept, so opening costs the same for a thousand or
    a hundred million documents and resident memory does not grow with them (the loader's sample plans already
    hold what it needs of the whole index). In lazy mode the whole-data-set arrays (``doc_lengths``,
    ``caption_lengths``, ``doc_frames``) read every index on each call: ``plan_arrays()`` reads them in one pass."""

    def __init__(self, folder, vocab: Vocab | str | Path | None = None, cache_frames: int = 64, lazy: bool = False,
                 index_cache: int = 8):
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise ShardError(f"{self.folder}: not a dataset folder (no manifest.json; written by preprocess?)"
                             ) from None
        except json.JSONDecodeError as e:
            raise ShardError(f"{mpath}: not valid JSON ({e})") from None
        m = self.manifest
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ShardError(f"{mpath}: unsupported format {m.get('format')!r} version {m.get('version')!r} "
                             f"(expected {FORMAT!r} version {VERSION})")
        self.vocab = Vocab.from_dict(m["vocab"], source=str(mpath))
        beside = self.folder / "vocab.json"
        if beside.exists():
            self.vocab.check_same(Vocab.load(beside).fingerprint, here=str(mpath), there=str(beside))
        given, source = _load_vocab_arg(vocab)
        if given is not None:
            given.check_same(m["vocab_fingerprint"], here=source, there=str(mpath))
        self.dtype = np.dtype(m["token_dtype"])
        # where each shard's documents and frames start (global numbering), from the manifest alone
        self._shard_docs = np.cumsum([0] + [int(s["docs"]) for s in m["shards"]]).tolist()
        self._shard_frames = np.cumsum([0] + [int(s["frames"]) for s in m["shards"]]).tolist()
        if self._shard_docs[-1] != m["num_docs"]:
            raise ShardError(f"{mpath}: says {m['num_docs']} documents, its shards list {self._shard_docs[-1]}")
        self._n = int(m["num_docs"])
        self.lazy = bool(lazy)
        self.index_cache = max(1, int(index_cache))
        self._indexes: OrderedDict[int, _Index] = OrderedDict()  # lazy: shard -> its index, least recent first
        self._fds: dict[int, int] = {}  # shard -> file descriptor, opened on first read (pread: no shared offset)
        self._dctx = zstandard.ZstdDecompressor()
        self._cache: dict[int, tuple[np.ndarray, bytes]] = {}  # frame -> (tokens, raw payload), insertion order
        self._slot_cache: OrderedDict[int, np.ndarray] = OrderedDict()  # frame -> latent slots before each token
        self.cache_frames = max(1, int(cache_frames))
        if not self.lazy:
            self._all = self._load_indexes()
            self._frames, self._mv = self._all.frames, self._all.mv
        else:
            self.get = self._get_lazy

    # indexes -------------------------------------------------------------------------------------------------------
    def _read_index(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Shard k's (documents, frames), numbered globally, after checking the index's sha256 and the shard's size."""
        s = self.manifest["shards"][k]
        ipath, spath = self.folder / s["index"], self.folder / s["file"]
        first_doc = self._shard_docs[k]
        try:
            raw = ipath.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{ipath}: index file missing") from None
        if hashlib.sha256(raw).hexdigest() != s["index_sha256"]:
            raise ShardError(f"{ipath}: index checksum mismatch (corrupt or replaced)")
        buf = io.BytesIO(zstandard.ZstdDecompressor().decompress(raw))
        d, f = np.load(buf, allow_pickle=False), np.load(buf, allow_pickle=False)
        try:
            size = spath.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"{spath}: shard file missing (documents {first_doc}-{first_doc + len(d) - 1})") from None
        if size != s["bytes"]:
            end = f["offset"] + f["csize"]
            bad = int(f["first_doc"][np.argmax(end > size)]) + first_doc if (end > size).any() else first_doc
            raise ShardError(f"{spath}: truncated or changed size ({size} bytes, manifest says {s['bytes']}): "
                             f"document {bad} onwards cannot be read")
        if len(d) != s["docs"] or len(f) != s["frames"]:
            raise ShardError(f"{ipath}: holds {len(d)} documents in {len(f)} frames, the manifest says "
                             f"{s['docs']} in {s['frames']}")
        d, f = d.copy(), f.copy()
        d["frame"] += self._shard_frames[k]  # frame numbers become global over shards
        f["first_doc"] += first_doc
        return d, f

    def _load_indexes(self) -> _Index:
        parts = [self._read_index(k) for k in range(len(self.manifest["shards"]))]
        docs = np.concatenate([d for d, _ in parts]) if parts else np.empty(0, DOC_DTYPE)
        frames = np.concatenate([f for _, f in parts]) if parts else np.empty(0, FRAME_DTYPE)
        frame_shard = np.repeat(np.arange(len(parts)), [len(f) for _, f in parts]).astype(np.int64)
        return _Index(docs, frames, frame_shard, 0, 0)

    def _shard_index(self, k: int) -> _Index:
        idx = self._indexes.get(k)
        if idx is None:  # first in, first out (as frames): the loader reads window by window
            d, f = self._read_index(k)
            idx = self._indexes[k] = _Index(d, f, np.full(len(f), k, np.int64), self._shard_docs[k],
                                            self._shard_frames[k])
            if len(self._indexes) > self.index_cache:
                del self._indexes[next(iter(self._indexes))]
        return idx

    def _index_of_doc(self, i: int) -> _Index:
        return self._all if not self.lazy else self._shard_index(bisect.bisect_right(self._shard_docs, i) - 1)

    def _index_of_frame(self, frame: int) -> _Index:
        return self._all if not self.lazy else self._shard_index(bisect.bisect_right(self._shard_frames, frame) - 1)

    def plan_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document lengths, caption lengths, frames) of every document, uint32: what a sample plan is built from
        (lazy mode: one pass over the indexes, nothing kept)."""
        if not self.lazy:
            return self._all.length, self._all.caption, self._all.frame
        out = [np.empty(self._n, np.uint32) for _ in range(3)]
        for k in range(len(self.manifest["shards"])):
            d, _ = self._read_index(k)
            a, b = self._shard_docs[k], self._shard_docs[k + 1]
            out[0][a:b], out[1][a:b], out[2][a:b] = d["length"], d["caption"], d["frame"]
        return out[0], out[1], out[2]

    # sizes ---------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def doc_lengths(self) -> np.ndarray:
        return self.plan_arrays()[0]

    @property
    def caption_lengths(self) -> np.ndarray:
        """Per document: tokens caption dropout may remove (see ``caption_length``)."""
        return self.plan_arrays()[1]

    @property
    def doc_frames(self) -> np.ndarray:
        """Per document: its frame (global over shards); the loader shuffles frame-locally with it."""
        return self.plan_arrays()[2]

    @property
    def num_frames(self) -> int:
        return self._shard_frames[-1]

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    def caption_of(self, i: int) -> int:
        """Document ``i``'s caption length (what caption dropout removes)."""
        idx = self._index_of_doc(i)
        return int(idx.caption[i - idx.first_doc])

    def length_of(self, i: int) -> int:
        """Document ``i``'s length in tokens (from the index: no frame is read)."""
        idx = self._index_of_doc(i)
        return int(idx.length[i - idx.first_doc])

    def index_bytes(self) -> int:
        """Bytes of index this reader holds now (the loader's resident-memory accounting)."""
        held = [self._all] if not self.lazy else list(self._indexes.values())
        return sum(x.nbytes for x in held)

    # reading -------------------------------------------------------------------------------------------------------
    def _where(self, shard: int, doc: int) -> str:
        return f"{self.folder / self.manifest['shards'][shard]['file']}: document {doc}"

    def _frame(self, frame: int, doc: int):
        idx = self._index_of_frame(frame)
        local = frame - idx.first_frame
        fr = idx.frames[local]
        csize, size = int(fr["csize"]), int(fr["size"])
        shard = int(idx.frame_shard[local])
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = self._fds[shard] = os.open(self.folder / self.manifest["shards"][shard]["file"], os.O_RDONLY)
            except FileNotFoundError:
                raise ShardError(f"{self._where(shard, doc)}: shard file missing") from None
        blob = os.pread(fd, csize, int(fr["offset"]))
        if len(blob) != csize:
            raise ShardError(f"{self._where(shard, doc)}: truncated shard (frame {frame} wants {csize} bytes at "
                             f"{int(fr['offset'])}, got {len(blob)})")
        if zlib.crc32(blob) != int(fr["crc"]):
            raise ShardError(f"{self._where(shard, doc)}: corrupt shard (crc32 mismatch in frame {frame})")
        try:
            raw = self._dctx.decompress(blob, max_output_size=size)
        except zstandard.ZstdError as e:
            raise ShardError(f"{self._where(shard, doc)}: corrupt shard (frame {frame}: {e})") from None
        if len(raw) != size:
            raise ShardError(f"{self._where(shard, doc)}: corrupt shard (frame {frame} is {len(raw)} bytes, "
                             f"index says {size})")
        tokens = np.frombuffer(raw, self.dtype, idx.frame_tokens[local])
        entry = (tokens, raw)
        self._cache[frame] = entry
        if len(self._cache) > self.cache_frames:  # first in, first out: the loader's order is window-local, so
            del self._cache[next(iter(self._cache))]  # recency bookkeeping on every hit would buy nothing
        return entry

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Document ``i``: (tokens [T] in the token dtype, read-only; loss mask uint8 [T] or None)."""
        if not 0 <= i < self._n:
            raise IndexError(f"{self.folder}: document {i} out of range (0..{self._n - 1})")
        frames, offsets, lengths, masks = self._mv
        frame = frames[i]
        hit = self._cache.get(frame)
        tokens, raw = hit if hit is not None else self._frame(frame, i)
        off, n, m = offsets[i], lengths[i], masks[i]
        mask = None if m == NO_MASK else np.unpackbits(np.frombuffer(raw, np.uint8, (n + 7) // 8, m), count=n)
        return tokens[off:off + n], mask

    def _get_lazy(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``get`` in lazy mode (bound over it at open, so that the eager path pays no test for it)."""
        if not 0 <= i < self._n:
            raise IndexError(f"{self.folder}: document {i} out of range (0..{self._n - 1})")
        k = bisect.bisect_right(self._shard_docs, i) - 1
        idx = self._indexes.get(k) or self._shard_index(k)
        frames, offsets, lengths, masks = idx.mv
        j = i - idx.first_doc
        frame = frames[j]
        hit = self._cache.get(frame)
        tokens, raw = hit if hit is not None else self._frame(frame, i)
        off, n, m = offsets[j], lengths[j], masks[j]
        mask = None if m == NO_MASK else np.unpackbits(np.frombuffer(raw, np.uint8, (n + 7) // 8, m), count=n)
        return tokens[off:off + n], mask

    def __getitem__(self, i: int):
        return self.get(i)

    def latents(self, i: int) -> np.ndarray:
        """Continuous images: document ``i``'s latents, float16 [its latent slots, latent_channels] (read-only)."""
        if not self.vocab.continuous:
            raise ShardError(f"{self.folder}: images are discrete codes (no latents)")
        tokens, _ = self.get(i)  # the frame is now cached
        k = bisect.bisect_right(self._shard_docs, i) - 1
        idx = self._all if not self.lazy else (self._indexes.get(k) or self._shard_index(k))
        frames, offsets, _, _ = idx.mv
        j = i - idx.first_doc
        frame, off = frames[j], offsets[j]
        frame_tokens, raw = self._cache.get(frame) or self._frame(frame, i)
        before = self._slots_before(frame, frame_tokens)
        c, first = self.vocab.latent_channels, int(before[off])
        n = int(before[off + len(tokens)]) - first
        start = frame_tokens.nbytes + first * c * 2
        return np.frombuffer(raw, "<f2", n * c, start).reshape(n, c)

    def _slots_before(self, frame: int, frame_tokens: np.ndarray) -> np.ndarray:
        """[frame tokens + 1]: latent slots before each token position of a frame (cached with the last few)."""
        cache = self._slot_cache
        hit = cache.get(frame)
        if hit is None:
            hit = cache[frame] = np.concatenate([[0], np.cumsum(frame_tokens == self.vocab.slot_id)])
            if len(cache) > self.cache_frames:
                cache.popitem(last=False)
        return hit

    def image_token_counts(self) -> np.ndarray:
        """Per document, how many of its tokens are image codes (uint32): one pass over every frame, vectorised
        per frame (what modality balancing plans with; the index does not store it)."""
        out = np.zeros(self._n, np.uint32)
        lo, hi = self.vocab.image_start, self.vocab.image_end
        for frame in range(self.num_frames):
            idx = self._index_of_frame(frame)
            fr = idx.frames[frame - idx.first_frame]
            a = int(fr["first_doc"])
            b = a + int(fr["docs"])
            tokens, _ = self._frame(frame, a)
            is_image = ((tokens >= lo) & (tokens < hi)).astype(np.uint32)
            starts = np.asarray(idx.offset[a - idx.first_doc:b - idx.first_doc], np.int64)
            out[a:b] = np.add.reduceat(is_image, starts) if len(is_image) else 0  # documents are never empty
            self._cache.pop(frame, None)  # a pass over everything: keep no frame
        return out

    # checking ------------------------------------------------------------------------------------------------------
    def verify(self, deep: bool = False) -> dict:
        """Whole-file sha256 of every shard and index against the manifest; ``deep`` also decodes every frame."""
        for s in self.manifest["shards"]:
            for key, name in (("sha256", s["file"]), ("index_sha256", s["index"])):
                path = self.folder / name
                if not path.exists():
                    raise ShardError(f"{path}: missing")
                if _sha256(path) != s[key]:
                    raise ShardError(f"{path}: sha256 mismatch (corrupt or replaced)")
        if deep:
            for frame in range(self.num_frames):
                self._cache.pop(frame, None)
                idx = self._index_of_frame(frame)
                self._frame(frame, int(idx.frames[frame - idx.first_frame]["first_doc"]))
        return {"shards": len(self.manifest["shards"]), "docs": len(self), "tokens": self.num_tokens, "deep": deep}

    def close(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)
        self._fds = {}
        getattr(self, "_cache", {}).clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"ShardDataset({self.folder}, docs={len(self)}, tokens={self.num_tokens})"


__all__ = ["ShardWriter", "ShardDataset", "ShardError", "VocabMismatchError", "write_dataset", "caption_length",
           "check_seq_len", "seq_len_that_fits", "token_summary", "tokens_per_doc"]
