"""A checkpoint opened for sampling or evaluation in a world of one: what ``megannm generate``, ``evaluate``,
``pairs`` and ``score`` sample from.

``open_checkpoint`` is the one way a command opens a checkpoint: it initialises a world of one, loads the tokenizer
bundle and the model (any saved layout, checked against the tokenizers' vocabulary), and shuts the world down on
the way out, error or not.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Opened:
    """A checkpoint opened for sampling or evaluation in a world of one (``open_checkpoint``)."""
    model: object
    tok: object
    meta: dict
    layout: object

    def load(self, checkpoint):
        """Another checkpoint over the same tokenizers, in the same world (e.g. a baseline to compare with)."""
        from megannm.convert.deepspeed import load_model
        from megannm import parallel
        return load_model(checkpoint, self.layout, vocab=self.tok.vocab)[0].to(parallel.device())


@contextmanager
def open_checkpoint(checkpoint, tokenizers):
    """The one way a command opens a checkpoint: a world of one, the tokenizer bundle, the model (any saved layout,
    checked against the tokenizers' vocabulary); the world is shut down on the way out, error or not."""
    from megannm import parallel
    from megannm.convert.deepspeed import load_model
    from megannm.data.tokenize import Tokenizers
    layout = parallel.init_parallel(1, 1)
    try:
        tok = Tokenizers.load(tokenizers)
        model, meta = load_model(checkpoint, layout, vocab=tok.vocab)
        model.to(parallel.device())  # sample on the GPU where there is one
        yield Opened(model, tok, meta, layout)
    finally:
        parallel.shutdown()
