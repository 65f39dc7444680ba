"""Epoch indexes: each data set's per-epoch order and packing, built once, written as .npy files, memory-mapped.

The epoch index of one data set (how the loader's global order uses it: ``loader.py``) is two arrays:

    pieces  [P]      (doc u4, start u4, length u4, drop u1): the epoch's document pieces, in order
    bounds  [S + 1]  int64: sample s of the epoch is pieces ``bounds[s]:bounds[s + 1]``

``build_epoch`` computes it from the data set's document lengths, caption lengths and frames (``packing.py``'s
pure functions: a pure function of the ``EpochSpec`` and the epoch). A ``EpochStore`` keeps the epochs of one data
set either in memory (``folder=None``) or in a cache folder named by a hash of everything that determines them::

    <plan_dir>/<data set name>-<key>/plan.json                what the key hashes (checked on open)
    <plan_dir>/<data set name>-<key>/epoch-00000/pieces.npy   the arrays, read with np.load(mmap_mode="r")
                                               /bounds.npy
                                               /meta.json     sizes, crc32 of every MiB of each array, counts

An epoch folder appears whole or not at all (``fileio.atomic_output``), so a crash mid-build leaves nothing that
looks complete. The first process that needs an epoch builds it under an exclusive lock on the cache folder, and
every other process (every other rank, on this node or on any node sharing the folder) waits on the lock and then
maps what it wrote: an epoch is built once per file system, not once per rank. A truncated or unreadable epoch is
rebuilt when opened; a flipped byte is caught by the crc32 of its MiB block the first time a reader touches it,
and refused with the file named. Resident memory of a reader is the pages it touches, not the plan's size.

``megannm sample-order RECIPE.yaml [key=value ...]`` builds a recipe's epoch indexes before training.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megannm.data import packing
from megannm.fileio import atomic_output, atomic_write_json

VERSION = 1
PIECE_DTYPE = np.dtype([("doc", "<u4"), ("start", "<u4"), ("length", "<u4"), ("drop", "u1")])
BLOCK = 1 << 20  # bytes per crc32: a reader checks a MiB the first time it touches it (~0.1 ms)
_PURPOSE_ORDER, _PURPOSE_CAPTION = 0, 1


class EpochError(ValueError):
    """A sample plan that cannot be used; one line naming the file at fault."""


def data_fingerprint(manifest: dict) -> str:
    """A data set's identity for plan keys: the checksums of its shards and indexes and its vocabulary (so a
    rewritten data set never reuses an old plan, and a copied or moved one does)."""
    ident = [manifest.get("vocab_fingerprint"), manifest.get("num_docs"),
             [(s["sha256"], s["index_sha256"], s["docs"]) for s in manifest["shards"]]]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class EpochSpec:
    """Everything an epoch plan of one data set depends on (besides the epoch)."""
    data: str  # data_fingerprint of its manifest
    stream: int  # its position in the blend (the random streams are keyed by it)
    seed: int
    seq_len: int
    pack: bool = True
    caption_dropout: float = 0.0
    shuffle: bool = True
    window_frames: int = 16

    def key(self) -> str:
        return hashlib.sha256(json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True).encode()
                              ).hexdigest()[:20]


def build_epoch(spec: EpochSpec, lengths: np.ndarray, captions: np.ndarray, frames: np.ndarray, num_frames: int,
                epoch: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Epoch ``epoch``'s (pieces, bounds, info) from the data set's per-document arrays.

    The order: a seeded frame-local permutation (``packing.frame_local_order``), caption dropout decided per
    document, documents longer than a sample cut into pieces, pieces packed greedily into samples of ``seq_len + 1``
    tokens (``pack=False``: one document per sample, truncated). ``info`` counts truncated documents."""
    n = len(lengths)
    if spec.shuffle:
        order = packing.frame_local_order(frames, num_frames,
                                          packing.rng_for(spec.seed, spec.stream, epoch, _PURPOSE_ORDER),
                                          spec.window_frames)
    else:
        order = np.arange(n)
    drop = packing.caption_drops(captions, spec.caption_dropout,
                                 packing.rng_for(spec.seed, spec.stream, epoch, _PURPOSE_CAPTION))[order]
    doc_len = lengths[order].astype(np.int64) - np.where(drop, captions[order], 0)
    cap = spec.seq_len + 1
    info = {"truncated": 0, "longest": int(doc_len.max()) if n else 0}
    if spec.pack:
        pos, start, length = packing.split_pieces(doc_len, spec.seq_len)
        bounds = packing.pack_next_fit(length, cap)
    else:  # one document per sample, truncated to the sample length
        pos, start, length = np.arange(n), np.zeros(n, np.int64), np.minimum(doc_len, cap)
        info["truncated"] = int((doc_len > cap).sum())
        bounds = np.arange(n + 1, dtype=np.int64)
    pieces = np.empty(len(pos), PIECE_DTYPE)
    pieces["doc"], pieces["start"], pieces["length"], pieces["drop"] = order[pos], start, length, drop[pos]
    return pieces, bounds.astype(np.int64), info


# ---------------------------------------------------------------------------------------------------------------------
# one epoch, in memory or memory-mapped


class _Checked:
    """A memory-mapped array whose MiB blocks are crc32-checked the first time they are read."""

    def __init__(self, array: np.ndarray, crcs: list[int], path: Path):
        # a plain ndarray view of the map: np.memmap's Python-level __getitem__ costs ~1 us a slice
        array = array.view(np.ndarray) if isinstance(array, np.memmap) else array
        self.array, self.crcs, self.path = array, crcs, path
        self._raw = array.view(np.uint8) if array.size else np.zeros(0, np.uint8)
        self._ok = np.zeros(len(crcs), bool)

    def take(self, a: int, b: int) -> np.ndarray:
        size = self.array.itemsize
        if b > a:
            for blk in range(a * size // BLOCK, ((b * size) - 1) // BLOCK + 1):
                if not self._ok[blk]:
                    if zlib.crc32(self._raw[blk * BLOCK:(blk + 1) * BLOCK]) != self.crcs[blk]:
                        raise EpochError(f"{self.path}: corrupt sample plan (crc32 mismatch in MiB {blk}); delete "
                                        f"{self.path.parent} to rebuild it")
                    self._ok[blk] = True
        return self.array[a:b]

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """``array[idx]`` after checking every block it touches."""
        idx = np.asarray(idx, np.int64)
        for blk in np.unique(idx * self.array.itemsize // BLOCK).tolist():
            a = blk * BLOCK // self.array.itemsize
            self.take(a, a + 1)
        return self.array[idx]


def _crcs(a: np.ndarray) -> list[int]:
    raw = np.ascontiguousarray(a).view(np.uint8) if a.size else np.zeros(0, np.uint8)
    return [zlib.crc32(raw[i:i + BLOCK]) for i in range(0, len(raw), BLOCK)]


class EpochPlan:
    """One epoch of one data set: ``sample(j)`` gives sample j's pieces as (doc, drop, start, length) tuples."""

    def __init__(self, pieces, bounds, info: dict):
        self._pieces = pieces if isinstance(pieces, _Checked) else None
        self._bounds = bounds if isinstance(bounds, _Checked) else None
        self.pieces = pieces.array if isinstance(pieces, _Checked) else pieces
        self.bounds = bounds.array if isinstance(bounds, _Checked) else bounds
        self.info = info

    @property
    def num_samples(self) -> int:
        return len(self.bounds) - 1

    # the columns, for inspection and tests (a memory-mapped plan maps them, it does not copy them)
    @property
    def doc(self) -> np.ndarray:
        return self.pieces["doc"]

    @property
    def drop(self) -> np.ndarray:
        return self.pieces["drop"].astype(bool)

    @property
    def start(self) -> np.ndarray:
        return self.pieces["start"]

    @property
    def length(self) -> np.ndarray:
        return self.pieces["length"]

    def _rows(self, a: int, b: int) -> np.ndarray:
        return self._pieces.take(a, b) if self._pieces is not None else self.pieces[a:b]

    def sample(self, j: int) -> list[tuple[int, bool, int, int]]:
        """Sample j's pieces as (doc, drop, start, length) tuples."""
        a0, a1 = (self._bounds.take(j, j + 2) if self._bounds is not None else self.bounds[j:j + 2]).tolist()
        rows = self._rows(a0, a1)
        return [(d, bool(x), s, n) for d, s, n, x in zip(rows["doc"].tolist(), rows["start"].tolist(),
                                                          rows["length"].tolist(), rows["drop"].tolist())]


# ---------------------------------------------------------------------------------------------------------------------
# the store of one data set's epochs


@contextlib.contextmanager
def _locked(folder: Path):
    """An exclusive lock on ``folder`` (flock on a file inside it): one builder at a time, others wait. Where the
    file system refuses locks, every process builds; the results are identical and renamed into place, so that is
    only slower, never wrong."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class EpochStore:
    """The epoch plans of one data set (``ds``: a ``ShardDataset``) for one ``EpochSpec``.

    ``folder=None`` keeps them in memory (built in this process, the last three kept); otherwise they live in
    ``folder/<name>-<key>/`` as described in the module docstring."""

    def __init__(self, spec: EpochSpec, ds, folder: Optional[Path] = None):
        self.spec, self.ds = spec, ds
        self.dir = None if folder is None else Path(folder) / f"{ds.folder.name}-{spec.key()}"
        self._open_plans: OrderedDict[int, EpochPlan] = OrderedDict()
        self._arrays = None  # the data set's per-document arrays while building (dropped afterwards)
        self.built: list[int] = []  # epochs this process built (the rest it found ready)
        self._checked = False  # plan.json read and found to describe this spec

    def _epoch_dir(self, e: int) -> Path:
        return self.dir / f"epoch-{e:05d}"

    def _check_marker(self) -> None:
        """The folder's plan.json must describe this spec (a hash collision, or a hand-edited file, is refused)."""
        marker = self.dir / "plan.json"
        try:
            have = json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return  # none yet (or unreadable: rewritten by the next build)
        have.pop("data_set", None)
        if have != {"version": VERSION, **asdict(self.spec)}:
            raise EpochError(f"{marker}: describes another plan than its key (hash collision or an edited file); "
                            f"delete {self.dir}")
        self._checked = True

    def _prepare_dir(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise EpochError(f"{self.dir}: cannot create the sample plan folder ({e.strerror}); set data.plan_dir "
                            f"to a writable folder") from None
        self._check_marker()
        if not self._checked:
            atomic_write_json(self.dir / "plan.json",
                              {"version": VERSION, "data_set": str(self.ds.folder), **asdict(self.spec)})
            self._checked = True

    def _load(self, e: int) -> Optional[EpochPlan]:
        """The cached epoch, or None when it is missing or damaged (a damaged one is removed, to be rebuilt)."""
        folder = self._epoch_dir(e)
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            arrays = {}
            for name in ("pieces", "bounds"):
                path = folder / f"{name}.npy"
                a = np.load(path, mmap_mode="r", allow_pickle=False)
                want = PIECE_DTYPE if name == "pieces" else np.dtype("<i8")
                if a.shape != (meta[name]["len"],) or a.dtype != want:
                    raise ValueError(f"{path.name} holds {a.shape} {a.dtype}, expected ({meta[name]['len']},) "
                                     f"{want}")
                arrays[name] = _Checked(a, meta[name]["crc32"], path)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            warnings.warn(f"{folder}: damaged sample plan ({str(err).splitlines()[0]}): rebuilding it",
                          stacklevel=3)
            _remove_tree(folder)
            return None
        return EpochPlan(arrays["pieces"], arrays["bounds"], meta["info"])

    def _build(self, e: int) -> tuple[np.ndarray, np.ndarray, dict]:
        if self._arrays is None:
            lengths, captions, frames = self.ds.plan_arrays()
            self._arrays = (lengths, captions, frames, self.ds.num_frames)
        t = time.perf_counter()
        pieces, bounds, info = build_epoch(self.spec, *self._arrays, e)
        info["build_seconds"] = round(time.perf_counter() - t, 3)
        self.built.append(e)
        return pieces, bounds, info

    def _write(self, e: int, pieces: np.ndarray, bounds: np.ndarray, info: dict) -> None:
        with atomic_output(self._epoch_dir(e), overwrite=True) as tmp:
            meta = {"epoch": e, "num_samples": len(bounds) - 1, "info": info}
            for name, a in (("pieces", pieces), ("bounds", bounds)):
                np.save(tmp / f"{name}.npy", a, allow_pickle=False)
                meta[name] = {"len": len(a), "dtype": a.dtype.str, "crc32": _crcs(a)}
            atomic_write_json(tmp / "meta.json", meta)

    def epoch(self, e: int) -> EpochPlan:
        """Epoch ``e``'s plan: mapped from the cache, or built (under the lock) and then mapped."""
        hit = self._open_plans.get(e)
        if hit is not None:
            self._open_plans.move_to_end(e)
            return hit
        if self.dir is None:
            plan = EpochPlan(*self._build(e))
            self._arrays = None
        else:
            if not self._checked:
                self._check_marker()
            plan = self._load(e)
            if plan is None:
                self.ensure([e])
                plan = self._load(e)
                if plan is None:
                    raise EpochError(f"{self._epoch_dir(e)}: sample plan missing right after it was built")
        self._open_plans[e] = plan
        if len(self._open_plans) > 3:
            self._open_plans.popitem(last=False)
        return plan

    def ensure(self, epochs) -> None:
        """Build the missing ones of ``epochs`` (a cache folder only): under the lock, re-checking each one, since
        another process may have built it while this one waited."""
        if self.dir is None:
            return
        self._prepare_dir()
        with _locked(self.dir):
            try:
                for e in epochs:
                    if self._load(e) is None:
                        self._write(e, *self._build(e))
            finally:
                self._arrays = None  # the whole-data-set arrays are only needed while building


def image_token_counts(ds, folder: Optional[Path] = None):
    """Per document of ``ds``, its image tokens (what modality balancing weighs samples by), as a ``_Checked``
    array: counted in one pass over the data set (``ShardDataset.image_token_counts``) and, with a cache folder,
    written once beside the plans (``<name>-<data fingerprint>-images/``) and memory-mapped afterwards."""
    if folder is None:
        counts = ds.image_token_counts()
        return _Checked(counts, _crcs(counts), ds.folder)
    out = Path(folder) / f"{ds.folder.name}-{data_fingerprint(ds.manifest)}-images"
    out.parent.mkdir(parents=True, exist_ok=True)

    def load():
        try:
            meta = json.loads((out / "meta.json").read_text())
            a = np.load(out / "counts.npy", mmap_mode="r", allow_pickle=False)
            if a.shape != (len(ds),) or a.dtype != np.uint32:
                raise ValueError(f"counts.npy holds {a.shape} {a.dtype}, expected ({len(ds)},) uint32")
            return _Checked(a, meta["crc32"], out / "counts.npy")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            warnings.warn(f"{out}: damaged image-token counts ({str(err).splitlines()[0]}): rebuilding them",
                          stacklevel=3)
            _remove_tree(out)
            return None

    got = load()
    if got is None:
        with _locked(out.parent):
            got = load()
            if got is None:
                counts = ds.image_token_counts()
                with atomic_output(out, overwrite=True) as tmp:
                    np.save(tmp / "counts.npy", counts, allow_pickle=False)
                    atomic_write_json(tmp / "meta.json", {"docs": len(counts), "crc32": _crcs(counts)})
                got = load()
    return got


def _remove_tree(folder: Path) -> None:
    import shutil
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
    try:
        folder.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)

