"""text -> image: the generated codes decoded by the image tokenizer and read by the toy pixel checker
(``toy.check_image``). Partial credit: a quarter per attribute the checker reads as the prompt's true value; a
malformed span (not exactly one grid of codes) scores 0. One variant per attribute (``toy_image_kind``, ...)."""
from __future__ import annotations

from megannm.data import toy
from megannm.rewards import attrs_of, register


def score(image, truth, attributes=toy.ATTRIBUTES) -> float:
    if image is None:
        return 0.0
    got, want = toy.check_image(image), attrs_of(truth)
    return sum(got[a] == want[a] for a in attributes) / len(attributes)


@register("toy_image")
def toy_image(prompt, sample, truth) -> float:
    return score(sample.image, truth)


def _one(attr: str):
    def reward(prompt, sample, truth) -> float:
        return score(sample.image, truth, (attr,))
    reward.__name__ = f"toy_image_{attr}"
    return reward


for _a in toy.ATTRIBUTES:
    register(f"toy_image_{_a}")(_one(_a))
