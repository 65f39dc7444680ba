"""Finding, reading and marking complete checkpoints: the ``latest`` pointer, ``megannm.json``, the folder kinds."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megannm.checkpoint.names import CONSOLIDATED_META, DIVERGED, LATEST, META, PROTECTED, is_tag
from megannm.fileio import atomic_write, atomic_write_json


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; one line naming the file and parameter."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint damaged on disk (a garbled pointer or metadata, a missing, truncated or corrupt file): the one
    kind of error ``checkpoint.fallback`` skips to an older checkpoint for. A checkpoint of another shape or
    vocabulary is a plain ``CheckpointError``: falling back would hide a recipe mistake."""


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
    raw = pointer.read_bytes()
    tag = raw.decode("utf-8", errors="replace").strip()
    if not is_tag(tag):  # garbage bytes, an empty file: say what it holds instead of a codec error
        raise CorruptCheckpoint(f"{pointer}: not a checkpoint tag (holds {raw[:24]!r}, expected a name like "
                                f"step00000100); set checkpoint.fallback: true to resume from the newest complete "
                                f"checkpoint")
    path = ckpt_dir / tag
    if not (path / META).exists():
        raise CorruptCheckpoint(f"{pointer}: names {tag!r}, but {path / META} does not exist (incomplete "
                                f"checkpoint)")
    return path


def complete(ckpt_dir: str | Path) -> list[Path]:
    """Every complete checkpoint folder (a tag holding ``megannm.json``), oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and is_tag(p.name) and (p / META).exists())


def orphans(ckpt_dir: str | Path) -> list[Path]:
    """Tag folders without ``megannm.json``: never written that way (a save renames a complete folder into place),
    so what is left of a deletion killed half-way (before pruning renamed folders out of the way first)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and is_tag(p.name) and not (p / META).exists())


def protected(ckpt_dir: str | Path) -> set[str]:
    """The tags ``protect`` recorded: pruning never deletes them."""
    path = Path(ckpt_dir) / PROTECTED
    if not path.exists():
        return set()
    return {t for t in path.read_text(errors="replace").split() if is_tag(t)}


def protect(ckpt_dir: str | Path, tag: str) -> Path:
    """Keep ``tag`` whatever ``keep_last`` says (the divergence guard's last good checkpoint); atomic, durable."""
    tags = sorted(protected(ckpt_dir) | {tag})
    return atomic_write(Path(ckpt_dir) / PROTECTED, "".join(t + "\n" for t in tags), fsync=True)


def diverged(ckpt_dir: str | Path) -> set[str]:
    """The tags ``mark_diverged`` recorded: resuming never picks them by itself."""
    path = Path(ckpt_dir) / DIVERGED
    if not path.exists():
        return set()
    return {t for t in path.read_text(errors="replace").split() if is_tag(t)}


def _write_tags(ckpt_dir: str | Path, name: str, tags: set[str]) -> None:
    path = Path(ckpt_dir) / name
    if tags:
        atomic_write(path, "".join(t + "\n" for t in sorted(tags)), fsync=True)
    elif path.exists():
        path.unlink()


def mark_diverged(ckpt_dir: str | Path, tag: str) -> None:
    """Record that a divergence's first bad step ran on ``tag``'s weights; atomic, durable."""
    _write_tags(ckpt_dir, DIVERGED, diverged(ckpt_dir) | {tag})


def unmark_diverged(ckpt_dir: str | Path, tag: str) -> None:
    """A new save of ``tag`` replaced the weights that diverged."""
    if tag in diverged(ckpt_dir):
        _write_tags(ckpt_dir, DIVERGED, diverged(ckpt_dir) - {tag})


def remove_latest(ckpt_dir: str | Path) -> None:
    """No checkpoint to resume from: ``latest`` goes (a missing pointer is a fresh folder's state)."""
    try:
        (Path(ckpt_dir) / LATEST).unlink()
    except FileNotFoundError:
        pass


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
        meta = json.loads((path / META).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{path / META}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpoint(f"{path / META}: not a checkpoint's metadata (a JSON {type(meta).__name__})")
    return meta


def kind_of(path: str | Path) -> Optional[str]:
    """``"consolidated"`` (a consolidated safetensors folder), ``"deepspeed"`` (a megannm DeepSpeed checkpoint
    folder, or a checkpoint dir with ``latest``), or None."""
    path = Path(path)
    if (path / CONSOLIDATED_META).exists():
        return "consolidated"
    if (path / META).exists() or (path / LATEST).exists():
        return "deepspeed"
    return None
