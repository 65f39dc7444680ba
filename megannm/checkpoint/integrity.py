"""Every file of a checkpoint recorded when it is saved (size and crc32, in ``megannm.json``) and checked before it is
loaded.

Without the record, a flipped byte inside a tensor loads silently (``torch.load`` checks no checksum), and a
truncated file fails deep inside the zip reader without naming it ("failed finding central directory"). With it,
either is one line naming the file. crc32 (``zlib.crc32`` over 4 MiB blocks) catches truncation and bit rot; it is no
defence against deliberate tampering. The work splits over ranks: ``share`` gives each rank its part of a list.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable, Optional

from megannm.checkpoint.names import META

_BLOCK = 1 << 22


def crc32(path: Path) -> int:
    c = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            c = zlib.crc32(block, c)
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


def verify(folder: str | Path, meta: dict, names: Optional[Iterable[str]] = None) -> None:
    """The recorded files of a checkpoint folder (``names``, default all of them) in this one process (offline
    readers: ``megannm convert``, a checkpoint opened for sampling); a file saved without a record passes
    unchecked."""
    from megannm.checkpoint.folders import CorruptCheckpoint
    files = meta.get("files") or {}
    problem = check(folder, files, sorted(n for n in (files if names is None else names) if n in files))
    if problem:
        raise CorruptCheckpoint(problem)
