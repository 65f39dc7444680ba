"""The text tokenizer: a byte-level BPE trained on the spot, saved as a standard Hugging Face tokenizer folder.

Byte-level, so that any string encodes (no unknown token: every byte is in the base alphabet) and decodes back to
exactly itself, spaces included. It has no special tokens and no post-processor: megannm's specials (``<bos>``,
``<boi>``, roles, ...) live in the unified vocabulary (``megannm/vocab.py``), after the image codes, and the text
tokenizer must never insert ids of its own into a sequence.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megannm.fileio import atomic_output, atomic_write_json

REQUIRED_FILE = "tokenizer.json"
# the characters of the texts a BPE was trained on (megannm's own record beside the tokenizer's files): a byte-level
# BPE encodes any string, so only this says which characters the tokenizer (and a model trained on its ids) has seen
CHARACTERS_FILE = "megannm_characters.json"


def train_text_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE of at most ``vocab_size`` tokens on ``texts`` and save it to ``out_dir``.

    ``vocab_size`` is a ceiling: on a small corpus BPE runs out of merges earlier (the toy captions give ~330-350,
    of which 256 are the byte alphabet); the real size is ``len(load_text_tokenizer(out_dir))``. ``out_dir``
    appears whole or not at all (``fileio.atomic_output``; a folder already there is replaced). Deterministic: the
    same texts give the same ``tokenizer.json`` bytes.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 256:
        raise ValueError(f"train_text_tokenizer: vocab_size must exceed the 256-byte alphabet, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the first word keeps no invented leading space, so decode(encode(t)) == t exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    seen: set[str] = set()

    def noting(texts):
        for t in texts:
            seen.update(t)
            yield t

    tok.train_from_iterator(noting(texts), trainer=trainer)

    out_dir = Path(out_dir)
    with atomic_output(out_dir, overwrite=True) as tmp:
        try:
            PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False).save_pretrained(tmp)
        except Exception as e:  # the Rust writer's I/O errors arrive as a bare Exception("... (os error 28)")
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
        _portable_class_name(tmp / "tokenizer_config.json")
        atomic_write_json(tmp / CHARACTERS_FILE, {"characters": "".join(sorted(seen))})
    return out_dir


def seen_characters(folder) -> frozenset | None:
    """The characters a tokenizer folder's BPE was trained on, when megannm trained it (None: unknown)."""
    path = Path(folder) / CHARACTERS_FILE
    try:
        return frozenset(json.loads(path.read_text())["characters"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _portable_class_name(config: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast``: transformers 5 writes its new name ``TokenizersBackend``, which
    transformers 4 (still allowed by setup.py, and what a user of an exported model may have) cannot resolve;
    the old name resolves in both."""
    cfg = json.loads(config.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(config, cfg, sort_keys=True)


def load_text_tokenizer(folder):
    """Load a tokenizer folder (ours, or any Hugging Face folder with a ``tokenizer.json``) offline."""
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    if not (folder / REQUIRED_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a text tokenizer folder (no {REQUIRED_FILE})")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # a corrupt json surfaces as several different exception types
        raise ValueError(f"{folder / REQUIRED_FILE}: cannot load text tokenizer ({type(e).__name__}: {e})") from None


def text_digest(folder) -> str:
    """sha256 (hex) of the folder's ``tokenizer.json``: the text half of the vocabulary fingerprint."""
    path = Path(folder) / REQUIRED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{Path(folder)}: not a text tokenizer folder (no {REQUIRED_FILE})")
    return hashlib.sha256(path.read_bytes()).hexdigest()
