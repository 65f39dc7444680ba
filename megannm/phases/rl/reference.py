"""The models an RL phase holds beside the engine: the frozen reference, and a plain copy of the policy for
sampling under ZeRO-3."""
from __future__ import annotations

import torch

from megannm.model.build import build_model


def frozen_reference(recipe, layout, vocab, args):
    """The frozen reference: a plain ``NMMModel`` from ``checkpoint.init_from`` at this TP size, or (without one)
    rebuilt from the recipe's seed, i.e. the policy's own initial weights; in the policy's dtype (``args``: equal
    to the policy at the start, half the memory in bf16), on this rank's device, where the batches it scores live.
    No gradient ever reaches it."""
    from megannm import parallel
    with torch.random.fork_rng(devices=[]):
        if recipe.checkpoint.init_from:
            from megannm.convert.deepspeed import load_model
            model, _ = load_model(recipe.checkpoint.init_from, layout, vocab=vocab)
        else:
            _, model = build_model(recipe, vocab, layout)
    model.to(device=parallel.device(), dtype=args.torch_dtype).requires_grad_(False)
    return model.eval()


class PolicyCopy:
    """The policy's weights in a plain ``NMMModel`` for sampling under ZeRO-3, refreshed before every rollout by
    gathering the partitioned parameters module by module (every rank of the data group joins each gather)."""

    def __init__(self, engine, args, layout):
        from megannm.model.transformer import NMMModel
        with torch.random.fork_rng(devices=[]):
            self.model = NMMModel(args, layout, seed=0)
        p = next(engine.module.parameters())
        self.model.to(device=p.device, dtype=p.dtype).requires_grad_(False).eval()
        self.engine = engine

    @torch.no_grad()
    def refresh(self):
        import deepspeed
        mine = dict(self.model.named_parameters())
        src = self.engine.module
        for g in [src.embedding, *src.layers, src.head]:
            named = list(g.named_parameters())
            prefix = next(n for n, m in src.named_modules() if m is g)
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                for n, p in named:
                    mine[f"{prefix}.{n}"].copy_(p.data)
        return self.model
