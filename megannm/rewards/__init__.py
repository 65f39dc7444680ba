"""Verifiable rewards: plain functions ``reward(prompt, sample, truth) -> float``, found by name.

A recipe selects them by name with weights (``phase.options.rewards``), either a list (weight 1 each) or a mapping::

    phase: {kind: grpo, options: {rewards: {format: 0.2, my_rewards.verifiers:image_matches_prompt: 1.0}}}

The total reward of a sample is the weighted sum. A name resolves, in this order, to:

- a function registered in this process with ``@register("name")`` (its module imported before the phase starts);
  megannm itself registers ``format`` (a well-formed answer, whatever its content);
- an installed entry point of the ``megannm.rewards`` group (a package declares
  ``[project.entry-points."megannm.rewards"] my_reward = "my_pkg.verifiers:my_reward"``; megannm's toy world
  registers its checkers this way), imported on first use;
- ``package.module:function``, imported on first use;
- an ``http://`` or ``https://`` URL: a reward server (``megannm reward-server``; ``remote.py`` has the wire format
  and the client's timeout, retries and batch size, set in the URL's ``#fragment``).

A reward may also offer ``score_batch(prompts, samples, truths) -> list[float]`` (a remote one does: one request
per batch); ``Combined.score_batch`` uses it, and calls the others sample by sample.

What a reward receives:

- ``prompt``: a ``Prompt`` (token ids, the answer kind "text" or "image", its text when it has any);
- ``sample``: a ``Sample`` (the generated ids without the stop token, decoded: ``text`` for a text answer,
  ``image`` uint8 [H, W, 3] for a complete image span, None for a malformed one);
- ``truth``: whatever the prompt source gives as the answer, as is.
"""
from __future__ import annotations

import fnmatch
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Callable, Optional

import numpy as np

RewardFn = Callable[["Prompt", "Sample", object], float]

ENTRY_POINT_GROUP = "megannm.rewards"
REGISTRY: dict[str, RewardFn] = {}


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
    # an image span of exactly the grid's codes (always true under constrained decoding); a text answer that
    # ended with a stop token rather than running out of tokens (when the sampler says so)
    well_formed: bool = True
    extra: dict = field(default_factory=dict)


def register(name: str):
    """Decorator: ``@register("my_reward")`` over ``def my_reward(prompt, sample, truth) -> float``."""
    def deco(fn: RewardFn) -> RewardFn:
        if name in REGISTRY and REGISTRY[name] is not fn:
            raise ValueError(f"rewards: {name!r} is already registered (to {REGISTRY[name].__module__})")
        REGISTRY[name] = fn
        return fn
    return deco


@register("format")
def well_formed(prompt: Prompt, sample: Sample, truth) -> float:
    """1.0 for a well-formed answer, whatever its content: an image answer is exactly one grid of image codes (what
    constrained decoding guarantees and an unconstrained sampler must learn); a text answer is not empty and was
    not cut off."""
    if sample.kind == "image":
        return float(sample.well_formed)
    return float(sample.well_formed and bool((sample.text or "").strip()))


def installed() -> dict:
    """Rewards installed as entry points of the ``megannm.rewards`` group, by name (not yet imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available() -> list[str]:
    """Every name ``get`` resolves without a module path (registered here or installed), sorted."""
    return sorted(set(REGISTRY) | set(installed()))


def get(name: str) -> RewardFn:
    """A reward by registered or installed name, ``package.module:function``, or a reward server's URL."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(("http://", "https://")):
        from megannm.rewards.remote import RemoteReward
        return RemoteReward(name)
    eps = installed()
    if name in eps or ":" in name:
        where = eps[name].value if name in eps else name
        module, _, attr = where.partition(":")
        try:
            fn = eps[name].load() if name in eps else getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"rewards: cannot import {where!r} ({type(e).__name__}: {e})") from None
        if not callable(fn):
            raise ValueError(f"rewards: {where!r} is not a function")
        return fn
    raise ValueError(f"rewards: unknown reward {name!r} (registered: {', '.join(available())}; or name a function "
                     f"as package.module:function, or a reward server by its http:// URL)")


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
    """A command line's ``my_reward,format=0.2`` -> {"my_reward": 1.0, "format": 0.2}.

    A name with ``*`` stands for every available name it matches, e.g. ``checker_*=0``: report each of a family of
    rewards beside the total without counting it (weight 0); a name given on its own keeps its own weight."""
    out: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, w = part.partition("=")
        weight = float(w) if w else 1.0
        if "*" not in name:
            out[name] = weight
            continue
        matches = [n for n in available() if fnmatch.fnmatchcase(n, name)]
        if not matches:
            raise ValueError(f"rewards: {name!r} matches no reward (registered: {', '.join(available())})")
        for n in matches:
            out.setdefault(n, weight)
    return out


class RewardError(ValueError):
    """A reward that failed or gave something other than a finite number: one line naming the reward, the sample
    and the prompt (exit 2: the reward is the user's code or server)."""


def _which(i: int, prompt: Prompt) -> str:
    text = prompt.text if len(prompt.text) <= 60 else prompt.text[:57] + "..."
    return f"on sample {i} (prompt {text!r}, a {prompt.kind} answer)" if text else \
        f"on sample {i} (a {prompt.kind} answer)"


def _number(name: str, value, i: int, prompt: Prompt) -> float:
    """``value`` as a float, or one line: a reward is a finite real number (a bool counts as 0/1)."""
    number = None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__float__"):  # numbers, numpy and 1-element tensors
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    if number is None or not np.isfinite(number):
        raise RewardError(f"rewards: {name} gave {value!r} ({type(value).__name__}) {_which(i, prompt)}: a reward is "
                          f"a finite number")
    return number


class Combined:
    """The weighted sum of several rewards; ``score`` also returns each one's value (for logging)."""

    def __init__(self, spec):
        self.weights = weights_of(spec)
        self.fns = {name: get(name) for name in self.weights}

    @property
    def names(self) -> list[str]:
        return list(self.weights)

    def score(self, prompt: Prompt, sample: Sample, truth) -> tuple[float, dict[str, float]]:
        totals, parts = self.score_batch([prompt], [sample], [truth])
        return totals[0], {n: v[0] for n, v in parts.items()}

    def score_batch(self, prompts: list[Prompt], samples: list[Sample],
                    truths: list) -> tuple[list[float], dict[str, list[float]]]:
        """Totals and each reward's values for a batch: a reward with ``score_batch`` (a reward server: one round
        trip per batch, not per sample) is called once, the others per sample. Nothing is returned unless every
        reward scored every sample."""
        parts: dict[str, list[float]] = {}
        for name, fn in self.fns.items():
            batch = getattr(fn, "score_batch", None)
            if batch is not None:
                values = batch(prompts, samples, truths)  # (a reward server's errors name the server)
            else:
                values = []
                for i, (p, s, t) in enumerate(zip(prompts, samples, truths)):
                    try:
                        values.append(fn(p, s, t))
                    except Exception as e:  # noqa: BLE001 - the user's function: one line naming it and the sample
                        raise RewardError(f"rewards: {name} raised {type(e).__name__}: {e} {_which(i, p)}") from e
            if len(values) != len(samples):
                raise RewardError(f"rewards: {name} gave {len(values)} values for {len(samples)} samples")
            parts[name] = [_number(name, v, i, p) for i, (v, p) in enumerate(zip(values, prompts))]
        totals = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(samples))]
        return totals, parts

    def __call__(self, prompt: Prompt, sample: Sample, truth) -> float:
        return self.score(prompt, sample, truth)[0]


def _is_grid(vocab, ids: list[int]) -> bool:
    return len(ids) == vocab.image_grid and all(vocab.image_start <= i < vocab.image_end for i in ids)


def make_samples(tok, rows: list[list[int]], kind: str, ended: Optional[list[bool]] = None) -> list[Sample]:
    """Decode generated rows (stop tokens removed) once for every reward: text, or the picture when a row is exactly
    one image (all of them in one batch). ``ended``: per text row, whether a stop token ended it (False: cut off at
    max_new_tokens, not well-formed); unknown = True."""
    from megannm.generate import codes_to_images, text_of
    if kind == "text":
        ended = [True] * len(rows) if ended is None else ended
        return [Sample(list(r), kind, text=text_of(tok, r), well_formed=bool(e)) for r, e in zip(rows, ended)]
    ok = [_is_grid(tok.vocab, r) for r in rows]
    good = [r for r, k in zip(rows, ok) if k]
    images = iter(np.asarray(codes_to_images(tok, good)) if good else [])
    return [Sample(list(r), kind, image=next(images) if k else None, well_formed=k) for r, k in zip(rows, ok)]
