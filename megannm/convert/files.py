"""What every converter shares: the error type, sizes, and safetensors folders.

Every output folder is built with ``megannm.fileio.atomic_output`` (a hidden temporary folder beside the destination,
renamed into place at the end): an interrupted conversion leaves no half-written folder under the real name, and an
existing destination is replaced only with ``overwrite``.

Conversions stream: a state is a ``LazyState`` (every tensor's shape and dtype known up front, each tensor read,
joined or cast only when asked for), and ``save_safetensors`` lays out the headers from the shapes, then writes the
tensors one at a time with our own writer of the format (``write_safetensors_file``), the next few prepared in
threads meanwhile. Inputs are mapped (``filebytes.MappedFile``) and outputs written at their offsets
(``filebytes.OutputFile``): a tensor that lies contiguously in an input file is copied file to file by the kernel,
TP shards are written from where they lie without being joined, and only casts go through memory.

A safetensors folder is Hugging Face's layout: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``) once the tensors
exceed ``max_shard_size`` bytes.
"""
from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from megannm.checkpoint import CheckpointError
from megannm.convert.filebytes import PAGE, Cat, MappedFile, OutputFile, source_residue
from megannm.fileio import atomic_write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 2 ** 30  # Hugging Face's default: 5 GB per file
THREADS = min(4, os.cpu_count() or 1)  # tensors prepared ahead of the one being written (--threads)


class ConvertError(CheckpointError):
    """A conversion that cannot proceed; the message is one line naming the file and the parameter at fault."""


def parse_size(text: str | int) -> int:
    """``"500MB"``, ``"5GB"``, ``"1GiB"``, ``"123"`` -> bytes (decimal units as Hugging Face's ``max_shard_size``)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ConvertError(f"--max-shard-size: not a size (got {text!r}, expected e.g. 500MB or 5GB)")
    number, unit = float(m.group(1)), m.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
             "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}[unit]
    return int(number * scale)


# ---------------------------------------------------------------------------------------------------------------------
# lazy states


class LazyState(Mapping):
    """name -> tensor, each read (or merged from its TP shards, or cast) only when asked for and never kept: what a
    conversion streams through. ``specs`` gives every (shape, dtype) up front, so that writers can lay out their
    files before reading anything."""

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], get: Callable[[str], torch.Tensor],
                 checks: list | None = None, rows: Callable[[str], list[torch.Tensor]] | None = None,
                 keep: list | None = None):
        self.specs = {k: (tuple(shape), dtype) for k, (shape, dtype) in specs.items()}
        self._get = get
        self._rows = rows
        self.checks = list(checks or [])  # futures of the source files' integrity checks, running meanwhile
        self.keep = list(keep or [])  # the mapped source files, held so that writers copy from them file to file

    def row_blocks(self, name: str) -> list:
        """The tensor as blocks of rows that, stacked along dim 0, are it (a writer writes them one after the
        other): TP shards are never joined in memory (shards split along dim 1 come as one ``filebytes.Cat``).
        Default: the tensor itself."""
        return self._rows(name) if self._rows is not None else [self[name]]

    def verify(self) -> None:
        """Wait for the source files' integrity checks; raises the first problem (one line naming the file). Every
        writer calls it before its output is renamed into place, so a corrupt source never yields an output."""
        for check in self.checks:
            check.result()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name) -> bool:
        return name in self.specs


def row_blocks(state: Mapping, name: str) -> list[torch.Tensor]:
    """``LazyState.row_blocks`` of a state that may be lazy."""
    return state.row_blocks(name) if isinstance(state, LazyState) else [state[name]]


def verify(state: Mapping) -> None:
    """``LazyState.verify`` of a state that may be lazy (a plain dict has nothing pending)."""
    if isinstance(state, LazyState):
        state.verify()


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of a state, lazy or not, without reading a lazy one."""
    if isinstance(state, LazyState):
        return dict(state.specs)
    return {k: (tuple(t.shape), t.dtype) for k, t in state.items()}


# ---------------------------------------------------------------------------------------------------------------------
# safetensors folders


def shard_plan(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
               max_shard_size: int = DEFAULT_SHARD_SIZE) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each safetensors file for tensors of these (shape, dtype), in their order: a new
    file starts where the next tensor would pass ``max_shard_size`` bytes (Hugging Face's rule)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = tensor_bytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(files, shards))


def save_safetensors(folder: Path, tensors: Mapping[str, torch.Tensor], max_shard_size: int = DEFAULT_SHARD_SIZE,
                     metadata: dict | None = None, specs: Mapping[str, tuple] | None = None,
                     dtype: torch.dtype | None = None, threads: int = 1) -> list[str]:
    """Write ``tensors`` (in their order) as one file or as shards plus an index, ONE TENSOR AT A TIME; returns the
    file names.

    ``tensors`` may be lazy (a mapping that reads or merges a tensor when it is asked for): the headers are built
    from ``specs`` (name -> (shape, dtype), default: each tensor's own), so no tensor is touched before its turn,
    and with ``threads`` > 1 the next tensors are prepared while one is written (at most ``threads + 1`` in
    memory). ``dtype`` casts floating-point tensors on the way out."""
    if specs is None:
        specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    specs = {k: (tuple(shape), _out_dtype(dt, dtype)) for k, (shape, dt) in specs.items()}
    plan = shard_plan(specs, max_shard_size)
    meta = {"format": "pt", **(metadata or {})}
    mode = _umask_mode()

    def produce(name: str) -> list[torch.Tensor]:
        want = specs[name][1]
        return [t.to(want) if t.dtype != want else t for t in row_blocks(tensors, name)]

    with Prefetch(produce, [k for _, names in plan for k in names], threads) as ready:
        for file, names in plan:
            write_safetensors_file(folder / file, {k: specs[k] for k in names}, ready, meta)
            os.chmod(folder / file, mode)  # as open() would create it: an export is read by others
    if len(plan) > 1:
        atomic_write_json(folder / INDEX, {"metadata": {"total_size": sum(tensor_bytes(*s) for s in specs.values())},
                                           "weight_map": {k: f for f, names in plan for k in names}})
    return [f for f, _ in plan]


def write_safetensors_file(path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], next_tensor,
                           metadata: dict | None = None) -> None:
    """One safetensors file written tensor by tensor from its format: an 8-byte little-endian header length, a JSON
    header (per tensor its dtype, shape and byte range ``data_offsets`` relative to the end of the header, plus
    ``__metadata__``; padded with spaces to a multiple of 8 so that every tensor is aligned), then the raw
    little-endian bytes in header order. ``next_tensor(name)`` gives each tensor in turn, as a tensor or as blocks
    of its rows (``LazyState.row_blocks``); shape and dtype must be the header's. Each block is written at its
    offset by ``filebytes.OutputFile`` (file to file where it lies in a mapped input), to a temporary name beside
    ``path`` that is renamed at the end. The header's padding puts the first tensor at its source's offset modulo
    the page size (``filebytes.source_residue``): a file laid out like its source (the same tensors in the same
    order) is then copied page-aligned throughout."""
    header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        n = tensor_bytes(shape, dtype)
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    early = {name: next_tensor(name) for name in list(specs)[:1]}  # the first tensor, for the header's padding
    residue = source_residue(next(iter(early.values()))) if early else None
    if residue is not None and residue % 8 == 0:
        raw += b" " * ((residue - 8 - len(raw)) % PAGE)
    with OutputFile(path, 8 + len(raw) + offset) as f:
        f.write_bytes(struct.pack("<Q", len(raw)) + raw)
        for name, (shape, dtype) in specs.items():
            blocks = early.pop(name) if name in early else next_tensor(name)
            blocks = [blocks] if isinstance(blocks, (torch.Tensor, Cat)) else blocks
            rows = sum(b.shape[0] for b in blocks) if shape else None
            if any(b.dtype != dtype or tuple(b.shape[1:]) != tuple(shape[1:]) or b.dim() != len(shape)
                   for b in blocks) or (shape and rows != shape[0]) or (not shape and len(blocks) != 1):
                got = [list(b.shape) for b in blocks]
                raise ConvertError(f"{path}: parameter {name} came as {got} {blocks[0].dtype}, the header "
                                   f"says {list(shape)} {dtype}")
            for b in blocks:
                f.write_tensor(b)
            del blocks
        f.close()


class Prefetch:
    """``produce(name)`` for each name in order, up to ``threads`` of them ahead of the consumer, in a thread pool
    (reading, merging and casting release the GIL). ``self(name)`` returns the next one and must be called in
    order; with ``threads`` <= 1 everything runs in the caller's thread.

    Producing a view of a mapped file takes microseconds, and handing it over from a thread costs more than that
    (a wake-up per tensor, behind whatever else holds the cores): while tensors come cheaper than ``INLINE_S``,
    they are produced in the caller's thread; one that takes longer brings the pool back for the next ones."""

    INLINE_S = 0.001

    def __init__(self, produce, names: list[str], threads: int):
        self.produce, self.names, self.threads = produce, list(names), max(0, int(threads))
        self.pending: list = []
        self.i = 0
        self.inline = self.threads <= 1

    def __enter__(self):
        if self.threads > 1:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="megannm-convert")
            self._fill()
        return self

    def _timed(self, name: str):
        start = time.perf_counter()
        return self.produce(name), time.perf_counter() - start

    def _fill(self) -> None:
        while (not self.inline and len(self.pending) < self.threads
               and self.i + len(self.pending) < len(self.names)):
            name = self.names[self.i + len(self.pending)]
            self.pending.append((name, self.pool.submit(self._timed, name)))

    def __call__(self, name: str) -> torch.Tensor:
        if self.threads <= 1:
            return self.produce(name)
        want = self.pending[0][0] if self.pending else self.names[self.i]
        if want != name:
            raise RuntimeError(f"tensors asked out of order: {name} (expected {want})")
        if self.pending:
            t, seconds = self.pending.pop(0)[1].result()
        else:
            t, seconds = self._timed(name)
        self.i += 1
        self.inline = seconds < self.INLINE_S
        self._fill()
        return t

    def __exit__(self, *exc):
        if self.threads > 1:
            for _, f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)
        return False


def _out_dtype(dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    return cast if cast is not None and dtype.is_floating_point else dtype


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _umask_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (read without changing it for good)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def weight_map(folder: str | Path) -> dict[str, str]:
    """name -> file of a safetensors folder (single file or index)."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        try:
            index = json.loads((folder / INDEX).read_text())
            return dict(index["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise ConvertError(f"{folder / INDEX}: not a safetensors index ({type(e).__name__}: {e})") from None
    if (folder / SINGLE).exists():
        from safetensors import safe_open
        with safe_open(str(folder / SINGLE), "pt") as f:
            return {k: SINGLE for k in f.keys()}
    raise ConvertError(f"{folder}: no {SINGLE} and no {INDEX}")


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of one safetensors file, from its header alone."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: (tuple(v["shape"]), _DTYPES[v["dtype"]]) for k, v in header.items() if k != "__metadata__"}


def mapped_tensors(path: Path, keep: list | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a private memory map (``filebytes.MappedFile``): nothing
    is read until used, and a writer copies them file to file (``keep`` receives the mapping, for whoever should
    hold it while the tensors are used)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    mapped = MappedFile(path)
    if keep is not None:
        keep.append(mapped)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        start, stop = info["data_offsets"]
        if 8 + n + stop > mapped.size or stop - start != tensor_bytes(shape, dtype):
            raise ConvertError(f"{path}: parameter {name}: its byte range {start}-{stop} does not fit the file or "
                               f"its shape {list(shape)}")
        out[name] = mapped.tensor(8 + n + start, dtype, shape)
    return out


class SafetensorsReader:
    """Read tensors (or slices of them) from a safetensors folder, one open file at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self._open: dict[str, object] = {}
        self._mapped: dict[str, dict] = {}
        self.keep: list = []  # the files' mappings (filebytes.MappedFile), while their tensors are in use
        self._headers: dict[str, dict] = {}
        self._lock = threading.Lock()  # conversions read tensors from several threads

    def keys(self) -> list[str]:
        return list(self.map)

    def _handle(self, name: str):
        with self._lock:
            return self._handle_locked(name)

    def _handle_locked(self, name: str):
        from safetensors import safe_open
        file = self.map.get(name)
        if file is None:
            raise ConvertError(f"{self.folder}: missing parameter {name}")
        if file not in self._open:
            path = self.folder / file
            if not path.exists():
                raise ConvertError(f"{path}: missing file (the index names it for {name})")
            self._open[file] = safe_open(str(path), "pt")
        return self._open[file], file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.spec(name)[0]

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the file's header; no tensor is read."""
        _, file = self._handle(name)
        with self._lock:
            if file not in self._headers:
                self._headers[file] = read_header(self.folder / file)
        try:
            return self._headers[file][name]
        except KeyError:
            raise ConvertError(f"{self.folder / file}: missing parameter {name} (the index names this file)") \
                from None

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, memory-mapped (see ``mapped_tensors``)."""
        _, file = self._handle(name)
        with self._lock:
            if file not in self._mapped:
                self._mapped[file] = mapped_tensors(self.folder / file, self.keep)
        try:
            return self._mapped[file][name]
        except KeyError:  # the index names a file that does not hold the key
            raise ConvertError(f"{self.folder / file}: missing parameter {name} (the index names this file)") \
                from None

    def get_rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, stop - start)`` without reading the rest of the tensor."""
        f, _ = self._handle(name)
        s = f.get_slice(name)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return s[index]

    def close(self) -> None:
        self._open.clear()
        self._mapped.clear()
        self.keep.clear()
        self._headers.clear()
