"""torch's own file format (what ``torch.save`` writes and DeepSpeed's checkpoints are), read mapped and written
without ``torch.save``.

The format is a zip archive of uncompressed records under one folder name: ``data.pkl`` (the object, pickled with
each storage replaced by the persistent id ``("storage", <dtype>Storage, key, location, numel)``), ``byteorder``,
one ``data/<key>`` record per storage holding its raw bytes (data 64-byte aligned through a padding extra field, as
torch's writer does, so that ``torch.load(mmap=True)`` maps them), ``version`` and ``.data/serialization_id``.
torch's reader checks no record's crc32 (``torch.save`` itself skips them under ``set_crc32_options(False)``), so
the records carry none; megannm.json records each whole file's crc32 instead.

- ``load(path)``: the object with every storage a view of ONE private mapping of the file (``filebytes.MappedFile``),
  so that writers copy its tensors file to file; the same result as ``torch.load(path, mmap=True)``.
- ``write(path, obj, fill)``: ``obj`` holds ``Planned`` tensors (shape, dtype, and nothing else); ``data.pkl`` is
  pickled as torch pickles a tensor with its own storage, and each record's bytes come from ``fill(planned)``
  (tensors, views of mapped inputs mostly), written in place by ``filebytes.OutputFile`` (a kernel copy where
  they are a range of an input file, the record padded to lie at the same offset modulo the page size). Zip64
  records past 4 GiB.
"""
from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

from megannm.convert.filebytes import PAGE, MappedFile, OutputFile, source_residue

ALIGN = 64  # torch's storage alignment (torch.load mmaps records; its writer aligns them so)
ZIP64_LIMIT = 0xFFFFFFFF  # a size or offset from here on needs zip64 fields (tests lower it)
PROTOCOL = 2  # torch.save's pickle protocol
_VERSION = b"3\n"  # the archive format version torch.save writes

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")
_END64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR64 = struct.Struct("<IIQI")
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch
_PADDING_ID = 0x4246  # "FB": the extra field torch's writer pads with


class NotTorchZip(Exception):
    """A file ``load`` does not read itself (a legacy torch file, compressed records): use ``torch.load``."""


# ---------------------------------------------------------------------------------------------------------------------
# reading


def _records(mapped: MappedFile) -> tuple[str, dict[str, tuple[int, int]]]:
    """(folder name, record name -> (data offset, size)) of a torch zip file, read from its central directory and
    local headers."""
    try:
        with zipfile.ZipFile(mapped.path) as z:
            infos = z.infolist()
    except zipfile.BadZipFile as e:
        raise NotTorchZip(str(e)) from None
    if not infos:
        raise NotTorchZip("empty archive")
    prefix = infos[0].filename.split("/", 1)[0]
    out = {}
    raw = mapped.bytes
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise NotTorchZip(f"record {info.filename} is compressed")
        head = bytes(raw[info.header_offset:info.header_offset + _LOCAL.size].numpy())
        if len(head) < _LOCAL.size or _LOCAL.unpack(head)[0] != 0x04034B50:
            raise NotTorchZip(f"record {info.filename}: no local header")
        name_len, extra_len = _LOCAL.unpack(head)[9:11]
        start = info.header_offset + _LOCAL.size + name_len + extra_len
        if start + info.file_size > mapped.size:
            raise NotTorchZip(f"record {info.filename} runs past the end of the file")
        out[info.filename.split("/", 1)[1] if "/" in info.filename else info.filename] = (start, info.file_size)
    return prefix, out


class _Unpickler(pickle.Unpickler):
    """torch.load's unpickler (its module renames and storage classes) over storages that view one mapping."""

    def __init__(self, data: bytes, mapped: MappedFile, records: dict):
        super().__init__(io.BytesIO(data))
        self.mapped, self.records, self.storages = mapped, records, {}

    def find_class(self, module: str, name: str):
        if "Storage" in name:
            try:
                return torch.serialization.StorageType(name)
            except KeyError:
                pass
        return super().find_class({"torch.tensor": "torch._tensor"}.get(module, module), name)

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if (kind.decode() if isinstance(kind, bytes) else kind) != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        key = key.decode() if isinstance(key, bytes) else key
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in self.storages:
            nbytes = numel * torch._utils._element_size(dtype)
            start, size = self.records.get(f"data/{key}", (None, None))
            if start is None or size < nbytes:
                raise pickle.UnpicklingError(f"no record data/{key} of {nbytes} bytes")
            untyped = (self.mapped.bytes.untyped_storage()[start:start + nbytes] if nbytes  # a view, as torch's
                       else torch.UntypedStorage(0))
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        return self.storages[key]


def load(path: str | Path, keep: Optional[list] = None):
    """The object of a torch file, every tensor a view of one private mapping of it (never read up front); ``keep``
    (a list) receives the ``MappedFile`` so that the caller holds it as long as it uses the tensors. Raises
    ``NotTorchZip`` for files this reader leaves to ``torch.load`` (legacy format, compressed or big-endian)."""
    mapped = MappedFile(path)
    _, records = _records(mapped)
    if "data.pkl" not in records:
        raise NotTorchZip("no data.pkl record")
    if "byteorder" in records:
        start, size = records["byteorder"]
        if bytes(mapped.bytes[start:start + size].numpy()) != b"little":
            raise NotTorchZip("not little-endian")
    start, size = records["data.pkl"]
    obj = _Unpickler(bytes(mapped.bytes[start:start + size].numpy()), mapped, records).load()
    if keep is not None:
        keep.append(mapped)
    return obj


# ---------------------------------------------------------------------------------------------------------------------
# writing


class Planned:
    """A tensor to be written: shape and dtype now, bytes later (from ``write``'s ``fill``). Pickles exactly as torch
    pickles a contiguous tensor that owns its storage."""

    def __init__(self, shape, dtype: torch.dtype, key: str):
        self.shape, self.dtype, self.key = tuple(int(d) for d in shape), dtype, str(key)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def __reduce_ex__(self, protocol):
        stride, step = [], 1
        for d in reversed(self.shape):
            stride.append(step)
            step *= max(d, 1)
        return (torch._utils._rebuild_tensor_v2,
                (_PlannedStorage(self), 0, torch.Size(self.shape), tuple(reversed(stride)), False,
                 collections.OrderedDict()))


class _PlannedStorage:
    def __init__(self, planned: Planned):
        self.planned = planned


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _PlannedStorage):
            p = obj.planned
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[p.dtype])
            return ("storage", storage_type, p.key, "cpu", p.numel)
        if isinstance(obj, (torch.Tensor, torch.storage.TypedStorage, torch.UntypedStorage)):
            raise TypeError("torchzip.write takes Planned tensors only (a real tensor would need its bytes here)")
        return None


def planned_tensors(obj) -> list[Planned]:
    """Every ``Planned`` in ``obj``, in the order they are pickled (the records' order)."""
    found: list[Planned] = []

    class Finder(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _PlannedStorage):
                found.append(o.planned)
                return o.planned.key
            return None

    Finder(io.BytesIO(), protocol=PROTOCOL).dump(obj)
    return found


def _pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=PROTOCOL).dump(obj)
    return buf.getvalue()


def _local_header(name: bytes, offset: int, size: int, residue: Optional[int] = None) -> bytes:
    """A record's local header at ``offset`` (zip64 sizes when needed), padded so that its data starts aligned to
    ``ALIGN``, and at ``residue`` modulo ``filebytes.PAGE`` when that is given (and itself aligned)."""
    zip64 = size >= ZIP64_LIMIT
    extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
    unaligned = offset + _LOCAL.size + len(name) + len(extra) + 4
    if residue is not None and residue % ALIGN == 0:
        pad = (residue - unaligned) % PAGE
    else:
        pad = -unaligned % ALIGN
    extra += struct.pack("<HH", _PADDING_ID, pad) + b"\0" * pad
    small = 0xFFFFFFFF if zip64 else size
    return _LOCAL.pack(0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, 0, small, small, len(name),
                       len(extra)) + name + extra


def _central_entry(name: bytes, offset: int, size: int) -> bytes:
    fields = []
    if size >= ZIP64_LIMIT:
        fields += [size, size]
    if offset >= ZIP64_LIMIT:
        fields.append(offset)
    extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
    small = 0xFFFFFFFF if size >= ZIP64_LIMIT else size
    version = 45 if fields else 20
    return _CENTRAL.pack(0x02014B50, version, version, 0, 0, 0, _DOS_DATE, 0, small, small, len(name), len(extra),
                         0, 0, 0, 0, min(offset, 0xFFFFFFFF)) + name + extra


def _end_records(count: int, cd_offset: int, cd_size: int) -> bytes:
    out = b""
    if count >= 0xFFFF or cd_offset >= ZIP64_LIMIT or cd_size >= ZIP64_LIMIT:
        end64 = cd_offset + cd_size
        out += _END64.pack(0x06064B50, _END64.size - 12, 45, 45, 0, 0, count, count, cd_size, cd_offset)
        out += _LOCATOR64.pack(0x07064B50, 0, end64, 1)
    return out + _END.pack(0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF), min(cd_size, 0xFFFFFFFF),
                           min(cd_offset, 0xFFFFFFFF), 0)


def _bound(names: list[bytes], sizes: list[int]) -> int:
    """The most bytes an archive of these records can take (every record padded as much as it can be)."""
    per_record = _LOCAL.size + 20 + 4 + PAGE + _CENTRAL.size + 28
    return sum(2 * len(n) + per_record + s for n, s in zip(names, sizes)) + _END64.size + _LOCATOR64.size + _END.size


def write(path: str | Path, obj, fill: Callable[[Planned], list], checksum: bool = True) -> Optional[int]:
    """``obj`` (holding ``Planned`` tensors) as a torch file at ``path`` (temporary name + rename); each planned
    tensor's bytes are ``fill(planned)``: tensors (or ``filebytes.Cat``) of its dtype whose bytes, one after the
    other, make it, asked for in record order. Each record is placed where its first part lies in its source file
    modulo the page size (``filebytes.source_residue``: the kernel copies aligned pages cheapest). Returns the
    file's crc32 (with ``checksum``), computed behind the writes."""
    path = Path(path)
    planned = planned_tensors(obj)
    keys = [p.key for p in planned]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: planned tensors share a key")
    pickled = _pickle(obj)
    records = ([("data.pkl", pickled), ("byteorder", b"little")] + [(f"data/{p.key}", p) for p in planned]
               + [("version", _VERSION), (".data/serialization_id", _serialization_id(pickled))])
    names = [f"{path.stem}/{name}".encode() for name, _ in records]
    sizes = [p.nbytes if isinstance(p, Planned) else len(p) for _, p in records]
    central = []
    with OutputFile(path, _bound(names, sizes), checksum=checksum, exact=False) as out:
        for name, size, (_, payload) in zip(names, sizes, records):
            blocks = fill(payload) if isinstance(payload, Planned) else None
            offset = out.pos
            out.write_bytes(_local_header(name, offset, size, None if blocks is None else source_residue(blocks)))
            if blocks is None:
                out.write_bytes(payload)
            else:
                _write_planned(out, payload, blocks, path)
            central.append(_central_entry(name, offset, size))
        cd = b"".join(central)
        out.write_bytes(cd + _end_records(len(records), out.pos, len(cd)))
        out.close()
    return out.crc32


def _write_planned(out: OutputFile, p: Planned, blocks: list, path: Path) -> None:
    start = out.pos
    for b in blocks:
        if b.dtype != p.dtype:
            raise ValueError(f"{path}: record data/{p.key} is {p.dtype}, a part of it came as {b.dtype}")
        out.write_tensor(b)
    if out.pos - start != p.nbytes:
        raise ValueError(f"{path}: record data/{p.key} needs {p.nbytes} bytes, its parts gave {out.pos - start}")


def _serialization_id(pickled: bytes) -> bytes:
    """40 decimal digits, as torch writes (it only logs them), from the pickled object: the same conversion
    writes the same bytes."""
    return str(int.from_bytes(hashlib.sha1(pickled).digest(), "little")).zfill(40)[-40:].encode()
