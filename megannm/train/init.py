"""Starting a stage's weights from another checkpoint (``checkpoint.init_from``): the chain between stages.

A megannm DeepSpeed checkpoint at the same tensor/pipeline layout loads module-only (fresh optimizer and schedule);
a consolidated safetensors folder (``megannm convert ... --to consolidated``) loads at any layout.
"""
from __future__ import annotations

from pathlib import Path

from megannm.train import checkpoint


def init_weights(trainer, source: str) -> str:
    path = Path(source)
    if (path / "consolidated.json").exists():
        from megannm.convert.consolidated import load_into_engine
        load_into_engine(trainer, path)
        return f"initialised from {path} (consolidated)"
    found = checkpoint.resolve(path)
    meta = checkpoint.read_meta(found)
    checkpoint.check_compatible(meta, trainer.args.to_dict(), trainer.vocab.fingerprint, str(found),
                                layout=trainer.layout.to_dict())
    checkpoint.load(trainer.engine, found, trainer.layout, module_only=True)
    return f"initialised from {found}"
