"""Outputs that appear whole or not at all: the one place megannm writes files and folders atomically.

Every file megannm writes for a user (reports, manifests, pointers, tokenizer files, exports, checkpoint files)
goes to a temporary name beside its destination and is renamed over it (``atomic_file`` for writers that take a
path), so a crash, a full disk or Ctrl-C leaves either the old file or the new one, never a half-written one.
Folders are built the same way (``atomic_output``), in hidden siblings named for their owner process and host
(``temp_name``): a run killed half-way leaves one behind, and the next run into the same folder removes it
(``reclaim_stale``) once that process is gone.

This module sits below everything else (it imports nothing from megannm).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_file", "atomic_write", "atomic_write_json", "atomic_output", "fsync_dir", "temp_name",
           "reclaim_stale", "scratch_folder", "WriteError", "write_error"]


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


class WriteError(OSError):
    """An output that could not be written (a full disk, an I/O error, a folder this user may not write to): one
    line naming the output, why and the free space there; nothing of it is left. ``exit_code``: 1 for the machine's
    fault, 2 for a folder the user may not write to."""
    exit_code = 1


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def write_error(dst: Union[str, Path], error: OSError, what: str = "output", removed: str = "") -> WriteError:
    """The one line for ``error`` met while writing ``what`` into ``dst`` (whose temporary folder, ``removed``, is
    already gone)."""
    dst = Path(dst)
    try:
        free = f"{_human(shutil.disk_usage(dst.parent).free)} free there"
    except OSError:
        free = "free space unknown"
    why = os.strerror(error.errno) if error.errno else str(error)
    e = WriteError(f"{dst}: cannot write the {what}: {why} ({free}); nothing was written"
                   f"{f' (removed {removed})' if removed else ''}")
    e.exit_code = 2 if isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EROFS) else 1
    return e


TEMP_TAGS = ("tmp", "old", "build")  # the temporary siblings of an output folder: being built, moved aside, staging


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def temp_name(dst: Union[str, Path], tag: str = "tmp") -> Path:
    """The hidden sibling ``.<name>.<tag>-<pid>@<host>`` of ``dst`` that this process builds (or moves aside) it in:
    the owner's process id and host name are in the name, so that the next run can tell a killed run's litter
    (``reclaim_stale``) from a run still writing, even on a file system that several nodes share."""
    dst = Path(dst)
    return dst.with_name(f".{dst.name}.{tag}-{os.getpid()}@{_host()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def reclaim_stale(dst: Union[str, Path]) -> list[Path]:
    """Remove the temporary siblings of ``dst`` (``temp_name``'s, and the older ``.<name>.tmp-<pid>``) whose owner
    process is dead on this host: what a killed ``preprocess`` or ``tokenizers build`` left. A sibling of a live
    process, or of another host (whose processes this one cannot see), is left alone. Returns what was removed."""
    dst = Path(dst)
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(?:{'|'.join(TEMP_TAGS)})-(\d+)(?:@(.+))?$")
    removed = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:  # no parent folder yet: nothing to reclaim
        return removed
    here = _host()
    for path in siblings:
        m = pattern.match(path.name)
        if m is None or (m.group(2) is not None and m.group(2) != here) or _alive(int(m.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                path.unlink()
            except OSError:
                continue
        removed.append(path)
    return removed


@contextmanager
def scratch_folder(dst: Union[str, Path], tag: str = "build") -> Iterator[Path]:
    """A hidden working folder beside ``dst`` (``temp_name(dst, tag)``), removed when the block ends, however it
    ends; the litter of killed runs into the same ``dst`` is reclaimed first."""
    reclaim_stale(dst)
    tmp = temp_name(dst, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_output(dst: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it becomes ``dst``, on any exception it is removed.

    An existing ``dst`` is refused unless ``overwrite``; then it is moved aside, the new folder renamed into place,
    and the old one deleted."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    reclaim_stale(dst)  # what killed runs into the same folder left
    tmp = temp_name(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = temp_name(dst, "old")
    if dst.exists():  # (only with overwrite) moved aside, and deleted once the new output is in place
        dst.rename(old)
    os.replace(tmp, dst)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()
