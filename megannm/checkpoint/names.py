"""The names on disk: a checkpoint dir and its tags, megannm's files inside a tag, DeepSpeed's files beside them,
and the metadata file that marks a consolidated folder.

A checkpoint dir::

    latest                 the tag of the newest complete checkpoint (a pointer, replaced atomically)
    protected              tags pruning never deletes: the last checkpoint before each detected divergence
    diverged               tags whose weights a divergence's first bad step ran on: ``latest``, resuming and
                           ``checkpoint.fallback`` pass them by (a save of the same step later clears its tag)
    step00000100/          DeepSpeed's files (see below) + rng/rank00000.pt ... + megannm.json (written last,
                           with every file's size and crc32)
    .tmp-step00000200/     a save in progress (or a folder being pruned, or a universal copy being loaded):
                           invisible to loaders; what a killed run left is removed by the next run and every save
    .latest.tmp-<pid>      a pointer being replaced (``megannm.fileio.atomic_file``): the same
    .megannm-lock          held by the run writing here (``megannm.train.runlock``)

DeepSpeed's files inside a tag: ``mp_rank_XX_model_states.pt`` (the module weights of model-parallel rank XX; under
a pipeline ``module: None`` and XX = stage * tp + tensor rank), ``zero_pp_rank_D_mp_rank_XX_{model,optim}_states.pt``
(ZeRO partitions of data rank D) and, under a pipeline, ``layer_CC-model_XX-model_states.pt`` (chain position CC's
weights for tensor rank XX, under the names inside its stage).
"""
from __future__ import annotations

import re
from pathlib import Path

META = "megannm.json"  # megannm's metadata inside a tag; a tag without it is not complete
LATEST = "latest"
TMP_PREFIX = ".tmp-"
RNG_DIR = "rng"
PROTECTED = "protected"  # beside `latest`: tags kept by the divergence guard, one a line
DIVERGED = "diverged"  # beside `latest`: tags whose weights ran a divergence's first bad step, one a line
FILES_DIR = ".files"  # inside a tag being saved: each rank's file records, merged into megannm.json
CONSOLIDATED_META = "consolidated.json"  # the metadata (written last) of a consolidated safetensors folder

_TAG = re.compile(r"step\d{8}")
_ATOMIC_TMP = re.compile(r"\..+\.tmp-\d+")  # megannm.fileio's temporary names: .<name>.tmp-<pid>
_LAYER = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_tag(name: str) -> bool:
    return _TAG.fullmatch(name) is not None


def is_temporary(name: str) -> bool:
    """A temporary checkpoint folder (``.tmp-...``) or a file being written atomically (``.<name>.tmp-<pid>``)."""
    return name.startswith(TMP_PREFIX) or _ATOMIC_TMP.fullmatch(name) is not None


def rng_file(folder: Path, rank: int) -> Path:
    """One rank's RNG states (torch, numpy, python, cuda) inside a tag."""
    return Path(folder) / RNG_DIR / f"rank{rank:05d}.pt"


def module_state_file(folder: Path, mp_rank: int) -> Path:
    return Path(folder) / f"mp_rank_{mp_rank:02d}_model_states.pt"


def layer_file(folder: Path, position: int, tp_rank: int) -> Path:
    return Path(folder) / f"layer_{position:02d}-model_{tp_rank:02d}-model_states.pt"


def layer_pattern(tp_rank: int) -> str:
    """The glob of one tensor rank's pipeline layer files."""
    return f"layer_*-model_{tp_rank:02d}-model_states.pt"


def layer_position(path: Path) -> int:
    """The chain position a pipeline layer file holds."""
    m = _LAYER.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a DeepSpeed pipeline layer file (layer_CC-model_XX-model_states.pt)")
    return int(m.group(1))


def zero_files(folder: Path, tp_rank: int) -> list[Path]:
    """Every ``*_states.pt`` file of one tensor rank except pipeline layer files: its module file and ZeRO
    partitions, the set DeepSpeed's ``zero_to_fp32`` reads for that rank."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.name.endswith("_states.pt") and f"mp_rank_{tp_rank:02d}_" in p.name
                  and not p.name.startswith("layer_"))
