"""Consolidated -> a module-only DeepSpeed checkpoint at any TP x PP: the adapter that re-shards.

``write_deepspeed`` writes a checkpoint dir (``latest`` + ``step<N>/``) holding the module weights only, under the
canonical names (the model's own), in DeepSpeed's own file layout
(``mp_rank_XX_model_states.pt``; under a pipeline the layer files ``layer_CC-model_XX-model_states.pt`` plus one
``mp_rank_XX`` file per stage and TP rank with ``module: None``), each file written whole by ``torch.save`` (one rank
file, or one pipeline layer file, in memory at a time) through ``megannm.fileio.atomic_file``. Its ``megannm.json``
records every file's size and crc32 and marks it ``module_only``: ``init_from`` (``megannm.train.load``) loads the
weights at any ZeRO stage with a fresh optimizer and schedule; ``--resume`` also continues the step count, the data
position and the learning-rate schedule from the source's step, with fresh Adam moments (the optimizer state does not
survive the consolidated form). Reading DeepSpeed checkpoints is ``megannm.checkpoint.deepspeed``'s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megannm import checkpoint
from megannm.checkpoint import canonical, integrity
from megannm.checkpoint.consolidated import Consolidated, normalise_args
from megannm.checkpoint.tensors import cast_to, specs_of
from megannm.fileio import atomic_file, atomic_output


def _module_file(module: Optional[dict], tp: int, dp: int, step: int, consumed: int) -> dict:
    """What DeepSpeed's ``save_checkpoint`` puts in ``mp_rank_XX_model_states.pt``, module weights only."""
    import deepspeed
    return {"module": module, "buffer_names": [], "optimizer": None, "param_shapes": None,
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
            "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
            "global_steps": step, "global_samples": consumed, "dp_world_size": dp, "mp_world_size": tp,
            "ds_version": deepspeed.__version__, "step": step, "consumed_samples": consumed}


def _rank_module(c: Consolidated, names: list[str], tp: int, rank: int, padded: int,
                 dtype: Optional[torch.dtype]) -> dict:
    """TP rank ``rank``'s slices of the canonical ``names`` (the module's own names), each its own tensor (a view
    would make ``torch.save`` write its whole source)."""
    local = {}
    for name in names:
        t = canonical.rank_slice(name, c.state[name], tp, rank, padded)
        t = t.to(cast_to(t.dtype, dtype)).contiguous()
        local[name] = t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t
    return local


def write_deepspeed(c: Consolidated, dst: str | Path, tp: int = 1, pp: int = 1, overwrite: bool = False,
                    dtype: Optional[torch.dtype] = None) -> Path:
    """A module-only DeepSpeed checkpoint dir (``latest`` + ``step<N>/``) at TP x PP from the canonical form, one
    file at a time. ``dtype`` casts the weights (default: as they come)."""
    padded = c.vocab.padded_size(tp)
    canonical.check_divisible(c.args, tp, pp, padded, where=f"{dst}")
    shapes = canonical.canonical_shapes(c.args)
    canonical.check_shape_map({k: s for k, (s, _) in specs_of(c.state).items()}, shapes, "consolidated state")
    args = normalise_args(c.args, c.vocab, tp)
    step, consumed = c.step, c.consumed_samples
    tag = checkpoint.tag_for(step)
    dst = Path(dst)
    with atomic_output(dst, overwrite) as tmp:
        folder = tmp / tag
        folder.mkdir()
        if pp > 1:
            from megannm.model.pipeline import canonical_to_pipeline
            positions: dict[int, list[str]] = {}
            for name in shapes:
                positions.setdefault(canonical_to_pipeline(name, args.layers)[0], []).append(name)
            for r in range(tp):
                for position, group in sorted(positions.items()):
                    module = _rank_module(c, group, tp, r, padded, dtype)
                    inner = {canonical_to_pipeline(k, args.layers)[1]: v for k, v in module.items()}
                    with atomic_file(checkpoint.layer_file(folder, position, r)) as f:
                        torch.save(inner, f)
            for mp_rank in range(tp * pp):
                with atomic_file(checkpoint.module_state_file(folder, mp_rank)) as f:
                    torch.save(_module_file(None, tp * pp, 1, step, consumed), f)
        else:
            for r in range(tp):
                module = _rank_module(c, list(shapes), tp, r, padded, dtype)
                with atomic_file(checkpoint.module_state_file(folder, r)) as f:
                    torch.save(_module_file(module, tp, 1, step, consumed), f)
                del module
        meta = {"recipe": c.recipe, "recipe_source": None, "model_args": args.to_dict(), "vocab": c.vocab.to_dict(),
                "layout": {"world_size": None, "tp": tp, "pp": pp, "dp": None}, "zero_stage": None,
                "module_only": True, "consumed_samples": consumed, "step": step, "tag": tag,
                "converted_from": c.source, "files": integrity.record(folder, integrity.top_files(folder))}
        checkpoint.write_meta(folder, meta)
        checkpoint.write_latest(tmp, tag)
    return dst
