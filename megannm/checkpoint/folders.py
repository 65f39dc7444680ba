"""Finding, reading and marking complete checkpoints: the ``latest`` pointer, ``megannm.json``, the folder kinds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megannm.checkpoint.names import CONSOLIDATED_META, LATEST, META, is_tag
from megannm.fileio import atomic_write, atomic_write_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; one line naming the file and parameter."""


def write_latest(ckpt_dir: str | Path, tag: str) -> Path:
    """Point ``latest`` at ``tag``: write + fsync + ``os.replace``, so a crash leaves the old pointer or the new."""
    return atomic_write(Path(ckpt_dir) / LATEST, tag + "\n", fsync=True)


def write_meta(folder: str | Path, meta: dict) -> Path:
    """Write ``megannm.json`` into a tag (last, durably: its presence marks the tag complete)."""
    return atomic_write_json(Path(folder) / META, meta, fsync=True, default=str)


def latest(ckpt_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint folder, or None when there is none."""
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    path = ckpt_dir / tag
    if not (path / META).exists():
        raise CheckpointError(f"{pointer}: names {tag!r}, but {path / META} does not exist (incomplete checkpoint)")
    return path


def complete(ckpt_dir: str | Path) -> list[Path]:
    """Every complete checkpoint folder (a tag holding ``megannm.json``), oldest first."""
    return sorted(p for p in Path(ckpt_dir).iterdir() if p.is_dir() and is_tag(p.name) and (p / META).exists())


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint dir holding ``latest`` -> the complete checkpoint folder."""
    path = Path(path)
    if (path / META).exists():
        return path
    found = latest(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: not a megannm checkpoint (no {META} and no {LATEST} pointer)")
    return found


def read_meta(path: str | Path) -> dict:
    """``megannm.json`` of a checkpoint folder (or of the one ``latest`` names)."""
    path = resolve(path)
    try:
        return json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META}: not valid JSON ({e})") from None


def kind_of(path: str | Path) -> Optional[str]:
    """``"consolidated"`` (a consolidated safetensors folder), ``"deepspeed"`` (a megannm DeepSpeed checkpoint
    folder, or a checkpoint dir with ``latest``), or None."""
    path = Path(path)
    if (path / CONSOLIDATED_META).exists():
        return "consolidated"
    if (path / META).exists() or (path / LATEST).exists():
        return "deepspeed"
    return None
