"""Outputs that appear whole or not at all: the one place megannm writes files and folders atomically.

Every file megannm writes for a user (reports, manifests, pointers, tokenizer files, exports, checkpoint files)
goes to a temporary name beside its destination and is renamed over it (``atomic_file`` for writers that take a
path), so a crash, a full disk or Ctrl-C leaves either the old file or the new one, never a half-written one.
Folders are built the same way (``atomic_output``).

This module sits below everything else (it imports nothing from megannm).
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_file", "atomic_write", "atomic_write_json", "atomic_output", "fsync_dir"]


def fsync_dir(folder: Union[str, Path]) -> None:
    """Make a rename inside ``folder`` durable (best effort: some file systems refuse to open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Union[str, Path], fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` for a writer that takes a path (``torch.save``, safetensors'
    ``save_file``); on success it is renamed over ``path`` with the mode ``open()`` gives a new file (some writers
    create theirs 0600: an export is read by others), on any exception removed. With ``fsync`` the content and the
    rename are flushed to disk first."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        umask = os.umask(0o022)  # read without changing it for good
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: Union[str, Path], data: Union[str, bytes], fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``; with ``fsync`` the
    content and the rename are flushed to disk first (for pointers such as a checkpoint's ``latest``)."""
    with atomic_file(path, fsync) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
    return Path(path)


def atomic_write_json(path: Union[str, Path], obj, fsync: bool = False, indent: int = 2, **dumps) -> Path:
    """``atomic_write`` of ``obj`` as indented JSON with a final newline."""
    return atomic_write(path, json.dumps(obj, indent=indent, **dumps) + "\n", fsync=fsync)


@contextmanager
def atomic_output(dst: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it becomes ``dst``, on any exception it is removed.

    An existing ``dst`` is refused unless ``overwrite``; then it is moved aside, the new folder renamed into place,
    and the old one deleted."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():  # (only with overwrite) moved aside, and deleted once the new output is in place
        dst.rename(old)
    os.replace(tmp, dst)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
