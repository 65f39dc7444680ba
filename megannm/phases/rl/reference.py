"""The models an RL phase holds beside the engine: the frozen reference, and a plain copy of the policy for
sampling under ZeRO-3.

The reference is the policy's starting weights, in the training dtype, on this rank's device, at this rank's
tensor-parallel layout, and is built from the cheapest exact source:

- a run that starts fresh (step 0): the live policy right after its initialisation, copied (gathered module by
  module under ZeRO-3): nothing is read from disk, and it is exactly what the policy starts from;
- a resumed run: ``checkpoint.init_from``, this rank's own slice only: a consolidated folder's rows and columns
  of this rank (``Folder.local``), or a DeepSpeed checkpoint at this TP size through this rank's
  ``mp_rank_XX_model_states.pt`` alone (under bf16 its module weights are the training-dtype weights exactly; the
  fp32 master in the optimizer partitions is never read); without ``init_from``, the recipe's seeded initial
  weights again.

"""
from __future__ import annotations

from pathlib import Path

import torch

from megannm.model.build import build_model


def frozen_reference(recipe, layout, vocab, args, engine=None, fresh: bool = False):
    """The frozen reference (see the module docstring): copied from ``engine`` when ``fresh`` (the run's weights
    have not been updated yet), else read from ``checkpoint.init_from`` or rebuilt from the recipe's seed. No
    gradient ever reaches it."""
    from megannm import parallel
    device = parallel.device()
    if fresh and engine is not None:
        model = copy_of_policy(engine.module, args, layout, device)
    elif recipe.checkpoint.init_from:
        model = load_reference(recipe.checkpoint.init_from, args, layout, vocab, device)
    else:
        with torch.random.fork_rng(devices=[]):
            _, model = build_model(recipe, vocab, layout)
        model.to(device=device, dtype=args.torch_dtype)
    return model.requires_grad_(False).eval()


def _empty_model(args, layout, device, dtype=None):
    """An ``NMMModel`` at this rank's layout in ``dtype`` (default: the training dtype) on ``device``, to be
    overwritten."""
    from megannm.model.transformer import NMMModel
    with torch.random.fork_rng(devices=[]):
        model = NMMModel(args, layout, seed=0)
    return model.to(device=device, dtype=dtype or args.torch_dtype).requires_grad_(False)


@torch.no_grad()
def copy_weights(src, dst) -> None:
    """Every parameter of ``src`` (an engine's module, partitioned or not) into ``dst`` (a plain model of the same
    names), one block at a time: under ZeRO-3 each block is gathered on every rank of the data group (all of them
    must call this together) and released before the next."""
    import deepspeed
    mine = dict(dst.named_parameters())
    for group in [src.embedding, *src.layers, src.head]:
        named = list(group.named_parameters())
        prefix = next(n for n, m in src.named_modules() if m is group)
        partitioned = any(hasattr(p, "ds_id") for _, p in named)
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=partitioned):
            for n, p in named:
                mine[f"{prefix}.{n}"].copy_(p.data)


def copy_of_policy(module, args, layout, device):
    """A plain frozen copy of the live policy's weights (in its dtype: the training dtype)."""
    model = _empty_model(args, layout, device)
    copy_weights(module, model)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# reading this rank's slice


def reference_state(path, args, layout, vocab, names: list[str]) -> tuple[dict, str]:
    """This rank's weights of the checkpoint at ``path`` under the model's parameter ``names``, read
    from this rank's slice only: (state, where they came from)."""
    from megannm import checkpoint as fmt
    path = Path(path)
    if fmt.kind_of(path) == "consolidated":
        from megannm.checkpoint.consolidated import Folder
        opened = Folder(path)
        where = str(opened.folder / fmt.CONSOLIDATED_META)
        vocab.check_same(opened.vocab.fingerprint, "the recipe's data", where)
        fmt.check_structure(opened.args, args, where)
        get = lambda name: opened.local(name, layout.tp, layout.tp_rank, args.padded_vocab_size)  # noqa: E731
        return _module_named(get, names, args, layout, where), where
    from megannm.checkpoint.deepspeed import read_module_state
    ckpt = fmt.resolve(path)
    meta = fmt.read_meta(ckpt)
    saved = meta.get("layout") or {}
    if (saved.get("tp"), saved.get("pp") or 1) != (layout.tp, 1):
        raise fmt.CheckpointError(f"{ckpt}: the reference reads this rank's own slice, but the checkpoint was saved "
                                  f"at tp={saved.get('tp')} pp={saved.get('pp') or 1} and this run has tp={layout.tp} "
                                  f"pp=1: convert it (megannm convert {ckpt} OUT --to consolidated) and set "
                                  f"checkpoint.init_from to OUT")
    fmt.check_compatible(meta, args, vocab.fingerprint, str(ckpt))
    mine = fmt.module_state_file(ckpt, layout.tp_rank)
    state = {k: t for k, t in read_module_state(ckpt, layout.tp_rank).items() if not k.endswith("._extra_state")}
    empty = next((k for k, t in state.items() if t.numel() == 0), None)
    if empty is not None:  # ZeRO-3 saves placeholders in the module file; its weights live in optimizer partitions
        raise fmt.CheckpointError(f"{mine}: holds no weights ({empty} is an empty placeholder, as ZeRO-3 saves "
                                  f"them): convert it (megannm convert {ckpt} OUT --to consolidated) and set "
                                  f"checkpoint.init_from to OUT")
    def get(name):
        if name not in state:
            raise fmt.CheckpointError(f"{mine}: missing parameter {name}")
        return state[name]

    return _module_named(get, names, args, layout, str(mine)), str(mine)


def _module_named(get, names: list[str], args, layout, where: str) -> dict:
    """The model's parameter ``names`` (the canonical names) -> this rank's tensors, from ``get(name)``, each
    checked against its expected shape."""
    from megannm.checkpoint import canonical
    expected = canonical.local_shapes(args, layout.tp, args.padded_vocab_size)
    state = {}
    for name in names:
        t = get(name)
        if name in expected and tuple(t.shape) != tuple(expected[name]):
            from megannm.checkpoint import CheckpointError
            raise CheckpointError(f"{where}: parameter {name} has shape {list(t.shape)} for tensor rank "
                                  f"{layout.tp_rank}, expected {list(expected[name])}")
        state[name] = t
    return state


def load_reference(path, args, layout, vocab, device):
    """The frozen reference from this rank's slice of ``path``, in the training dtype on ``device``."""
    model = _empty_model(args, layout, device)
    state, where = reference_state(path, args, layout, vocab, [n for n, _ in model.named_parameters()])
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        from megannm.checkpoint import CheckpointError
        raise CheckpointError(f"{where}: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    return model


class PolicyCopy:
    """The policy's weights in a plain ``NMMModel`` for sampling under ZeRO-3, refreshed before every rollout by
    gathering the partitioned parameters module by module (every rank of the data group joins each gather)."""

    def __init__(self, engine, args, layout):
        p = next(engine.module.parameters())
        self.model = _empty_model(args, layout, p.device, p.dtype).eval()
        self.engine = engine

    def refresh(self):
        copy_weights(self.engine.module, self.model)
        return self.model
