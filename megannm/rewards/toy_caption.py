"""image -> text: the generated caption (or answer) read back with ``toy.parse_caption`` and checked against the
true attributes. Partial credit: a quarter per attribute named correctly; an attribute named twice with different
values (ambiguous) or not at all scores nothing for it. One variant per attribute (``toy_caption_kind``, ...)."""
from __future__ import annotations

from megannm.data import toy
from megannm.rewards import attrs_of, register


def score(text: str, truth, attributes=toy.ATTRIBUTES) -> float:
    got, want = toy.parse_caption(text or ""), attrs_of(truth)
    return sum(got[a] == want[a] for a in attributes) / len(attributes)


@register("toy_caption")
def toy_caption(prompt, sample, truth) -> float:
    return score(sample.text, truth)


def _one(attr: str):
    def reward(prompt, sample, truth) -> float:
        return score(sample.text, truth, (attr,))
    reward.__name__ = f"toy_caption_{attr}"
    return reward


for _a in toy.ATTRIBUTES:
    register(f"toy_caption_{_a}")(_one(_a))
