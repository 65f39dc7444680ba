"""Files with code planted in them, as a hostile checkpoint or tokenizer folder would carry it: each, if loaded as
code, creates a marker file (the tests assert that it does not exist)."""
from __future__ import annotations

import io
import itertools
import json
import os
import shlex
from pathlib import Path

import numpy as np


class Touch:
    """Pickles as ``os.system("touch MARKER")``: unpickling it runs the command (the file names ``posix.system``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant_pickle(path: Path, marker: Path) -> Path:
    """Add a ``Touch`` to the dict a torch file holds, and re-record its size and crc32 in the ``megannm.json`` of
    its checkpoint (as an attacker would: the records are no signature)."""
    import torch

    from megannm.checkpoint import integrity
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["planted"] = Touch(marker)
    torch.save(state, path)
    folder = next(p for p in path.parents if (p / "megannm.json").exists())
    meta = json.loads((folder / "megannm.json").read_text())
    name = str(path.relative_to(folder))
    meta["files"].update(integrity.record(folder, [name]))
    (folder / "megannm.json").write_text(json.dumps(meta))
    return path


_names = itertools.count()


def plant_kind(tokenizers: Path, modules: Path, marker: Path) -> str:
    """Name, as the kind of the ``image_tokenizer.npz`` in ``tokenizers``, a class of a new module written into
    ``modules`` whose import creates ``marker`` (the class itself is a working patch_vq); returns the kind (each
    call's module has a name of its own: an imported module would no longer be new code)."""
    module = f"megannm_planted_vq{os.getpid()}_{next(_names)}"
    modules.mkdir(parents=True, exist_ok=True)
    (modules / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from megannm.data.image_tokenizer.patch_vq import PatchVQ\n\n\n"
        f"class PlantedVQ(PatchVQ):\n    kind = '{module}:PlantedVQ'\n")
    path = tokenizers / "image_tokenizer.npz"
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["kind"] = np.array(f"{module}:PlantedVQ")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return f"{module}:PlantedVQ"
