"""Well-formedness, whatever the content: an image answer is exactly one grid of image codes (what constrained
decoding guarantees, and what an unconstrained sampler must learn); a text answer is a caption the toy grammar
parses, i.e. ``toy.parse_caption`` finds exactly one value of every attribute. 1.0 or 0.0."""
from __future__ import annotations

from megannm.data import toy
from megannm.rewards import register


@register("format")
def well_formed(prompt, sample, truth) -> float:
    if sample.kind == "image":
        return float(sample.well_formed)
    parsed = toy.parse_caption(sample.text or "")
    return float(all(parsed[a] is not None for a in toy.ATTRIBUTES))
