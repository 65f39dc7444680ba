"""Every file of a checkpoint recorded when it is saved (size and crc32, in ``megannm.json``) and checked before it is
loaded.

Without the record, a flipped byte inside a tensor loads silently (``torch.load`` checks no checksum), and a
truncated file fails deep inside the zip reader without naming it ("failed finding central directory"). With it,
either is one line naming the file. crc32 (libdeflate's where the system has it, ~8 GB/s on one core; zlib's otherwise,
~2-4 GB/s: the same values) catches truncation and bit rot; it is no defence against deliberate tampering. The work splits over ranks: ``share`` gives each rank its part of a list.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import zlib
from pathlib import Path
from typing import Iterable, Optional

from megannm.checkpoint.names import META

_BLOCK = 1 << 22


def _load_libdeflate():
    """libdeflate's ``libdeflate_crc32(crc, buf, len)`` (the gzip/zlib CRC-32, PCLMUL-accelerated) through ctypes,
    or None where the library is absent. ctypes releases the GIL during the call, so checksums run in threads."""
    for name in (ctypes.util.find_library("deflate"), "libdeflate.so.0", "libdeflate.so"):
        if not name:
            continue
        try:
            fn = ctypes.CDLL(name).libdeflate_crc32
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return fn
    return None


_LIBDEFLATE = _load_libdeflate()
FAST_CRC32 = _LIBDEFLATE is not None  # a checksum thread keeps up with a copy (~8 GB/s, zlib's ~2-3 here)


def crc32_update(data, value: int = 0) -> int:
    """zlib's crc32 of ``data`` continuing from ``value``: ``bytes``, or a contiguous uint8 CPU tensor (a view of a
    mapped file, usually; read in place)."""
    tensor = hasattr(data, "data_ptr")
    n = data.numel() if tensor else len(data)
    if not n:
        return value
    if _LIBDEFLATE is not None:
        return _LIBDEFLATE(value, data.data_ptr() if tensor else data, n)
    return zlib.crc32(data.numpy() if tensor else data, value)


def crc32(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            c = crc32_update(block, c)
    return c


def top_files(folder: str | Path) -> list[str]:
    """The regular files directly inside ``folder`` (DeepSpeed writes its files flat into the tag), sorted."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file())


def share(names: Iterable[str], rank: int, world: int) -> list[str]:
    """This rank's part of ``names``: every rank computes the same split from the same sorted list."""
    return sorted(names)[rank::world]


def record(folder: str | Path, names: Iterable[str]) -> dict[str, dict]:
    """{name: {"bytes": size, "crc32": checksum}} of files inside ``folder`` (names relative to it)."""
    folder = Path(folder)
    return {n: {"bytes": (folder / n).stat().st_size, "crc32": crc32(folder / n)} for n in names}


def check(folder: str | Path, files: dict[str, dict], names: Iterable[str]) -> Optional[str]:
    """The first of ``names`` that differs from its record in ``files``, as one line naming it; None if all agree."""
    folder = Path(folder)
    for n in names:
        path, want = folder / n, files[n]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path}: missing (listed in {folder / META})"
        if size != want["bytes"]:
            return f"{path}: truncated or changed ({size} bytes, {META} recorded {want['bytes']})"
        got = crc32(path)
        if got != want["crc32"]:
            return f"{path}: corrupt (crc32 {got:08x}, {META} recorded {want['crc32']:08x})"
    return None


def verify(folder: str | Path, meta: dict) -> None:
    """Every recorded file of a checkpoint folder, in this one process (offline readers: ``megannm convert``, a
    checkpoint opened for sampling); a checkpoint saved without records passes unchecked."""
    from megannm.checkpoint.folders import CorruptCheckpoint
    files = meta.get("files") or {}
    problem = check(folder, files, sorted(files))
    if problem:
        raise CorruptCheckpoint(problem)
