"""What a file megannm reads may make it do: by default, nothing but give data (docs/security.md).

Checkpoints, exports and tokenizer folders pass between people, so megannm reads them as data: torch files with
``torch.load(weights_only=True)`` (tensors, plain containers and numbers, plus the few classes a caller allowlists:
DeepSpeed's in its checkpoint files), and an image tokenizer only of a kind that is built in, registered or named by an
installed package's entry point. A file that needs more (a pickled object of another class, whose unpickling can call
any function it names; a tokenizer kind that would import a module) is refused with one line naming the file, what it
needs and the switch that allows it: ``--trust-code`` on the command line, which calls ``trust_code()``. The switch is
per process and never read from the environment, so that it cannot be left on by accident.

This module sits below everything else (it imports nothing from megannm).
"""
from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

FLAG = "--trust-code"
_trusted = False


class UntrustedInput(Exception):
    """A file that would run code to be loaded, refused: one line naming it, what it needs and ``--trust-code``.

    Deliberately not a ``ValueError``: no "damaged file" handler (a checkpoint fallback, a retry) may swallow it."""
    exit_code = 2


def trusted() -> bool:
    """True when this process was told (``--trust-code``) to load files that run code."""
    return _trusted


@contextmanager
def trust_code(on: bool = True) -> Iterator[None]:
    """Within the block, files that need code to load are loaded (``on``), else refused; restored afterwards."""
    global _trusted
    before, _trusted = _trusted, bool(on)
    try:
        yield
    finally:
        _trusted = before


def refusal(path, why: str) -> UntrustedInput:
    """The one-line error for ``path``, which would run code to be loaded (``why``)."""
    return UntrustedInput(f"{path}: not loaded: {why}; pass {FLAG} only if you trust whoever made it "
                          f"(docs/security.md)")


def _name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else str(obj)


def torch_load(path, allow: Iterable = (), map_location="cpu", mmap: bool = True):
    """``torch.load`` of a torch file as data: ``weights_only=True`` with the classes ``allow`` lists as well, or the
    full unpickler when ``--trust-code`` was given. A file that holds an object of any other class is refused with
    ``UntrustedInput`` naming the file and the class (nothing in it runs); every other failure (a truncated or
    foreign file) is torch's own exception."""
    import torch
    if _trusted:
        return torch.load(path, map_location=map_location, mmap=mmap, weights_only=False)
    allow = list(allow)
    try:
        with torch.serialization.safe_globals(allow):
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, {_name(a) for a in allow}) or re.findall(r"GLOBAL (\S+)", str(e))[:1]
        if not unsafe:
            raise
        more = f" (and {len(unsafe) - 1} more)" if len(unsafe) > 1 else ""
        raise refusal(path, f"it holds a pickled {unsafe[0]}{more}, not only tensors and plain data (unpickling "
                            f"it can run any code)") from None


def _unsafe_globals(path, allowed: set[str]) -> list[str]:
    """The classes and functions a torch file's pickle names beyond those ``weights_only`` loads and ``allowed``
    (read from the pickle's opcodes; nothing is unpickled)."""
    import torch
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(Path(path))
    except Exception:  # noqa: BLE001 (not a zip-format torch file: the unpickler's message names the first one)
        return []
    return [n for n in names if n not in allowed]


__all__ = ["FLAG", "UntrustedInput", "refusal", "torch_load", "trust_code", "trusted"]
