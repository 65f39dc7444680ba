"""Tensor bytes from file to file with as few copies as the kernel allows: why a conversion runs at copy speed.

A conversion mostly moves bytes. A tensor of a DeepSpeed file (a torch zip record, stored uncompressed), of a
safetensors file (a byte range), or a contiguous part of one (a TP shard split along dim 0, a fused weight's q/k/v
rows) lies in its source file exactly as it must lie in the output. So inputs are mapped whole (``MappedFile``: one
private, read-only-in-practice mapping per file, registered by address, so that any tensor viewing it can be traced
back to (file, offset): ``extent``), and outputs are written at positions the writer laid out first
(``OutputFile``):

- a contiguous view of a mapped file goes with ``os.splice`` through a 1 MiB pipe from the source's descriptor
  (page cache to page cache inside the kernel: one copy, nothing through user space; ``os.copy_file_range`` where
  splice is refused, which does the same through the kernel's 16-page pipe, measured ~5% slower on page-aligned
  ranges and ~20% on unaligned ones);
- a strided view (a dim-1 TP slice) or a ``Cat`` along dim 1 (TP shards whose rows interleave) goes as its rows'
  bytes gathered into a reused staging buffer of ``_STAGE_BYTES`` (numpy's copy, one thread) and one ``os.pwrite``
  per buffer;
- anything computed (a cast, padding) goes with ``os.pwrite`` of its bytes.

The kernel's copy costs more CPU when source and destination offsets differ modulo the page size (each destination
page is filled from two source pages: ~25% through copy_file_range, ~8% through the larger pipe), so writers place
tensors where they can at the source's offset modulo ``PAGE`` (``source_residue``): the safetensors writer pads its
header for the first tensor, the torch zip writer pads each record.

Checksums (``crc32``) are the checkpoint layer's (``megannm.checkpoint.integrity``: libdeflate's when the system
has it, same values as zlib's at ~8 GB/s against ~2-3 here; zlib's otherwise). ``OutputFile`` checksums what it has
written in a thread that follows the writes, so a file's crc32 is ready almost as soon as its last byte is written.

Everything here is file I/O, so it is the CPU's by nature: a tensor on another device is written through its bytes
copied to the host (``pwrite``), never traced to a file.
"""
from __future__ import annotations

import errno
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy
import torch

try:
    import fcntl
except ImportError:  # not a POSIX system: no splice either
    fcntl = None

from megannm.checkpoint import integrity

PAGE = 4096  # the alignment of source and destination offsets that the kernel's copy is cheapest at
_CRC_CHUNK = 32 << 20  # bytes an output's checksum thread takes at a time, behind the writes
_MAX_WRITE = 1 << 30  # one syscall's bytes at most (Linux caps a write near 2 GiB)
_STAGE_BYTES = 512 << 10  # output rows assembled at a time for a dim-1 slice or merge (well inside a core's L2)


# ---------------------------------------------------------------------------------------------------------------------
# crc32


def crc32(data: torch.Tensor, value: int = 0) -> int:
    """zlib's crc32 of a contiguous uint8 CPU tensor (a view of a mapped file, usually), continuing from ``value``:
    the checkpoint layer's checksum (libdeflate's where the system has it), read in place."""
    return integrity.crc32_update(data, value)


FAST_CRC32 = integrity.FAST_CRC32


# ---------------------------------------------------------------------------------------------------------------------
# mapped inputs


_MAPPED: "weakref.WeakValueDictionary[int, MappedFile]" = weakref.WeakValueDictionary()
_MAPPED_LOCK = threading.Lock()


class MappedFile:
    """A whole file mapped privately (copy-on-write, as ``torch.load(mmap=True)`` maps: the file never changes), its
    bytes as ``self.bytes`` (uint8), registered by address so that ``extent`` finds which file and offset a view of
    it comes from. Whoever holds tensors that writers should trace (a lazy state) holds this object too: the registry
    keeps it only weakly, and a tensor whose file is no longer registered is simply written from memory.

    Its tensors are inputs, read-only by contract: a writer copies the FILE's bytes for a view of it, so a view
    changed in place in memory would be written as the file has it (no conversion here writes into its inputs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.size = os.path.getsize(self.path)
        storage = (torch.UntypedStorage.from_file(str(self.path), False, self.size) if self.size
                   else torch.UntypedStorage(0))
        self.bytes = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (self.size,), (1,))
        self.base = self.bytes.data_ptr()
        self._fd: Optional[int] = None
        self._fd_lock = threading.Lock()
        if self.size:
            with _MAPPED_LOCK:
                _MAPPED[self.base] = self

    def tensor(self, offset: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The tensor of ``dtype`` and ``shape`` whose bytes start at ``offset`` (a view: nothing is read)."""
        n = 1
        for d in shape:
            n *= int(d)
        size = torch.empty((), dtype=dtype).element_size()
        if not n:
            return torch.empty(tuple(shape), dtype=dtype)
        raw = self.bytes[offset:offset + n * size]
        if offset % size:  # unaligned (no writer of ours makes this): a copy, never a wrong view
            raw = raw.clone()
        return raw.view(dtype).view(tuple(shape))

    def fileno(self) -> int:
        """A read-only descriptor of the file (opened once, closed with this object): the source of
        ``copy_file_range``."""
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
                weakref.finalize(self, os.close, self._fd)
            return self._fd


def extent(t: torch.Tensor) -> Optional[tuple[MappedFile, int]]:
    """(mapped file, byte offset) of a contiguous CPU tensor whose bytes are a range of a registered mapped file;
    None for anything else (computed tensors, strided views, other devices)."""
    if t.device.type != "cpu" or not t.numel() or not t.is_contiguous():
        return None
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    with _MAPPED_LOCK:
        files = list(_MAPPED.values())
    for m in files:
        if m.base <= ptr and ptr + n <= m.base + m.size:
            return m, ptr - m.base
    return None


def source_residue(blocks) -> Optional[int]:
    """The offset modulo ``PAGE`` at which the first of ``blocks`` (a tensor, a ``Cat`` or a list of them) lies in
    its mapped source file; None when it is not a range of one (then no placement is cheaper than another)."""
    first = blocks[0] if isinstance(blocks, (list, tuple)) and blocks else blocks
    if isinstance(first, Cat):
        first = first.parts[0] if first.axis == 0 else None
    where = extent(first) if isinstance(first, torch.Tensor) else None
    return None if where is None else where[1] % PAGE


class Cat:
    """``torch.cat(parts, dim)`` not yet made: what a writer writes without joining it in memory (along dim 1 the
    parts' rows interleave: ``OutputFile`` gathers them a staging buffer at a time). Has the shape, dtype
    and ``to`` that writers check and cast with; ``join()`` makes the tensor for anyone else."""

    def __init__(self, parts: Sequence[torch.Tensor], dim: int):
        self.parts, self.axis = list(parts), dim
        first = self.parts[0]
        shape = list(first.shape)
        shape[dim] = sum(p.shape[dim] for p in self.parts)
        self.shape, self.dtype, self.device = torch.Size(shape), first.dtype, first.device

    def dim(self) -> int:  # the tensor API writers use
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def to(self, dtype: torch.dtype) -> "Cat":
        return self if dtype == self.dtype else Cat([p.to(dtype) for p in self.parts], self.axis)

    def join(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.axis)


# ---------------------------------------------------------------------------------------------------------------------
# positioned outputs


_CHECKSUMMER: Optional[ThreadPoolExecutor] = None
_COPY_FILE_RANGE = hasattr(os, "copy_file_range")
_SPLICE = hasattr(os, "splice") and fcntl is not None
_PIPE_BYTES = 1 << 20  # the pipe ``splice`` copies through (Linux's default /proc/sys/fs/pipe-max-size)
_REFUSED = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)  # a file system without the call


def _checksummer() -> ThreadPoolExecutor:
    """One thread for every output's checksum: its jobs for one file run in the order they were given."""
    global _CHECKSUMMER
    if _CHECKSUMMER is None:
        _CHECKSUMMER = ThreadPoolExecutor(1, thread_name_prefix="megannm-crc32")
    return _CHECKSUMMER


class OutputFile:
    """A file of a size known up front, written front to back at explicit positions (``pwrite``, ``splice``,
    ``copy_file_range``: no shared file position, no buffering), to a temporary name beside ``path``; ``close()``
    checks that every byte was written and renames it into place, ``abort()`` (or an exception inside ``with``)
    removes it. With ``checksum``, a thread computes the crc32 of what is written behind the writes (``self.crc32``
    after ``close()``). With ``exact=False``, ``size`` is an upper bound and the file ends where the writes did."""

    def __init__(self, path: str | Path, size: int, checksum: bool = False, exact: bool = True):
        self.path, self.size, self.exact = Path(path), int(size), exact
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # mode as open() gives it
        self.pos = 0
        self.crc32: Optional[int] = 0 if checksum else None
        self._checked = 0
        self._jobs: list = []
        self._view: Optional[torch.Tensor] = None
        self._pending: Optional[list] = None  # a kernel copy held to merge with the next (see _copy_range)
        self._pipe: Optional[tuple] = None  # (read end, write end, capacity): see _kernel_copy
        self._stage: Optional[numpy.ndarray] = None  # the reused buffer of _write_rows
        try:
            os.ftruncate(self.fd, self.size)  # every byte not written is zero (a hole): padding costs nothing
        except BaseException:
            self.abort()
            raise

    # -- writing, front to back

    def write_bytes(self, data) -> None:
        """``data`` (bytes-like) at the current position."""
        self._flush()
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:done + _MAX_WRITE], self.pos + done)
        self._advance(len(view))

    def write_tensor(self, t) -> None:
        """A tensor's bytes (row-major) at the current position, by the cheapest way its storage allows (see the
        module's docstring); a ``Cat`` without joining it."""
        if isinstance(t, Cat):
            self._write_cat(t)
            return
        if not t.numel():
            return
        where = extent(t)
        if where is not None:
            self._copy_range(where[0], where[1], t.numel() * t.element_size())
            return
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_contiguous():
            self.write_bytes(_as_bytes(t))
        elif t.dim() == 2 and t.stride(1) == 1:
            self._write_rows([t])
        else:
            self.write_bytes(_as_bytes(t.contiguous()))

    def _write_cat(self, c: Cat) -> None:
        if c.axis == 0 or len(c.parts) == 1:
            for p in c.parts:
                self.write_tensor(p)
            return
        parts = [p.detach() if p.device.type == "cpu" else p.detach().cpu() for p in c.parts]
        if len(c.shape) == 2 and c.axis == 1:
            self._write_rows(parts)
        else:
            self.write_bytes(_as_bytes(torch.cat([p.contiguous() for p in parts], dim=c.axis)))

    def _write_rows(self, blocks: list[torch.Tensor]) -> None:
        """2-D tensors of equal rows side by side (output row i = every block's row i, in order), ``_STAGE_BYTES``
        of output rows at a time: each block's rows copied as bytes into one reused staging buffer, which goes with
        one ``pwrite``. Measured against ``pwritev`` of one piece per row straight from the mapped pages (the kernel
        faults those pages in one at a time, from a copy that fails and is retried, plus a Python object per row):
        1.3-1.6x faster. The copy is numpy's (one thread): torch's runs on its OpenMP threads, which with
        OMP_NUM_THREADS=2 on a loaded 2-core machine made it 20-50x slower."""
        self._flush()
        blocks = [_byte_rows(b) for b in blocks]
        rows = blocks[0].shape[0]
        width = sum(b.shape[1] for b in blocks)
        if not rows or not width:
            return
        per = max(1, min(rows, _STAGE_BYTES // width))
        if self._stage is None or self._stage.size < per * width:
            self._stage = numpy.empty(per * width, dtype=numpy.uint8)
        for start in range(0, rows, per):
            n = min(per, rows - start)
            chunk = self._stage[:n * width].reshape(n, width)
            col = 0
            for b in blocks:
                numpy.copyto(chunk[:, col:col + b.shape[1]], b[start:start + n])
                col += b.shape[1]
            view = memoryview(chunk).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], self.pos + done)
            self._advance(len(view))

    def _copy_range(self, src: MappedFile, offset: int, nbytes: int) -> None:
        """``nbytes`` of ``src`` from ``offset``, to be copied by the kernel: held until the next write, so that
        ranges that follow each other in both files (a file laid out like its source) go as ONE copy (each call
        costs the kernel about as much as copying a few hundred KB)."""
        pending = self._pending
        if pending is not None and pending[0] is src and pending[1] + pending[3] == offset:
            pending[3] += nbytes
        else:
            self._flush()
            self._pending = [src, offset, self.pos, nbytes]
        self._advance(nbytes)

    def _flush(self) -> None:
        """The held kernel copy (``_kernel_copy``; from the mapped pages where the file system refuses both ways:
        another file system, an old kernel)."""
        if self._pending is None:
            return
        src, offset, at, nbytes = self._pending
        done = self._kernel_copy(src, offset, at, nbytes) if (_SPLICE or _COPY_FILE_RANGE) else 0
        if done < nbytes:
            mv = memoryview(src.bytes[offset + done:offset + nbytes].numpy())
            written = 0
            while written < len(mv):
                written += os.pwrite(self.fd, mv[written:written + _MAX_WRITE], at + done + written)
        self._pending = None
        self._check_behind()

    def _kernel_copy(self, src: MappedFile, offset: int, at: int, nbytes: int) -> int:
        """``nbytes`` of ``src`` from ``offset`` to this file at ``at`` inside the kernel; returns how many were
        copied (fewer only where the file system takes neither way: the caller writes the rest).

        ``splice`` through this file's own pipe of ``_PIPE_BYTES`` (file -> pipe takes page references, pipe -> file
        copies them into the output's page cache) where the kernel has it, else ``copy_file_range``. Both copy the
        same bytes once; ``copy_file_range`` (and ``sendfile``, what ``shutil.copyfile`` uses) splice through the
        kernel's 16-page internal pipe, and each of its rounds costs about as much again when the two offsets differ
        modulo the page size: measured here, a 1 MiB pipe copies page-aligned ranges ~5% and unaligned ones ~20%
        faster."""
        global _SPLICE, _COPY_FILE_RANGE
        fd, done = src.fileno(), 0
        if _SPLICE:
            try:
                r, w, room = self._splice_pipe()
                while done < nbytes:
                    got = os.splice(fd, w, min(nbytes - done, room), offset_src=offset + done)
                    if got <= 0:
                        raise OSError(errno.EIO, f"{src.path}: ends before byte {offset + nbytes}")
                    put = 0
                    while put < got:
                        put += os.splice(r, self.fd, got - put, offset_dst=at + done + put)
                    done += got
                return done
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                _SPLICE = False  # (bytes left in the pipe go with it: ``done`` counts only what reached the file)
                self._close_pipe()
        if _COPY_FILE_RANGE:
            try:
                while done < nbytes:
                    n = os.copy_file_range(fd, self.fd, min(nbytes - done, _MAX_WRITE), offset + done, at + done)
                    if n <= 0:
                        raise OSError(errno.EIO, f"{src.path}: ends before byte {offset + nbytes}")
                    done += n
            except OSError as e:
                if e.errno not in _REFUSED:
                    raise
                _COPY_FILE_RANGE = False
        return done

    def _splice_pipe(self) -> tuple[int, int, int]:
        """(read end, write end, capacity) of this file's pipe for ``splice``, made on first use."""
        if self._pipe is None:
            r, w = os.pipe()
            room = PAGE * 16  # a pipe's default capacity
            try:
                room = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_BYTES) if hasattr(fcntl, "F_SETPIPE_SZ") else room
            except OSError:  # above /proc/sys/fs/pipe-max-size, or the user's pipe pages exhausted
                pass
            self._pipe = (r, w, room)
        return self._pipe

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe[0])
            os.close(self._pipe[1])
            self._pipe = None

    # -- the checksum behind the writes

    def _advance(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos > self.size:
            raise ValueError(f"{self.path}: {self.pos} bytes written, the file was laid out for {self.size}")
        self._check_behind()

    def _written(self) -> int:
        """Where the bytes really in the file end (a held copy is not yet)."""
        return self.pos - (self._pending[3] if self._pending is not None else 0)

    def _check_behind(self) -> None:
        if self.crc32 is not None and self._written() - self._checked >= _CRC_CHUNK:
            self._submit_crc(self._written())

    def _submit_crc(self, stop: int) -> None:
        stop = min(stop, self._written())
        if stop <= self._checked:
            return
        if self._view is None:
            storage = torch.UntypedStorage.from_file(str(self.tmp), True, self.size)
            self._view = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (self.size,), (1,))
        start, self._checked = self._checked, stop
        self._jobs.append(_checksummer().submit(self._crc_job, start, stop))

    def _crc_job(self, start: int, stop: int) -> None:
        self.crc32 = crc32(self._view[start:stop], self.crc32)

    # -- the end

    def close(self) -> Path:
        """Every byte written: wait for the checksum, close and rename into place; returns the path."""
        try:
            self._flush()
            if self.pos != self.size and self.exact:
                raise ValueError(f"{self.path}: {self.pos} bytes written, the file was laid out for {self.size}")
            if self.crc32 is not None:
                self._submit_crc(self.pos)  # (while the file still has the size the checksum's mapping expects)
                for job in self._jobs:
                    job.result()
            self._view = None
            self._close_pipe()
            if self.pos != self.size:
                os.ftruncate(self.fd, self.pos)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (after an error): nothing appears under the real name."""
        for job in self._jobs:
            job.cancel()
        for job in self._jobs:
            try:
                job.result()
            except BaseException:
                pass
        self._view = None
        self._close_pipe()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        if exc_type is not None:
            self.abort()
        return False


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _byte_rows(t: torch.Tensor):
    """A 2-D CPU tensor's rows as bytes: a numpy uint8 array of one row per row (a view where its rows are
    contiguous)."""
    if t.shape[1] == 0:
        return numpy.empty((t.shape[0], 0), dtype=numpy.uint8)
    return (t if t.stride(1) == 1 else t.contiguous()).view(torch.uint8).numpy()
