"""Tensor files through their own libraries: safetensors folders (Hugging Face's layout) and torch files (DeepSpeed's).

A safetensors folder is ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {name: file}}``) once the tensors
exceed ``max_shard_size`` bytes. It is read with ``safetensors.safe_open`` (``get_slice``: a slice of a tensor reads
only its bytes) and written one shard at a time with ``safetensors.torch.save_file``: a conversion holds at most one
output shard in memory, never the model. Torch files are read with ``torch.load(mmap=True, weights_only=True)``: only
the tensors used are read, and unpickling is limited to tensors, plain containers and the few DeepSpeed types its
files hold (``deepspeed_types``); anything else is refused unless ``--trust-code`` was given (``megannm.trust``).

A state being converted is a ``LazyState``: every tensor's shape and dtype known up front, each tensor read (joined,
cast) only when it is asked for.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from megannm import trust
from megannm.checkpoint.folders import CheckpointError, CorruptCheckpoint
from megannm.checkpoint.names import META
from megannm.fileio import atomic_file, atomic_write_json

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 10 ** 9  # Hugging Face's default: 5 GB per file
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


class LazyState(Mapping):
    """name -> tensor, each read (or joined from its TP shards, or cast) only when asked for and never kept: what a
    conversion streams through. ``specs`` gives every (shape, dtype) up front, so that writers plan their files
    before reading anything."""

    def __init__(self, specs: Mapping[str, tuple], get: Callable[[str], torch.Tensor]):
        self.specs = {k: (tuple(shape), dtype) for k, (shape, dtype) in specs.items()}
        self._get = get

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


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of a state, lazy or not, without reading a lazy one."""
    if isinstance(state, LazyState):
        return dict(state.specs)
    return {k: (tuple(t.shape), t.dtype) for k, t in state.items()}


def cast_to(dtype: torch.dtype, cast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is written in when ``cast`` is asked for (floating point only)."""
    return cast if cast is not None and dtype.is_floating_point else dtype


# ---------------------------------------------------------------------------------------------------------------------
# safetensors folders


def shard_plan(specs: Mapping[str, tuple], max_shard_size: int = DEFAULT_SHARD_SIZE) -> list[tuple[str, list[str]]]:
    """(file name, tensor names) of each safetensors file, tensors in their order: a new file starts where the next
    tensor would pass ``max_shard_size`` bytes (Hugging Face's rule)."""
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
                     metadata: Optional[dict] = None, dtype: Optional[torch.dtype] = None) -> list[str]:
    """Write ``tensors`` (in their order, lazy or not) as one file or as shards plus the index, one shard in memory at
    a time (``save_file`` of that shard's tensors, read and cast to ``dtype`` when their shard is written); returns
    the file names."""
    folder = Path(folder)
    specs = {k: (shape, cast_to(dt, dtype)) for k, (shape, dt) in specs_of(tensors).items()}
    plan = shard_plan(specs, max_shard_size)
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    for file, names in plan:
        shard, storages = {}, set()
        for name in names:
            t = tensors[name].to(specs[name][1]).contiguous()
            if tuple(t.shape) != tuple(specs[name][0]):
                raise CheckpointError(f"{folder / file}: parameter {name} came as {list(t.shape)}, expected "
                                      f"{list(specs[name][0])}")
            if t.numel() and t.untyped_storage().data_ptr() in storages:  # save_file refuses shared storage
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            shard[name] = t
        from safetensors.torch import save_file
        with atomic_file(folder / file) as tmp:
            save_file(shard, tmp, metadata=meta)
        del shard
    if len(plan) > 1:
        atomic_write_json(folder / INDEX, {"metadata": {"total_size": sum(tensor_bytes(*s) for s in specs.values())},
                                           "weight_map": {k: f for f, names in plan for k in names}})
    return [f for f, _ in plan]


def weight_map(folder: str | Path) -> dict[str, str]:
    """name -> file of a safetensors folder (single file or index)."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        try:
            return dict(json.loads((folder / INDEX).read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / INDEX}: not a safetensors index ({type(e).__name__}: {e})") from None
    if (folder / SINGLE).exists():
        return {k: SINGLE for k in open_safetensors(folder / SINGLE).keys()}
    raise CheckpointError(f"{folder}: no {SINGLE} and no {INDEX}")


def open_safetensors(path: Path):
    """``safe_open(path)``, or one line naming the file: truncated (its size against what its header describes),
    or not a safetensors file at all."""
    from safetensors import safe_open
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
        why = _damage(Path(path))
        if not why.startswith("truncated"):
            why += f" ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})"
        raise CorruptCheckpoint(f"{path}: {why}") from None


def _damage(path: Path) -> str:
    """Why a safetensors file does not open, from its first bytes: an 8-byte header length, the JSON header, then
    the tensors' bytes up to the largest ``data_offsets`` end (the format's whole layout)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > 100 * 2 ** 20:  # safetensors' own limit on the header is 100 MB
            return f"not a safetensors file ({size} bytes)"
        header = f.read(n)
    if len(header) < n:
        return f"truncated ({size} bytes, its header alone needs {8 + n})"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in json.loads(header).items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        return "not a safetensors file (its header is not the format's JSON)"
    need = 8 + n + max(ends, default=0)
    return f"truncated ({size} bytes, its header describes {need})" if size < need else "damaged"


class SafetensorsFolder:
    """Tensors (or slices of them) of a safetensors folder, each file opened once with ``safe_open``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.map = weight_map(self.folder)
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.map)

    def _slice(self, name: str):
        file = self.map.get(name)
        if file is None:
            raise CheckpointError(f"{self.folder}: missing parameter {name}")
        if file not in self._open:
            path = self.folder / file
            if not path.exists():
                raise CheckpointError(f"{path}: missing file (the index names it for {name})")
            self._open[file] = open_safetensors(path)
        try:
            return self._open[file].get_slice(name)
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"{self.folder / file}: missing parameter {name} (the index names this file)") \
                from None

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the file's header; no tensor is read."""
        s = self._slice(name)
        return tuple(s.get_shape()), _DTYPES[s.get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        return self._slice(name)[:]

    def get_rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, stop - start)``, reading only those bytes."""
        return self._slice(name)[tuple([slice(None)] * dim + [slice(start, stop)])]


# ---------------------------------------------------------------------------------------------------------------------
# torch files (DeepSpeed's)


def deepspeed_types() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its model and optimizer files (ZeRO 0-3, BF16_Optimizer,
    fp16 loss scaling): the ZeRO stage enum, the loss scalers and the fragment addresses of ``param_slice_mappings``.
    Their unpickling only builds them (an enum member; a scaler's or a dataclass's fields): no code of the file's
    choosing runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def load_torch(path: Path, records: Optional[dict] = None, map_location="cpu", mmap: bool = True):
    """A torch file, memory-mapped (its tensors are read from the page cache as they are used, those never used are
    never read), after its crc32 is checked against ``records`` (``megannm.json``'s ``files``, when it lists the
    file): a flipped or truncated file is named as such, never used silently.

    Unpickled as data (``megannm.trust.torch_load``: ``weights_only=True`` plus DeepSpeed's few types): a file that
    holds any other object is refused with one line naming the file and the object's class (``UntrustedInput``, exit
    2), unless ``--trust-code`` was given."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing file")
    if records and path.name in records:
        from megannm.checkpoint import integrity
        problem = integrity.check(path.parent, records, [path.name])
        if problem:
            raise CorruptCheckpoint(problem)
    try:
        return trust.torch_load(path, deepspeed_types(), map_location=map_location, mmap=mmap)
    except trust.UntrustedInput:
        raise
    except Exception as e:  # noqa: BLE001 (truncated, or not a torch file)
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") \
            from None


def records_of(folder: Path) -> dict:
    """The size and crc32 records of a tag's files (``megannm.json``), {} when it has none."""
    try:
        return json.loads((Path(folder) / META).read_text()).get("files") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
