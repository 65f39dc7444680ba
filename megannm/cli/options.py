"""Argument types for the command lines: a value out of its range is refused by argparse itself, with the option's
name and the range in one line (``megannm generate: error: argument --top-p: ...``, exit 2), before anything loads.

``int_at_least(1)`` and friends are plain argparse ``type=`` callables; the message says what was expected and
what was given.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(kind: type, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'} (got {text!r})") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number (got {text!r})")
    return value


def int_at_least(low: int, note: str = "") -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{note} (got {value})")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = False, note: str = "") -> Callable[[str], float]:
    """A finite number in [low, high] (``low_open``: (low, high])."""
    def parse(text: str) -> float:
        value = _number(float, text)
        if value < low or (low_open and value == low) or value > high:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != math.inf else \
                f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if high != math.inf else ''}{span}{note} (got {text})")
        return value
    parse.__name__ = "number"
    return parse


def power_of_two(text: str) -> int:
    """A power of two >= 1 (a downsampling factor: each level of the network halves the side)."""
    value = _number(int, text)
    if value < 1 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two: 1, 2, 4, 8, ... (got {value})")
    return value
