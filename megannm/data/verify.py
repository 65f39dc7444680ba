"""A recipe's data checked before training starts, so that a bad shard stops the run in its first seconds, not hours
in, and every message names the recipe key, the shard and the document.

Always (every rank, from the manifests alone): each ``data.train`` / ``data.valid`` folder exists, is a data set
written by ``megannm preprocess``, holds documents, and was tokenised with the run's vocabulary. Then, by
``data.verify``:

    index  every shard file present with its recorded size, every index file matching its sha256
    full   every shard's and index's sha256 (``ShardDataset.verify``); on a mismatch, the first corrupt document
    none   nothing more (the reader still checks each frame's crc32 when it reads it)
    auto   full when each rank's share of the shard bytes is at most ``FULL_AUTO_BYTES``, else index

The work is one unit per shard, split over all ranks by bytes (largest first, to the least loaded rank): every rank
computes the same split and reads about 1/world of the data. This module knows ranks only as numbers; the Trainer
agrees on the first failing unit with one all-reduce.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from megannm.data.shards import ShardDataset, ShardError, check_seq_len

# Measured on this project's 2-core machine: hashlib's sha256 at 1.4 GB/s on one quiet core; ShardDataset.verify of
# 256 MiB of shards from the page cache at 0.38 GB/s with the machine loaded 4x over. A 2 GiB share is then 1.5 s
# to 6 s per rank at start-up, plus reading it from storage; above that, the default checks the indexes only.
FULL_AUTO_BYTES = 2 * 2 ** 30
_BLOCK = 1 << 22


def datasets(data) -> list[tuple[str, Path]]:
    """(recipe key, folder) of every data set a recipe's ``data`` names, training sets first."""
    return ([(f"data.train[{i}].path", Path(r.path)) for i, r in enumerate(data.train)]
            + [(f"data.valid[{i}].path", Path(r.path)) for i, r in enumerate(data.valid)])


def read_manifest(key: str, folder: Path, source: str) -> dict:
    """The manifest of a data set folder; a folder that is missing or not a data set is one line naming the key."""
    where = f"{source}: {key}: {folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"{where}: no such data set folder" if not folder.exists() else
                                f"{where}: not a folder (a data set is the folder `megannm preprocess` writes)")
    path = folder / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{where}: not a data set folder (no manifest.json; written by `megannm preprocess`)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{source}: {key}: {path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{source}: {key}: {path}: not a data set manifest (no list of shards)")
    return manifest


def check_manifests(data, vocab, source: str) -> list[tuple[str, Path, dict]]:
    """(key, folder, manifest) of every data set, each refused with one line when it is empty or was tokenised with
    another vocabulary than the run's (``data.vocab``, or the first data set's vocab.json)."""
    sets = datasets(data)
    theirs = f"data.vocab {data.vocab}" if data.vocab else (f"{sets[0][0]} {sets[0][1] / 'vocab.json'}" if sets
                                                              else "the run's vocabulary")
    out, seen = [], set()
    for key, folder in sets:
        m = read_manifest(key, folder, source)
        if not m.get("num_docs"):
            raise ShardError(f"{source}: {key}: {folder}: the data set holds no documents (did `megannm preprocess` "
                             f"get inputs without records?)")
        if m.get("vocab_fingerprint") != vocab.fingerprint:
            raise ShardError(f"{source}: {key}: {folder / 'manifest.json'}: vocabulary fingerprint "
                             f"{m.get('vocab_fingerprint')} differs from {theirs} ({vocab.fingerprint}): the token "
                             f"ids mean different things (preprocess the data with that vocabulary's tokenizers)")
        check_seq_len(m, data.seq_len, f"{source}: {key}: {folder / 'manifest.json'}")  # images fit a sample
        if folder.resolve() not in seen:  # one folder named twice (train and valid) is checked once
            seen.add(folder.resolve())
            out.append((key, folder, m))
    return out


@dataclass(frozen=True)
class Unit:
    """One shard of one data set: the unit of verification work."""
    key: str  # the recipe key of its data set
    folder: Path
    shard: dict  # its entry in the manifest
    first_doc: int  # its first document's index in the data set

    @property
    def path(self) -> Path:
        return self.folder / self.shard["file"]

    def cost(self, mode: str) -> int:
        return int(self.shard.get("index_bytes", 0)) + (int(self.shard.get("bytes", 0)) if mode == "full" else 0)


def work_units(found: list[tuple[str, Path, dict]], mode: str, world: int) -> tuple[list[Unit], str]:
    """Every shard as a unit of work, and the mode ``auto`` stands for at this world size."""
    units = []
    for key, folder, m in found:
        first = 0
        for s in m["shards"]:
            units.append(Unit(key, folder, s, first))
            first += int(s.get("docs", 0))
    if mode == "auto":
        total = sum(int(u.shard.get("bytes", 0)) for u in units)
        mode = "full" if total <= FULL_AUTO_BYTES * max(world, 1) else "index"
    return ([] if mode == "none" else units), mode


def split(units: list[Unit], mode: str, world: int) -> list[list[int]]:
    """Unit indexes per rank: largest first, each to the least loaded rank (ties: the lowest). Deterministic."""
    load, parts = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(units)), key=lambda i: -units[i].cost(mode)):
        r = min(range(world), key=lambda r: (load[r], r))
        parts[r].append(i)
        load[r] += units[i].cost(mode)
    return [sorted(p) for p in parts]


def first_problem(units: list[Unit], mode: str, rank: int, world: int) -> Optional[tuple[int, str]]:
    """(unit index, message) of the first unit of this rank's share that fails, or None."""
    for i in split(units, mode, world)[rank]:
        try:
            problem = check_unit(units[i], mode)
        except OSError as e:  # unreadable (permissions, I/O): as much a bad shard as a wrong checksum
            problem = f"{e.filename or units[i].path}: cannot be read ({e.strerror})"
        if problem:
            return i, problem
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


class _OneShard:
    """What ``ShardDataset.verify`` reads of a data set (its folder, manifest shards, sizes), narrowed to one shard,
    so that ranks can share a data set's shards without every rank opening every index."""

    def __init__(self, unit: Unit):
        self.folder, self.manifest = unit.folder, {"shards": [unit.shard]}
        self.num_tokens = int(unit.shard.get("tokens", 0))
        self._docs = int(unit.shard.get("docs", 0))

    def __len__(self) -> int:
        return self._docs


def check_unit(unit: Unit, mode: str) -> Optional[str]:
    """One line naming the shard (and the first corrupt document) if the unit fails ``mode``'s check, else None."""
    s = unit.shard
    if mode == "full":
        try:
            ShardDataset.verify(_OneShard(unit))
        except ShardError as e:
            return _first_bad_document(unit) or str(e)
        return None
    index = unit.folder / s["index"]
    try:
        size = unit.path.stat().st_size
    except FileNotFoundError:
        return f"{unit.path}: shard file missing"
    if size != s["bytes"]:
        return f"{unit.path}: truncated or changed size ({size} bytes, the manifest says {s['bytes']})"
    if not index.is_file():
        return f"{index}: index file missing"
    if _sha256(index) != s["index_sha256"]:
        return f"{index}: index checksum mismatch (corrupt or replaced)"
    return None


def _first_bad_document(unit: Unit) -> Optional[str]:
    """After a checksum mismatch: read the shard frame by frame (each has its own crc32) to name the first document
    that cannot be read; None when every frame reads (the mismatch is elsewhere, e.g. in the index)."""
    try:
        ds = ShardDataset(unit.folder, cache_frames=1)
    except ShardError as e:
        return str(e)
    try:
        docs = np.arange(unit.first_doc, unit.first_doc + int(unit.shard.get("docs", 0)))
        frames = ds.doc_frames[docs].astype(np.int64)
        for doc in docs[np.flatnonzero(np.diff(frames, prepend=-1))]:  # the first document of each frame
            try:
                ds.get(int(doc))
            except ShardError as e:
                held = docs[frames == frames[doc - unit.first_doc]]
                return f"{e}: documents {held[0]}-{held[-1]} unreadable (sha256 differs from the manifest)"
        return None
    finally:
        ds.close()
