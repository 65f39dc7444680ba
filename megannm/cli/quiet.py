"""Silence what libraries print that a user cannot act on (kept with ``megannm --verbose``).

megatron-core warns on import that Transformer Engine and apex are missing (it falls back to torch, which is
what a CPU machine should do), DeepSpeed logs that it picked the CPU when there is no GPU, and transformers
reports unused weights when a VQ model is read out of a whole model. None of it is a user's mistake; real errors
still raise. ``megannm.cli.main`` calls ``quiet_library_warnings`` before any command imports those libraries.
"""
from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = r"(deepspeed|megatron|transformer_engine|apex|torch\.distributed)"


def quiet_library_warnings(verbose: bool = False) -> None:
    if verbose:
        return
    warnings.filterwarnings("ignore", category=UserWarning, module=LIBRARIES)
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|[Aa]pex).*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=LIBRARIES)
    if "DS_ACCELERATOR" not in os.environ:
        try:
            import torch
            if not torch.cuda.is_available():  # tell DeepSpeed what it would find, so it does not warn about it
                os.environ["DS_ACCELERATOR"] = "cpu"
        except ImportError:
            pass
    for name in ("DeepSpeed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
