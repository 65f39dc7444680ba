"""Verifiable rewards: plain functions ``reward(prompt, sample, truth) -> float`` in a small registry by name.

A recipe selects them by name with weights (``phase.options.rewards``), either a list (weight 1 each) or a mapping::

    phase: {kind: grpo, options: {rewards: {toy_image: 1.0, format: 0.2}}}

The total reward of a sample is the weighted sum. Built in: ``toy_caption`` and ``toy_image`` (partial credit, a
quarter per attribute right) plus one variant per attribute (``toy_image_kind``, ``toy_caption_colour``, ...) and
``format`` (a well-formed answer). A user adds a reward in a file of their own either with ``@register("name")``
(imported before the phase starts) or by naming it ``"package.module:function"`` in the recipe, which is imported
on first use.

What a reward receives:

- ``prompt``: a ``Prompt`` (token ids, the answer kind "text" or "image", its text when it has any);
- ``sample``: a ``Sample`` (the generated ids without the stop token, decoded: ``text`` for a text answer,
  ``image`` uint8 [H, W, 3] for a complete image span, None for a malformed one);
- ``truth``: whatever the prompt source gives as the answer (for the toy world a ``toy.Attrs`` or its dict).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

RewardFn = Callable[["Prompt", "Sample", object], float]

REGISTRY: dict[str, RewardFn] = {}
_BUILTIN_MODULES = ("megannm.rewards.toy_caption", "megannm.rewards.toy_image", "megannm.rewards.format")


@dataclass
class Prompt:
    ids: list[int]
    kind: str  # the answer's modality: "text" or "image"
    text: str = ""  # the prompt's text, when it has any (for reading and logging)


@dataclass
class Sample:
    ids: list[int]  # generated ids, stop token excluded
    kind: str  # "text" or "image"
    text: Optional[str] = None  # decoded text answer
    image: Optional[np.ndarray] = None  # decoded picture; None when the span is not exactly one image
    well_formed: bool = True  # an image span of exactly the grid's codes (always true under constrained decoding)
    extra: dict = field(default_factory=dict)


def register(name: str):
    """Decorator: ``@register("my_reward")`` over ``def my_reward(prompt, sample, truth) -> float``."""
    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY and REGISTRY[name] is not fn:
            raise ValueError(f"rewards: {name!r} is already registered (to {REGISTRY[name].__module__})")
        REGISTRY[name] = fn
        return fn
    return deco


def _load_builtins() -> None:
    for m in _BUILTIN_MODULES:
        importlib.import_module(m)


def get(name: str) -> RewardFn:
    """A reward by registered name, or ``package.module:function``."""
    _load_builtins()
    if name in REGISTRY:
        return REGISTRY[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"rewards: cannot import {name!r} ({type(e).__name__}: {e})") from None
        if not callable(fn):
            raise ValueError(f"rewards: {name!r} is not a function")
        return fn
    raise ValueError(f"rewards: unknown reward {name!r} (registered: {', '.join(sorted(REGISTRY))}; or name a "
                     f"function as package.module:function)")


def weights_of(spec) -> dict[str, float]:
    """``[a, b]`` or ``{a: w, b: w}`` -> {name: weight}."""
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, dict):
        out = {str(k): float(v) for k, v in spec.items()}
    else:
        out = {str(k): 1.0 for k in spec}
    if not out:
        raise ValueError("rewards: at least one reward is needed")
    return out


def parse_weights(text: str) -> dict[str, float]:
    """A command line's ``toy_image,format=0.2`` -> {"toy_image": 1.0, "format": 0.2}."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, w = part.partition("=")
        out[name] = float(w) if w else 1.0
    return out


class Combined:
    """The weighted sum of several rewards; ``score`` also returns each one's value (for logging)."""

    def __init__(self, spec):
        self.weights = weights_of(spec)
        self.fns = {name: get(name) for name in self.weights}

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def score(self, prompt: Prompt, sample: Sample, truth) -> tuple[float, dict[str, float]]:
        parts = {name: float(fn(prompt, sample, truth)) for name, fn in self.fns.items()}
        return sum(self.weights[n] * v for n, v in parts.items()), parts

    def __call__(self, prompt: Prompt, sample: Sample, truth) -> float:
        return self.score(prompt, sample, truth)[0]


def attrs_of(truth) -> dict[str, str]:
    """A toy ground truth as {attribute: value}: ``toy.Attrs``, its dict, or a record ``{"attrs": {...}}``."""
    if hasattr(truth, "as_dict"):
        return truth.as_dict()
    if isinstance(truth, dict):
        return dict(truth.get("attrs", truth))
    raise ValueError(f"rewards: a toy reward needs the true attributes (got {type(truth).__name__})")


def make_sample(tok, ids: list[int], kind: str) -> Sample:
    """Decode generated ids once for every reward: text, or the picture when the span is exactly one image."""
    v = tok.vocab
    if kind == "text":
        from megannm.generate import text_of
        return Sample(list(ids), kind, text=text_of(tok, ids))
    ok = len(ids) == v.image_grid and all(v.image_start <= i < v.image_end for i in ids)
    image = None
    if ok:
        from megannm.generate import codes_to_images
        image = np.asarray(codes_to_images(tok, [list(ids)]))[0]
    return Sample(list(ids), kind, image=image, well_formed=ok)


def make_samples(tok, rows: list[list[int]], kind: str) -> list[Sample]:
    """``make_sample`` over many rows, with every complete picture decoded in one batch."""
    if kind == "text":
        return [make_sample(tok, r, kind) for r in rows]
    from megannm.generate import codes_to_images
    v = tok.vocab
    ok = [len(r) == v.image_grid and all(v.image_start <= i < v.image_end for i in r) for r in rows]
    good = [r for r, k in zip(rows, ok) if k]
    images = iter(np.asarray(codes_to_images(tok, good)) if good else [])
    return [Sample(list(r), kind, image=next(images) if k else None, well_formed=k) for r, k in zip(rows, ok)]
