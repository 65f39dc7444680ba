"""The toy world's verifiable rewards, and the per-attribute scoring that the toy evaluation shares with them.

- ``toy_caption`` (image -> text): the answer read back with ``world.parse_caption``; an attribute named twice with
  different values (ambiguous) or not at all scores nothing for it;
- ``toy_image`` (text -> image): the decoded picture read by the pixel checker ``world.check_image``; a malformed
  span (not exactly one grid of codes) scores 0;
- each with partial credit, a quarter per attribute right, and one variant per attribute (``toy_image_kind``,
  ``toy_caption_colour``, ...) that scores that attribute alone;
- ``toy_format``: a well-formed answer (``megannm.rewards.well_formed``) whose text, if it is text, names exactly one
  value of every attribute.

They are installed as ``megannm.rewards`` entry points (``setup.py``), so a recipe names them like any reward.
"""
from __future__ import annotations

from megannm.rewards import well_formed
from megannm.toy import world

ATTRIBUTES = world.ATTRIBUTES


def attrs_of(truth) -> dict[str, str]:
    """A toy ground truth as {attribute: value}: ``world.Attrs``, its dict, or a record ``{"attrs": {...}}``."""
    if hasattr(truth, "as_dict"):
        return truth.as_dict()
    if isinstance(truth, dict):
        return dict(truth.get("attrs", truth))
    raise ValueError(f"rewards: a toy reward needs the true attributes (got {type(truth).__name__})")


def caption_hits(text, truth) -> dict[str, bool]:
    """Attribute -> whether ``text`` names its true value (and no other)."""
    got, want = world.parse_caption(text or ""), attrs_of(truth)
    return {a: a in want and got[a] == want[a] for a in ATTRIBUTES}


def image_hits(image, truth) -> dict[str, bool]:
    """Attribute -> whether the checker reads its true value from the picture's pixels (None: no picture)."""
    if image is None:
        return dict.fromkeys(ATTRIBUTES, False)
    got, want = world.check_image(image), attrs_of(truth)
    return {a: a in want and got[a] == want[a] for a in ATTRIBUTES}


def _reward(name: str, hits, answer: str, attributes=ATTRIBUTES):
    """A reward: the fraction of ``attributes`` that ``hits`` finds right in the sample's ``answer`` field."""
    def reward(prompt, sample, truth) -> float:
        h = hits(getattr(sample, answer), truth)
        return sum(h[a] for a in attributes) / len(attributes)
    reward.__name__ = reward.__qualname__ = name
    return reward


toy_caption = _reward("toy_caption", caption_hits, "text")
toy_caption_kind = _reward("toy_caption_kind", caption_hits, "text", ("kind",))
toy_caption_colour = _reward("toy_caption_colour", caption_hits, "text", ("colour",))
toy_caption_size = _reward("toy_caption_size", caption_hits, "text", ("size",))
toy_caption_position = _reward("toy_caption_position", caption_hits, "text", ("position",))

toy_image = _reward("toy_image", image_hits, "image")
toy_image_kind = _reward("toy_image_kind", image_hits, "image", ("kind",))
toy_image_colour = _reward("toy_image_colour", image_hits, "image", ("colour",))
toy_image_size = _reward("toy_image_size", image_hits, "image", ("size",))
toy_image_position = _reward("toy_image_position", image_hits, "image", ("position",))


def toy_format(prompt, sample, truth) -> float:
    if not well_formed(prompt, sample, truth):
        return 0.0
    if sample.kind == "image":
        return 1.0
    parsed = world.parse_caption(sample.text or "")
    return float(all(parsed[a] is not None for a in ATTRIBUTES))
