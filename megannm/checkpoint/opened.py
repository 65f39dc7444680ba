"""A checkpoint opened as a model: what ``megannm generate``, ``evaluate``, ``pairs``, ``score`` and the demo sample
from.

``load_model`` builds the model (eval mode) from a DeepSpeed checkpoint of ANY layout or from a consolidated folder,
at this process's tensor-parallel size. ``open_checkpoint`` is the one way a command opens a checkpoint: it
initialises a world of one, loads the tokenizer bundle and the model (checked against the tokenizers' vocabulary),
and shuts the world down on the way out, error or not.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from megannm.checkpoint import canonical
from megannm.checkpoint.consolidated import Folder, normalise_args
from megannm.checkpoint.deepspeed import rank_state, read_deepspeed
from megannm.checkpoint.folders import CheckpointError, kind_of, read_meta, resolve
from megannm.checkpoint.names import CONSOLIDATED_META, META
from megannm.vocab import Vocab


def load_model(path: str | Path, layout, vocab: Vocab | None = None):
    """Model (eval mode) + metadata from a DeepSpeed checkpoint of ANY layout, or from a consolidated folder, at
    this process's tensor-parallel size (pipeline size 1).

    A checkpoint saved at this TP size with exact fp32 module weights (ZeRO 0-2, pipeline 1) reads its own rank's
    module file; a consolidated folder this rank's rows and columns; every other layout is joined tensor by tensor
    from the canonical form. Names and shapes are checked against the model's before anything is copied."""
    from megannm.model.transformer import NMMModel
    path = Path(path)
    if layout.pp != 1:
        raise CheckpointError(f"load_model: runs at pipeline size 1 (got pp={layout.pp})")
    if kind_of(path) == "consolidated":
        folder = Folder(path)
        meta = dict(folder.meta)
        fingerprint, where = folder.vocab.fingerprint, str(path / CONSOLIDATED_META)
        args = normalise_args(folder.args, folder.vocab, layout.tp)
        get = lambda name: folder.local(name, layout.tp, layout.tp_rank, args.padded_vocab_size)  # noqa: E731
    else:
        ckpt = resolve(path)
        meta = read_meta(ckpt)
        fingerprint, where = meta["vocab"]["fingerprint"], str(ckpt / META)
        saved = meta.get("layout", {})
        precision = (meta.get("recipe") or {}).get("precision", "fp32")
        if (saved.get("tp") == layout.tp and saved.get("pp", 1) == 1 and precision == "fp32"
                and (meta.get("zero_stage") in (0, 1, 2) or meta.get("module_only"))):
            from megannm.model.args import ModelArgs
            args = ModelArgs.from_dict(meta["model_args"])
            get = rank_state(ckpt, meta, layout.tp_rank, weights="module")[0].__getitem__
        else:
            c = read_deepspeed(ckpt)
            args = normalise_args(c.args, c.vocab, layout.tp)
            get = lambda name: canonical.rank_slice(name, c.state[name], layout.tp, layout.tp_rank,  # noqa: E731
                                                    args.padded_vocab_size)
    if vocab is not None:
        vocab.check_same(fingerprint, "the tokenizers", where)
    canonical.check_divisible(args, layout.tp, 1, args.padded_vocab_size, where=where)
    expected = canonical.local_shapes(args, layout.tp, args.padded_vocab_size)
    model = NMMModel(args, layout)
    own, done = model.state_dict(), set()
    layers: dict[str, list[str]] = {}  # one layer's tensors in memory at a time
    for name in expected:
        layers.setdefault(name.split(".")[1] if name.startswith("layers.") else "", []).append(name)
    with torch.no_grad():
        for names in layers.values():
            local = {}
            for name in names:
                try:
                    local[name] = get(name)
                except KeyError:
                    raise CheckpointError(f"{where}: missing parameter {name}") from None
                if tuple(local[name].shape) != tuple(expected[name]):
                    raise CheckpointError(f"{where}: parameter {name} has shape {list(local[name].shape)}, "
                                          f"expected {list(expected[name])}")
            for name, t in local.items():
                if name not in own:
                    raise CheckpointError(f"{where}: the model has no parameter {name}")
                own[name].copy_(t)
                done.add(name)
    if set(own) - done:
        raise CheckpointError(f"{where}: the checkpoint gives no value for the model's {sorted(set(own) - done)[0]}")
    model.eval()
    return model, meta


@dataclass
class Opened:
    """A checkpoint opened for sampling or evaluation in a world of one (``open_checkpoint``)."""
    model: object
    tok: object
    meta: dict
    layout: object

    def load(self, checkpoint):
        """Another checkpoint over the same tokenizers, in the same world (e.g. a baseline to compare with)."""
        from megannm import parallel
        return load_model(checkpoint, self.layout, vocab=self.tok.vocab)[0].to(parallel.device())


@contextmanager
def open_checkpoint(checkpoint, tokenizers):
    """The one way a command opens a checkpoint: a world of one, the tokenizer bundle, the model (any saved layout,
    checked against the tokenizers' vocabulary); the world is shut down on the way out, error or not."""
    from megannm import parallel
    from megannm.data.tokenize import Tokenizers
    layout = parallel.init_parallel(1, 1)
    try:
        tok = Tokenizers.load(tokenizers)
        model, meta = load_model(checkpoint, layout, vocab=tok.vocab)
        model.to(parallel.device())  # sample on the GPU where there is one
        yield Opened(model, tok, meta, layout)
    finally:
        parallel.shutdown()
