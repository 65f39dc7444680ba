"""Chat data from the toy world (SFT): questions about a picture, instructions to draw, multi-turn edits.

Every conversation is generated from ``toy.Attrs``, so every answer has a ground truth:

* ``qa``: the user shows a picture and asks about one attribute ("what colour is the shape?"); the assistant answers
  with the value ("it is blue"). Most ask more questions, one per turn, about the same picture (multi-turn, the image
  stays in the context): 1 to 4 questions in random order;
* ``draw``: "draw a small blue triangle at the top left" -> the assistant answers with the picture;
* ``edit``: a drawing turn, then "now make it red" -> the assistant answers with the edited picture (two assistant
  images); or the user gives a picture and the edit in one turn.

Records are the chat layout of ``megannm.data.tokenize`` (``{"messages": [{"role", "content": [parts]}]}``; image
parts ``{"type": "image", "image": "images/000012.png"}`` relative to the JSONL file) plus ``task``/``attrs`` for
reading. Training uses seen combinations only (every picture of a training conversation, edited ones included);
``eval_items`` gives prompts for ``megannm.toy.evaluate.evaluate_chat`` whose target combination is from one split.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from megannm.fileio import atomic_write
from megannm.toy import world as toy

QUESTIONS = {
    "colour": ("what colour is the shape?", "which colour is it?"),
    "kind": ("what shape is it?", "what kind of shape is this?"),
    "size": ("how big is it?", "is it small or large?"),
    "position": ("where is it?", "where is the shape?"),
}
DRAW = ("draw a {size} {colour} {kind} {where}", "please draw a {size} {colour} {kind} {where}",
        "can you draw a {size} {colour} {kind} {where}?")
TASK_WEIGHTS = {"qa": 0.6, "draw": 0.25, "edit": 0.15}  # of training conversations


def answer(attr: str, a: toy.Attrs) -> str:
    """The ground-truth short answer to a question about ``attr`` ("it is blue", "it is at the top left"): the value
    in the captions' own words (the same tokens pretraining taught); ``toy.parse_caption`` reads it back."""
    if attr == "kind":
        return f"it is a {a.kind}"
    if attr == "position":
        return f"it is {toy.where_phrase(a.position)}"
    return f"it is {getattr(a, attr)}"


def draw_instruction(a: toy.Attrs, k: int = 0) -> str:
    return DRAW[k % len(DRAW)].format(size=a.size, colour=a.colour, kind=a.kind, where=toy.where_phrase(a.position))


def edit_instruction(attr: str, value: str) -> str:
    if attr == "kind":
        return f"now make it a {value}"
    if attr == "position":
        return "now move it to the center" if value == "center" else f"now move it to the {value}"
    return f"now make it {value}"  # colour, size


def edited(a: toy.Attrs, attr: str, value: str) -> toy.Attrs:
    return replace(a, **{attr: value})


# ---------------------------------------------------------------------------------------------------------------
# conversations with pictures in memory (an image part holds a uint8 [H, W, 3] array until written)


def _user(*parts) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def _assistant(part) -> dict:
    return {"role": "assistant", "content": [part if isinstance(part, dict) else {"type": "text", "text": part}]}


def _img(img: np.ndarray) -> dict:
    return {"type": "image", "image": img}


def _other_value(attr: str, current: str, rng: np.random.Generator, split: str, a: toy.Attrs) -> str | None:
    """A different value of ``attr`` such that the edited combination is in ``split`` (None if there is none)."""
    values = [v for v in toy.VALUES[attr] if v != current and toy.split_of(edited(a, attr, v)) == split]
    return values[int(rng.integers(len(values)))] if values else None


def conversation(task: str, rng: np.random.Generator, split: str = "seen") -> dict:
    """One conversation of ``task`` whose pictures are all of ``split`` (for training: "seen")."""
    a = toy.sample_attrs(1, rng, split)[0]
    if task == "qa":
        attrs = [str(x) for x in rng.permutation(toy.ATTRIBUTES)[:1 + int(rng.integers(len(toy.ATTRIBUTES)))]]
        q = lambda attr: QUESTIONS[attr][int(rng.integers(len(QUESTIONS[attr])))]
        msgs = [_user(_img(toy.render(a, rng)), q(attrs[0])), _assistant(answer(attrs[0], a))]
        for attr in attrs[1:]:
            msgs += [_user(q(attr)), _assistant(answer(attr, a))]
        return {"task": task, "attrs": a.as_dict(), "asked": attrs, "messages": msgs}
    if task == "draw":
        msgs = [_user(draw_instruction(a, int(rng.integers(len(DRAW))))), _assistant(_img(toy.render(a, rng)))]
        return {"task": task, "attrs": a.as_dict(), "messages": msgs}
    if task == "edit":
        while True:  # an attribute with another value that keeps the edited picture in the split
            attr = str(rng.choice(toy.ATTRIBUTES))
            value = _other_value(attr, getattr(a, attr), rng, split, a)
            if value is not None:
                break
        b = edited(a, attr, value)
        if rng.random() < 0.5:  # draw, then edit the drawing
            msgs = [_user(draw_instruction(a, int(rng.integers(len(DRAW))))), _assistant(_img(toy.render(a, rng))),
                    _user(edit_instruction(attr, value)), _assistant(_img(toy.render(b, rng)))]
        else:  # edit a given picture
            msgs = [_user(_img(toy.render(a, rng)), edit_instruction(attr, value)),
                    _assistant(_img(toy.render(b, rng)))]
        return {"task": task, "attrs": b.as_dict(), "source": a.as_dict(), "edited": attr, "messages": msgs}
    raise ValueError(f"toy chat: unknown task {task!r} (expected one of {', '.join(TASK_WEIGHTS)})")


def make_conversations(n: int, seed: int, split: str = "seen") -> list[dict]:
    """``n`` conversations, tasks drawn by ``TASK_WEIGHTS``; a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    tasks = rng.choice(list(TASK_WEIGHTS), size=n, p=list(TASK_WEIGHTS.values()))
    return [conversation(str(t), rng, split) for t in tasks]


# ---------------------------------------------------------------------------------------------------------------
# evaluation prompts


@dataclass
class EvalItem:
    """A prompt (the conversation up to the assistant turn to generate) and what the answer must be.

    task "qa": ``attr`` asked, the answer is text naming ``truth``'s value; "draw"/"edit": the answer is a picture
    of ``truth`` (for an edit ``attr`` is the attribute the instruction changed)."""
    task: str
    split: str
    messages: list
    truth: toy.Attrs
    attr: str | None = None

    @property
    def answer_kind(self) -> str:
        return "text" if self.task == "qa" else "image"


def eval_items(n_per_task: int, seed: int, split: str, n_per_question: int | None = None) -> list[EvalItem]:
    """Single-question QA (``n_per_question`` per question type, default ``n_per_task``; cheap to generate),
    ``n_per_task`` drawings and ``n_per_task`` edits, every target from ``split``.
    The edit prompt shows the ground-truth first picture in the assistant's first turn (teacher forcing), so the
    score is about following the edit, not about the first drawing."""
    rng = np.random.default_rng([seed, ("seen", "heldout").index(split)])
    items = []
    for attr in toy.ATTRIBUTES:
        for a in toy.sample_attrs(n_per_task if n_per_question is None else n_per_question, rng, split):
            q = QUESTIONS[attr][int(rng.integers(len(QUESTIONS[attr])))]
            items.append(EvalItem("qa", split, [_user(_img(toy.render(a, rng)), q)], a, attr))
    for a in toy.sample_attrs(n_per_task, rng, split):  # the plain template: prompts of few lengths, few buckets
        items.append(EvalItem("draw", split, [_user(draw_instruction(a))], a))
    for b in toy.sample_attrs(n_per_task, rng, split):
        attr = str(rng.choice(toy.ATTRIBUTES))
        # the source picture (b is the edit's target): from the same split where one exists (a held-out target's
        # sources are always seen: changing one attribute never keeps the held-out rule)
        values = [v for v in toy.VALUES[attr] if v != getattr(b, attr)]
        same = [v for v in values if toy.split_of(edited(b, attr, v)) == split]
        values = same or values
        a = edited(b, attr, values[int(rng.integers(len(values)))])
        msgs = [_user(draw_instruction(a)), _assistant(_img(toy.render(a, rng))),
                _user(edit_instruction(attr, getattr(b, attr)))]
        items.append(EvalItem("edit", split, msgs, b, attr))
    return items


# ---------------------------------------------------------------------------------------------------------------
# files


def _to_record(conv: dict, out_dir: Path, counter: list, pngs: dict, digits: int) -> dict:
    msgs = []
    for m in conv["messages"]:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                rel = f"images/c{counter[0]:0{digits}d}.png"
                counter[0] += 1
                atomic_write(out_dir / rel, toy.png_bytes(p["image"], pngs))
                p = {"type": "image", "image": rel}
            parts.append(p)
        msgs.append({"role": m["role"], "content": parts})
    return {**{k: v for k, v in conv.items() if k != "messages"}, "messages": msgs}


def write_toy_chat(out_dir, n_train: int, n_valid: int, seed: int, n_eval: int = 25) -> dict:
    """Write ``train.jsonl`` (seen combinations), ``valid.jsonl`` (seen, for the validation loss) and the evaluation
    prompts ``eval_seen.jsonl`` / ``eval_heldout.jsonl`` (``n_eval`` drawings and edits, ``2 * n_eval`` questions
    per question type; the same generator as ``megannm evaluate --benchmark toy-chat``, another seed; a prompt's
    ``messages`` stop before the assistant turn to generate, ``answer`` holds the truth) with PNGs under
    ``out_dir/images``. A pure function of ``seed``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    counter, pngs = [0], {}
    digits = max(6, len(str(3 * (n_train + n_valid + 10 * n_eval))))
    summary: dict = {"out_dir": str(out_dir), "seed": seed}
    for name, n, s in (("train", n_train, seed), ("valid", n_valid, seed + 1)):
        convs = make_conversations(n, s)
        records = [_to_record(c, out_dir, counter, pngs, digits) for c in convs]
        atomic_write(out_dir / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
        summary[name] = {"records": n, **{t: sum(c["task"] == t for c in convs) for t in TASK_WEIGHTS}}
    for split in ("seen", "heldout"):
        items = eval_items(n_eval, seed + 2, split, 2 * n_eval)
        lines = []
        for it in items:
            rec = _to_record({"messages": it.messages}, out_dir, counter, pngs, digits)
            lines.append(json.dumps({"task": it.task, "split": split, "attr": it.attr, "answer_kind": it.answer_kind,
                                     "answer": it.truth.as_dict(), "messages": rec["messages"]}) + "\n")
        atomic_write(out_dir / f"eval_{split}.jsonl", "".join(lines).encode())
        summary[f"eval_{split}"] = len(items)
    summary["images"] = counter[0]
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
