"""Reading megannm's DeepSpeed checkpoints.

``load_model`` rebuilds the model a checkpoint was trained with and loads this rank's weights at the layout it was
saved with (ZeRO 0-2, pipeline size 1). Other layouts go through the consolidated form (``megannm convert``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from megannm.train import checkpoint
from megannm.vocab import Vocab


def module_state_file(ckpt: Path, tp_rank: int) -> Path:
    return ckpt / f"mp_rank_{tp_rank:02d}_model_states.pt"


def read_module_state(ckpt: Path, tp_rank: int) -> dict:
    path = module_state_file(ckpt, tp_rank)
    if not path.exists():
        raise checkpoint.CheckpointError(f"{ckpt}: no module weights for tensor rank {tp_rank} ({path.name} missing)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["module"]


def load_model(path: str | Path, layout, vocab: Vocab | None = None):
    """Model (eval mode) + metadata from a checkpoint saved at this layout's tensor-parallel size."""
    from megannm.model.transformer import ModelArgs, NMMModel
    ckpt = checkpoint.resolve(path)
    meta = checkpoint.read_meta(ckpt)
    if vocab is not None:
        vocab.check_same(meta["vocab"]["fingerprint"], "the tokenizers", str(ckpt / checkpoint.META))
    saved = meta.get("layout", {})
    if saved.get("tp") != layout.tp or saved.get("pp", 1) != 1 or meta.get("zero_stage", 0) == 3:
        raise checkpoint.CheckpointError(
            f"{ckpt}: saved at tp={saved.get('tp')} pp={saved.get('pp')} zero={meta.get('zero_stage')}; convert it "
            f"first (megannm convert {ckpt} OUT --to consolidated) or run at tp={saved.get('tp')}")
    args = ModelArgs.from_dict(meta["model_args"])
    model = NMMModel(args)
    state = read_module_state(ckpt, layout.tp_rank)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise checkpoint.CheckpointError(f"{module_state_file(ckpt, layout.tp_rank)}: {what}")
    model.eval()
    return model, meta
