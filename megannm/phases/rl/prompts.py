"""Prompt sources for RL phases and tools (GRPO rollouts, DPO pair building, scoring).

A source is named in a recipe (``phase.options.prompts``) or on the command line, and is one of:

- a JSONL file of prompt records (``JsonlPrompts``): ``{"parts": [...]}`` or ``{"messages": [...]}``, with
  ``"answer_kind": "text"|"image"`` and ``"answer"`` (the truth, handed to the rewards as is);
- a registered generator, found by name in the ``megannm.prompts`` entry-point group (a package declares
  ``[project.entry-points."megannm.prompts"] my_prompts = "my_pkg.prompts:make"``; megannm's own toy world registers
  ``toy_image``, ``toy_caption`` and ``toy_draw`` this way);
- ``package.module:function``, imported on first use.

A generator is ``make(tok, n, rng, split) -> list[PromptItem]``: ``n`` prompts drawn with the numpy generator
``rng`` from the split (``seen``, ``heldout`` or ``all``) it understands.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megannm.rewards import Prompt

ENTRY_POINT_GROUP = "megannm.prompts"

PromptGenerator = Callable[..., list["PromptItem"]]


@dataclass
class PromptItem:
    prompt: Prompt
    truth: object
    chat: bool = False  # a chat prompt: a text answer ends with <|end|>


class JsonlPrompts:
    """Prompts from a JSONL file: ``{"parts": [...]}`` (plain) or ``{"messages": [...]}`` (chat, up to the turn to
    answer), ``"answer_kind": "text"|"image"`` and ``"answer"``. Image paths are relative to the file."""

    def __init__(self, path: str, key: str = "phase.options.prompts"):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{key}: {path}: prompt file not found")
        self.records = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{n}: not valid JSON ({e.msg})") from None
            if r.get("answer_kind") not in ("text", "image"):
                raise ValueError(f"{self.path}:{n}: answer_kind must be 'text' or 'image' (got "
                                 f"{r.get('answer_kind')!r})")
            self.records.append((r, f"{self.path}:{n}"))
        if not self.records:
            raise ValueError(f"{self.path}: no prompts in the file")

    def __len__(self) -> int:
        return len(self.records)

    def take(self, tok, indices: list[int]) -> list[PromptItem]:
        from megannm.data.tokenize import encode_records
        v = tok.vocab
        chosen = [self.records[i % len(self.records)] for i in indices]
        docs = encode_records([r for r, _ in chosen], tok, self.path.parent, [w for _, w in chosen])
        out = []
        for (r, _), (ids, _) in zip(chosen, docs):
            ids = ids[:-1].tolist()  # drop <eos>: the prompt continues
            chat = "messages" in r
            if chat:
                ids.append(v.special("<|assistant|>"))
            if r["answer_kind"] == "image":
                ids.append(v.boi_id)
            out.append(PromptItem(Prompt(ids, r["answer_kind"]), r.get("answer"), chat=chat))
        return out


def registered() -> dict[str, object]:
    """Installed prompt generators by name (entry points of the ``megannm.prompts`` group, not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def find_generator(name: str, key: str = "phase.options.prompts") -> Optional[PromptGenerator]:
    """The generator ``name`` stands for, or None when ``name`` is a file path."""
    eps = registered()
    if name in eps:
        return eps[name].load()
    if ":" in name and not Path(name).exists():
        module, _, func = name.partition(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{key}: cannot import prompt generator {name!r} ({e})") from None
    if Path(name).suffix in (".jsonl", ".json") or Path(name).exists():
        return None
    known = ", ".join(sorted(eps)) or "none installed"
    raise ValueError(f"{key}: unknown prompt source {name!r} (expected a JSONL file, package.module:function, or "
                     f"a registered name: {known})")


class PromptSource:
    """A named source with one way to draw prompts: ``draw(tok, n, seed_parts, split)``.

    A generator draws ``n`` fresh prompts from ``np.random.default_rng(seed_parts)``; a JSONL file walks a seeded
    permutation of its records, epoch after epoch, from the ``first`` prompt index."""

    def __init__(self, name: str, key: str = "phase.options.prompts"):
        self.name = name
        self.generator = find_generator(name, key)
        self.file = None if self.generator is not None else JsonlPrompts(name, key)

    def sample(self, tok, n: int, rng_seed, split: str = "seen") -> list[PromptItem]:
        """``n`` prompts from a generator seeded by ``rng_seed`` (an int or a list of ints), or the file's first
        ``n`` records."""
        if self.generator is not None:
            return self.generator(tok, n, np.random.default_rng(rng_seed), split)
        return self.file.take(tok, list(range(n)))

    def walk(self, tok, first: int, n: int, seed: int, rng_seed, split: str = "seen") -> list[PromptItem]:
        """Prompts ``first .. first + n`` of an endless stream: a generator's fresh draws from ``rng_seed``, or a
        file's records in a permutation seeded by (seed, epoch)."""
        if self.generator is not None:
            return self.generator(tok, n, np.random.default_rng(rng_seed), split)
        total = len(self.file)
        epoch = first // total
        order = np.random.default_rng([seed, epoch]).permutation(total)
        return self.file.take(tok, [int(order[(first + k) % total]) for k in range(n)])
