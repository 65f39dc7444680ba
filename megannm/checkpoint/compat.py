"""Whether a checkpoint's weights may go into the model a recipe builds: same structure, vocabulary and layout."""
from __future__ import annotations

from typing import Optional

from megannm.checkpoint.folders import CheckpointError


def _as_dict(args) -> dict:
    return args if isinstance(args, dict) else args.to_dict()


def check_structure(theirs, ours, source: str) -> None:
    """Refuse weights of a model whose parameters differ in shape or meaning (``megannm.model.args.STRUCTURAL``)
    from the one being trained; ``theirs`` and ``ours`` are ModelArgs or their dicts."""
    from megannm.model.args import STRUCTURAL  # imported here: the format layer loads without the model
    a, b = _as_dict(theirs), _as_dict(ours)
    for key in STRUCTURAL:
        if a.get(key) != b.get(key):
            raise CheckpointError(f"{source}: model parameter {key} is {a.get(key)!r} in the checkpoint, "
                                  f"{b.get(key)!r} in the recipe")


def check_compatible(meta: dict, model_args, vocab_fingerprint: str, source: str,
                     layout: Optional[dict] = None) -> None:
    """Refuse a checkpoint (its ``megannm.json`` as ``meta``) of another vocabulary, model structure or (given
    ``layout``, for DeepSpeed files) tensor/pipeline layout."""
    theirs = meta.get("vocab", {}).get("fingerprint")
    if theirs != vocab_fingerprint:
        raise CheckpointError(f"{source}: vocabulary fingerprint {theirs} differs from the recipe's data "
                              f"({vocab_fingerprint}): the token ids mean different things")
    if layout is not None:
        ckpt_layout = meta.get("layout", {})
        for key in ("tp", "pp"):
            if ckpt_layout.get(key) != layout.get(key):
                raise CheckpointError(
                    f"{source}: saved at {key}={ckpt_layout.get(key)}, this run has {key}={layout.get(key)}: convert "
                    f"it first (megannm convert {source} OUT --to deepspeed --tp {layout.get('tp')} --pp "
                    f"{layout.get('pp')})")
    check_structure(meta.get("model_args", {}), model_args, source)
