"""What every converter shares: the error type, sizes, and safetensors folders.

Every output folder is built with ``megannm.fileio.atomic_output`` (a hidden temporary folder beside the destination,
renamed into place at the end): an interrupted conversion leaves no half-written folder under the real name, and an
existing destination is replaced only with ``overwrite``.

A safetensors folder is Hugging Face's layout: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``) once the tensors
exceed ``max_shard_size`` bytes.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from pathlib import Path
from typing import Mapping

import torch

from megannm.checkpoint import CheckpointError
from megannm.fileio import atomic_write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 2 ** 30  # Hugging Face's default: 5 GB per file


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
# safetensors folders


def save_safetensors(folder: Path, tensors: Mapping[str, torch.Tensor], max_shard_size: int = DEFAULT_SHARD_SIZE,
                     metadata: dict | None = None) -> list[str]:
    """Write ``tensors`` (in their order) as one file or as shards plus an index; returns the file names."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    meta = {"format": "pt", **(metadata or {})}
    mode = _umask_mode()
    for file, names in zip(files, shards):
        save_file({k: _own(tensors[k]) for k in names}, str(folder / file), metadata=meta)
        os.chmod(folder / file, mode)  # safetensors creates its files 0600; an export is read by others
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(folder / INDEX, {"metadata": {"total_size": total},
                                           "weight_map": {k: f for f, names in zip(files, shards) for k in names}})
    return files


def _umask_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (read without changing it for good)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its bytes (safetensors refuses views into a larger or shared storage)."""
    t = t.detach().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


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


def mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file as a view of a private memory map: nothing is read until used, and a
    conversion that only writes the tensors elsewhere streams them from the page cache (no copy in memory)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: writable tensors, file untouched
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        start, stop = info["data_offsets"]
        count = (stop - start) // torch.tensor([], dtype=dtype).element_size()
        out[name] = (torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start).view(shape) if count
                     else torch.empty(shape, dtype=dtype))
    return out


class SafetensorsReader:
    """Read tensors (or slices of them) from a safetensors folder, one open file at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self._open: dict[str, object] = {}
        self._mapped: dict[str, dict] = {}

    def keys(self) -> list[str]:
        return list(self.map)

    def _handle(self, name: str):
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
        f, _ = self._handle(name)
        return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor, memory-mapped (see ``mapped_tensors``)."""
        _, file = self._handle(name)
        if file not in self._mapped:
            self._mapped[file] = mapped_tensors(self.folder / file)
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
