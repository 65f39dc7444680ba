"""The one bridge between the model's module names and the canonical names, while the model fuses projections.

Today's model holds each modality's q/k/v projections as one ``qkv_proj`` and its gate/up projections as one
``gate_up_proj`` (``megannm.model.fused``); files in canonical form (consolidated folders, Hugging Face exports, the
reshard arithmetic) name them separately. Every use of ``megannm.model.fused`` in checkpoint I/O goes through this
pair and nothing else: once the model's state-dict names are the canonical ones, both become the identity and this
module is deleted.
"""
from __future__ import annotations

from typing import Mapping

import torch


def module_to_canonical(state: Mapping[str, torch.Tensor], args, tp: int) -> dict[str, torch.Tensor]:
    """One tensor rank's module-named weights -> the same rank's weights under canonical names (fused weights split
    into views of their parts; every other name as it is). ValueError names a fused weight of the wrong size."""
    from megannm.model import fused
    return fused.to_canonical(state, args, tp)


def canonical_to_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``module_to_canonical``: one rank's canonical weights -> the module's names (parts stacked)."""
    from megannm.model import fused
    return fused.from_canonical(state)
