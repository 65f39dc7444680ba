"""The toy world's prompt generators for RL phases and tools (``megannm.prompts`` entry points, ``setup.py``).

Each is ``make(tok, n, rng, split) -> list[PromptItem]`` (``megannm.phases.rl.prompts``): ``n`` attribute
combinations drawn from ``split`` with the numpy generator ``rng``, the truth of each prompt being its
``world.Attrs`` (what the toy rewards check):

- ``toy_image``: a caption in one of the caption templates -> the model draws the picture;
- ``toy_caption``: a picture -> the model captions it;
- ``toy_draw``: a chat turn "draw a ..." -> the assistant answers with the picture.
"""
from __future__ import annotations

import numpy as np

from megannm.generate import chat_prompt, image_prompt
from megannm.phases.rl.prompts import PromptItem
from megannm.rewards import Prompt
from megannm.toy import chat, world


def _user(text: str) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def toy_image(tok, n: int, rng: np.random.Generator, split: str = "seen") -> list[PromptItem]:
    attrs = world.sample_attrs(n, rng, split)
    texts = [world.caption(a, rng) for a in attrs]
    return [PromptItem(Prompt(image_prompt(tok, t), "image", t), a) for t, a in zip(texts, attrs)]


def toy_caption(tok, n: int, rng: np.random.Generator, split: str = "seen") -> list[PromptItem]:
    v = tok.vocab
    attrs = world.sample_attrs(n, rng, split)
    # all pictures through the image tokenizer in one batch
    codes = v.image_ids(tok.image.encode(np.stack([world.render(a, rng) for a in attrs]))).tolist()
    return [PromptItem(Prompt([v.bos_id, v.boi_id, *c, v.eoi_id], "text"), a) for c, a in zip(codes, attrs)]


def toy_draw(tok, n: int, rng: np.random.Generator, split: str = "seen") -> list[PromptItem]:
    attrs = world.sample_attrs(n, rng, split)
    texts = [chat.draw_instruction(a, int(rng.integers(len(chat.DRAW)))) for a in attrs]
    return [PromptItem(Prompt(chat_prompt(tok, [_user(t)], "image"), "image", t), a, chat=True)
            for t, a in zip(texts, attrs)]
