"""A compositional toy benchmark in GenEval's categories, with its checker as a verifiable reward.

GenEval (Ghosh et al. 2023) scores text -> image models by detecting objects in the pictures they draw for
templated prompts in six categories. Here the objects are the toy world's shapes on the 64 px scene canvas
(``scenes.py``) and the detector is the exact pixel checker ``scenes.read_scene``:

=============  ==================================  ======================================================
category       prompt                              a drawing is right when the checker finds
=============  ==================================  ======================================================
single_object  "a circle"                          a circle
two_object     "a circle and a square"             a circle and a square
counting       "three triangles"                   exactly three triangles
colors         "a red cross"                       a cross, and every cross red
position       "a circle left of a square"         a circle whose centroid is >= 8 px left of a square's
               "a circle above a square"           (or above it)
color_attr     "a red circle and a blue square"    a circle and a square, every circle red, every square blue
=============  ==================================  ======================================================

A drawing must also be a clean scene, one to four shapes each read whole (no unreadable blob). Scores are binary
per prompt; a category's score is its fraction of prompts right and ``overall`` the mean of the six, as GenEval
reports. The understanding direction asks questions about a scene (image -> text): ``count`` ("how
many circles are there?" -> "two"), ``list`` ("what shapes are there?" -> "two red circles and a blue square") and
``relation`` ("is the red circle left of the blue square?" -> "yes").

**Seen and held-out.** Each category holds out a fixed sixth to a third of its combinations (``is_heldout``;
indices into the world's value lists): for two_object the pair {triangle, cross}; for counting (kind, number) with
(kind + number) % 3 == 0; for colors (kind, colour) with (kind + colour) % 4 == 0; for position (A, B, relation)
with (A + 2 B + relation) % 5 == 0; for color_attr the two (kind, colour) objects, in kind order, with
(kA + cA + 2 (kB + cB)) % 6 == 0. Every value and every smaller combination stays seen, so the held-out
split asks for new compositions only. Single objects have nothing to hold out and belong to both splits. Training
data for this benchmark should draw from ``seen`` only; the questions follow the same rules (a count question by
(kind, answer), a relation question by its kinds and relation, a list question by every pair of its objects).

Registered as the ``toy_geneval`` reward (both directions: an image answer is checked against its ``Spec``, a text
answer against its ``Question``), the ``toy_geneval`` (text -> image) and ``toy_geneval_qa`` (image -> text)
prompt generators, and the ``toy-geneval`` benchmark of ``megannm evaluate``, which works with any checkpoint whose
image tokenizer has a square native size that is a multiple of 64 (the canvas is upscaled to it).
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from megannm.evaluate import Benchmark, sample_grid
from megannm.generate import SamplingConfig, codes_to_images, generate, image_prompt, text_of
from megannm.phases.rl.prompts import PromptItem
from megannm.rewards import Prompt, Sample
from megannm.toy import scenes, world
from megannm.toy.scenes import Found, Scene

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
TASKS = ("count", "list", "relation")  # the understanding direction
SPLITS = ("seen", "heldout")
RELATIONS = ("left of", "above")
NUMBERS = ("zero", "one", "two", "three", "four")
COUNTS = (2, 3, 4)  # counting prompts, as GenEval's
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
RELATION_MARGIN = 8.0  # px between centroids for "left of" / "above"; rendered truth has >= 14


# ---------------------------------------------------------------------------------------------------------------
# What a prompt asks for
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    kind: str
    colour: Optional[str] = None  # None: any colour

    def words(self) -> str:
        return f"{self.colour} {self.kind}" if self.colour else self.kind


@dataclass(frozen=True)
class Spec:
    """A text -> image prompt: its category, the objects it names (in the prompt's order), the count (counting)
    and the relation (position: objects[0] RELATION objects[1])."""
    category: str
    objects: tuple[Obj, ...]
    count: int = 1
    relation: Optional[str] = None

    def text(self) -> str:
        o = self.objects
        if self.category == "counting":
            return f"{NUMBERS[self.count]} {PLURAL[o[0].kind]}"
        if self.category == "position":
            return f"a {o[0].words()} {self.relation} a {o[1].words()}"
        return " and ".join(f"a {x.words()}" for x in o)

    def as_dict(self) -> dict:
        return {"category": self.category, "objects": [[x.kind, x.colour] for x in self.objects],
                "count": self.count, "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> "Spec":
        return cls(d["category"], tuple(Obj(k, c) for k, c in d["objects"]), int(d.get("count", 1)),
                   d.get("relation"))


@dataclass(frozen=True)
class Question:
    """An image -> text item: the task, the question asked after the picture and the reference answer."""
    task: str
    question: str
    answer: str

    def as_dict(self) -> dict:
        return {"task": self.task, "question": self.question, "answer": self.answer}


Truth = Union[Spec, Question]


def truth_of(truth) -> Truth:
    """A ``Spec`` or ``Question``, also from its dict (what a reward server receives)."""
    if isinstance(truth, (Spec, Question)):
        return truth
    if isinstance(truth, dict) and "category" in truth:
        return Spec.from_dict(truth)
    if isinstance(truth, dict) and "task" in truth:
        return Question(truth["task"], truth.get("question", ""), truth["answer"])
    raise ValueError(f"rewards: toy_geneval needs a Spec or Question as the truth (got {type(truth).__name__}); "
                     f"use the toy_geneval or toy_geneval_qa prompts")


# ---------------------------------------------------------------------------------------------------------------
# Seen and held-out combinations
# ---------------------------------------------------------------------------------------------------------------
def _k(kind: str) -> int:
    return world.KINDS.index(kind)


def _c(colour: str) -> int:
    return world.COLOURS.index(colour)


def _pair_heldout(a: Obj, b: Obj) -> bool:
    """color_attr's rule over two coloured objects of different kinds, in canonical (kind index) order."""
    (ka, ca), (kb, cb) = sorted([(_k(a.kind), _c(a.colour)), (_k(b.kind), _c(b.colour))])
    return (ka + ca + 2 * (kb + cb)) % 6 == 0


def is_heldout(spec: Spec) -> bool:
    """Whether training must never show this combination (see the module docstring for the rules)."""
    o, cat = spec.objects, spec.category
    if cat == "two_object":
        return _k(o[0].kind) + _k(o[1].kind) == 5
    if cat == "counting":
        return (_k(o[0].kind) + spec.count) % 3 == 0
    if cat == "colors":
        return (_k(o[0].kind) + _c(o[0].colour)) % 4 == 0
    if cat == "position":
        return (_k(o[0].kind) + 2 * _k(o[1].kind) + RELATIONS.index(spec.relation)) % 5 == 0
    if cat == "color_attr":
        return _pair_heldout(o[0], o[1])
    return False  # single_object: a kind alone is never new


def all_specs(category: str) -> list[Spec]:
    """Every prompt of a category (ordered pairs: "a circle and a square" and "a square and a circle" both)."""
    K, C = world.KINDS, world.COLOURS
    pairs = [(a, b) for a in K for b in K if a != b]
    made = {
        "single_object": lambda: [Spec(category, (Obj(k),)) for k in K],
        "two_object": lambda: [Spec(category, (Obj(a), Obj(b))) for a, b in pairs],
        "counting": lambda: [Spec(category, (Obj(k),), n) for k in K for n in COUNTS],
        "colors": lambda: [Spec(category, (Obj(k, c),)) for k in K for c in C],
        "position": lambda: [Spec(category, (Obj(a), Obj(b)), relation=r) for a, b in pairs for r in RELATIONS],
        "color_attr": lambda: [Spec(category, (Obj(a, ca), Obj(b, cb))) for a, b in pairs for ca in C for cb in C],
    }
    if category not in made:
        raise ValueError(f"toy-geneval: unknown category {category!r} (expected one of {', '.join(CATEGORIES)})")
    return made[category]()


def specs_of(category: str, split: str) -> list[Spec]:
    if split not in (*SPLITS, "all"):
        raise ValueError(f"toy-geneval: split must be seen, heldout or all (got {split!r})")
    every = all_specs(category)
    if split == "all" or category == "single_object":
        return every
    return [s for s in every if is_heldout(s) == (split == "heldout")]


def sample_specs(n: int, rng: np.random.Generator, split: str = "seen",
                 categories: tuple[str, ...] = CATEGORIES) -> list[Spec]:
    """``n`` prompts: a category uniformly, then a prompt of the split uniformly within it."""
    pools = {c: specs_of(c, split) for c in categories}
    cats = [categories[i] for i in rng.integers(len(categories), size=n)]
    return [pools[c][int(rng.integers(len(pools[c])))] for c in cats]


# ---------------------------------------------------------------------------------------------------------------
# The truth of a prompt, and the check of a drawing
# ---------------------------------------------------------------------------------------------------------------
def _relation_places(relation: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Slot pairs (a, b) with a's slot wholly left of (or above) b's, so that the relation is never borderline."""
    every = [(r, c) for r in range(scenes.PLACES) for c in range(scenes.PLACES)]
    axis = 1 if relation == "left of" else 0
    gap = scenes.SLOT // scenes.LATTICE
    return [(a, b) for a in every for b in every if b[axis] - a[axis] >= gap]


_PLACES = {r: _relation_places(r) for r in RELATIONS}


def truth_scene(spec: Spec, rng: np.random.Generator) -> Scene:
    """A scene that is exactly the prompt: its objects (unnamed colours and every size drawn at random)."""
    objs = spec.objects * spec.count if spec.category == "counting" else spec.objects
    attrs = [scenes.random_attrs(rng, kind=o.kind, colour=o.colour) for o in objs]
    where = None
    if spec.category == "position":
        places = _PLACES[spec.relation]
        where = list(places[int(rng.integers(len(places)))])
    return scenes.place(attrs, rng, where)


def holds(relation: str, a: Found, b: Found) -> bool:
    """``a`` RELATION ``b`` by centroids, with a margin (a shape beside another is neither above nor below it)."""
    if relation == "left of":
        return b.x - a.x >= RELATION_MARGIN
    return b.y - a.y >= RELATION_MARGIN


def satisfied(spec: Spec, found: list[Found]) -> bool:
    """Whether the shapes the checker found are what the prompt asks for (the table in the module docstring), in
    a clean scene: one to four shapes, each read whole. Without that rule a soup of patches (what an untrained
    model draws) holds dozens of blobs, some of which pass for any shape asked for."""
    if not 1 <= len(found) <= scenes.MAX_SHAPES or any(None in (f.kind, f.colour, f.size) for f in found):
        return False
    of = lambda kind: [f for f in found if f.kind == kind]  # noqa: E731
    o = spec.objects
    if spec.category == "counting":
        return len(of(o[0].kind)) == spec.count
    if spec.category == "position":
        return any(holds(spec.relation, a, b) for a in of(o[0].kind) for b in of(o[1].kind))
    # single_object, two_object, colors, color_attr: every named kind present, and in its colour when one is named
    return all(of(x.kind) and (x.colour is None or all(f.colour == x.colour for f in of(x.kind))) for x in o)


# ---------------------------------------------------------------------------------------------------------------
# Understanding: questions about a scene, and their answers checked
# ---------------------------------------------------------------------------------------------------------------
def describe(scene: Scene) -> str:
    """The list answer: identical shapes counted, in reading order ("two red circles and a blue square")."""
    order = sorted(scene, key=lambda s: (s.row, s.col))
    groups = Counter((s.colour, s.kind) for s in order)
    words = [f"a {c} {k}" if n == 1 else f"{NUMBERS[n]} {c} {PLURAL[k]}" for (c, k), n in groups.items()]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _ask_count(scene: Scene, rng) -> tuple[Question, bool]:
    kind = world.KINDS[int(rng.integers(len(world.KINDS)))]
    n = sum(s.kind == kind for s in scene)
    return Question("count", f"how many {PLURAL[kind]} are there?", NUMBERS[n]), (_k(kind) + n) % 3 == 0


def _ask_list(scene: Scene, rng) -> tuple[Question, bool]:
    objs = [Obj(s.kind, s.colour) for s in scene]
    held = any(_pair_heldout(a, b) for i, a in enumerate(objs) for b in objs[i + 1:] if a.kind != b.kind)
    return Question("list", "what shapes are there?", describe(scene)), held


def _ask_relation(scene: Scene, rng) -> Optional[tuple[Question, bool]]:
    """A yes/no question about two shapes that the scene names uniquely (by colour and kind) and that are wholly
    apart along the relation's axis; None when the scene has no such pair."""
    names = Counter((s.colour, s.kind) for s in scene)
    unique = [s for s in scene if names[(s.colour, s.kind)] == 1]
    gap = scenes.SLOT // scenes.LATTICE
    options = [(a, b, r) for a in unique for b in unique if a is not b for r in RELATIONS
               if abs((b.col - a.col) if r == "left of" else (b.row - a.row)) >= gap]
    if not options:
        return None
    a, b, r = options[int(rng.integers(len(options)))]
    yes = ((b.col - a.col) if r == "left of" else (b.row - a.row)) > 0
    q = Question("relation", f"is the {a.colour} {a.kind} {r} the {b.colour} {b.kind}?", "yes" if yes else "no")
    return q, (_k(a.kind) + 2 * _k(b.kind) + RELATIONS.index(r)) % 5 == 0


_ASK = {"count": _ask_count, "list": _ask_list, "relation": _ask_relation}


def sample_questions(n: int, rng: np.random.Generator, split: str = "seen",
                     tasks: tuple[str, ...] = TASKS) -> list[tuple[Scene, Question]]:
    """``n`` (scene, question) items: a task uniformly, then random scenes until one's question is of the split
    (bounded: every task finds one of either split within a few draws)."""
    if split not in (*SPLITS, "all"):
        raise ValueError(f"toy-geneval: split must be seen, heldout or all (got {split!r})")
    out = []
    for t in (tasks[i] for i in rng.integers(len(tasks), size=n)):
        for _ in range(1000):
            scene = scenes.random_scene(rng, int(rng.integers(2 if t == "relation" else 1, scenes.MAX_SHAPES + 1)))
            asked = _ASK[t](scene, rng)
            if asked is not None and (split == "all" or asked[1] == (split == "heldout")):
                out.append((scene, asked[0]))
                break
        else:
            raise RuntimeError(f"toy-geneval: no {split} {t} question in 1000 scenes")
    return out


_NUMBER_RE = re.compile(r"\b(" + "|".join(NUMBERS) + r"|\d+)\b")
_YESNO_RE = re.compile(r"\b(yes|no)\b")
_KIND_WORDS = "|".join(list(world.KINDS) + list(PLURAL.values()))
_ITEM_RE = re.compile(r"\b(?:(a|an|one|two|three|four|\d+)\s+)?(" + "|".join(world.COLOURS) + r")\s+(" + _KIND_WORDS
                      + r")\b")
_SINGULAR = {p: k for k, p in PLURAL.items()}


def _number(word: str) -> int:
    return int(word) if word.isdigit() else {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBERS)}}[word]


def parse_list(text: str) -> Counter:
    """(colour, kind) -> how many, from a list answer; a bare "red circle" counts one."""
    out: Counter = Counter()
    for num, colour, kind in _ITEM_RE.findall(text.lower()):
        out[(colour, _SINGULAR.get(kind, kind))] += _number(num) if num else 1
    return out


def answer_correct(q: Question, text: str) -> bool:
    """Whether an answer says what the reference says: the one number named (count), the one of yes/no (relation),
    the same shapes with the same multiplicities (list). Naming two different numbers, or both yes and no, is
    wrong."""
    text = (text or "").lower()
    if q.task == "count":
        said = {_number(w) for w in _NUMBER_RE.findall(text)}
        return said == {_number(q.answer)}
    if q.task == "relation":
        return set(_YESNO_RE.findall(text)) == {q.answer}
    return parse_list(text) == parse_list(q.answer)


# ---------------------------------------------------------------------------------------------------------------
# The reward and the prompt generators (entry points, setup.py)
# ---------------------------------------------------------------------------------------------------------------
def toy_geneval(prompt, sample, truth) -> float:
    """1.0 when the answer is right: a drawing that the checker finds to be the prompt (``satisfied``), or a text
    answer that says what the reference says (``answer_correct``); 0.0 otherwise (also for a malformed image)."""
    t = truth_of(truth)
    if isinstance(t, Question):
        return float(answer_correct(t, sample.text or ""))
    if sample.image is None:
        return 0.0
    return float(satisfied(t, scenes.read_scene(sample.image)))


def image_side(tok) -> int:
    """The tokenizer's native side if it holds the scene canvas (square, a multiple of 64), else one clear line."""
    h, w = tok.image_size()
    if h != w or h % scenes.CANVAS:
        raise ValueError(f"toy-geneval: the image tokenizer's native size is {h}x{w}; the scenes need a square size "
                         f"that is a multiple of {scenes.CANVAS} (e.g. a patch_vq trained on megannm.toy.scenes "
                         f"renders)")
    return h


def generation_prompts(tok, n: int, rng: np.random.Generator, split: str = "seen") -> list[PromptItem]:
    """``toy_geneval``: n text -> image prompts over the six categories; the truth of each is its ``Spec``."""
    image_side(tok)  # a drawing must decode to something the checker can read
    return [_drawing_item(tok, s) for s in sample_specs(n, rng, split)]


def _drawing_item(tok, spec: Spec) -> PromptItem:
    """``<bos> prompt <boi>``: the model continues with the picture."""
    return PromptItem(Prompt(image_prompt(tok, spec.text()), "image", spec.text()), spec)


def question_prompts(tok, n: int, rng: np.random.Generator, split: str = "seen") -> list[PromptItem]:
    """``toy_geneval_qa``: n image -> text items ``<bos> <boi> scene <eoi> question``; the truth is the
    ``Question``."""
    return _question_items(tok, sample_questions(n, rng, split))


def _question_items(tok, items: list[tuple[Scene, Question]]) -> list[PromptItem]:
    """The prompts of (scene, question) items, the scenes encoded in one batch. The question is encoded as a text
    part of its own, as ``megannm.data.tokenize`` encodes a record's parts, so that a model trained on records
    ``[image, "question answer"]`` sees the same ids."""
    if not items:
        return []
    side, v = image_side(tok), tok.vocab
    codes = v.image_ids(tok.image.encode(np.stack([scenes.render(s, side) for s, _ in items]))).tolist()
    return [PromptItem(Prompt([v.bos_id, v.boi_id, *c, v.eoi_id, *tok.text_ids(q.question)], "text", q.question), q)
            for c, (_, q) in zip(codes, items)]


# ---------------------------------------------------------------------------------------------------------------
# Training data: the benchmark's own items of one split, both directions
# ---------------------------------------------------------------------------------------------------------------
DRAW_REQUEST = "draw {}"  # the chat form of a drawing prompt (SFT); plain records use the prompt itself


def colour_pair_leaks(scene: Scene) -> bool:
    """Whether two shapes of different kinds form a held-out color_attr pair. A seen two_object, position or counting
    prompt leaves colours unnamed, and a question's scene is random; drawn at random they could show (and a relation
    question name) "a red circle and a blue square" of a held-out pair, so seen training scenes are redrawn until
    they do not. (Stricter, no held-out prompt of any category satisfied anywhere in the pixels, would keep only 5%
    of four-shape scenes; the benchmark's seen/held-out rules are per prompt and question.)"""
    return any(a.kind != b.kind and _pair_heldout(Obj(a.kind, a.colour), Obj(b.kind, b.colour))
               for i, a in enumerate(scene) for b in scene[i + 1:])


def question_example(rng: np.random.Generator, split: str) -> tuple[Scene, Question]:
    """A question item for training: ``sample_questions``' own draw of the split, and for seen, redrawn while its
    scene holds a held-out colour pair (a relation question names two coloured shapes; the pixels show them all)."""
    for _ in range(100):
        (scene, q), = sample_questions(1, rng, split)
        if split != "seen" or not colour_pair_leaks(scene):
            return scene, q
    raise RuntimeError(f"toy-geneval: no clean {split} question scene in 100 draws")


def drawing_example(spec: Spec, rng: np.random.Generator, split: str) -> Scene:
    """The truth scene of a prompt for training (seen: no held-out colour pair among unnamed colours; bounded)."""
    for _ in range(100):
        scene = truth_scene(spec, rng)
        if split != "seen" or not colour_pair_leaks(scene):
            return scene
    raise RuntimeError(f"toy-geneval: no clean truth scene for {spec.text()!r} in 100 draws")


def training_records(n: int, rng: np.random.Generator, split: str = "seen", image_to_text_fraction: float = 0.35,
                     chat: bool = False) -> list[dict]:
    """``n`` records for ``world.write_toy_dataset(make=...)`` from the benchmark's own items of ``split``: exactly
    ``round(n * image_to_text_fraction)`` put a scene first with one of its questions and the answer
    (``question_example``: count, list (the scene described), relation), the others a prompt of the six
    categories (``sample_specs``, its text as the benchmark asks it) first and its truth scene. ``chat``: the same
    items as conversations for SFT (the user asks, "draw ..." or the scene and the question; the assistant answers).
    Each record keeps its ``scene`` and its ``spec`` or ``question`` for reading."""
    first = np.zeros(n, bool)
    first[rng.permutation(n)[:round(n * image_to_text_fraction)]] = True
    specs = iter(sample_specs(int(n - first.sum()), rng, split))
    out = []
    for understanding in first:
        if understanding:
            scene, q = question_example(rng, split)
            img = scenes.render(scene)
            if chat:
                messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                                         {"type": "text", "text": q.question}]},
                            {"role": "assistant", "content": [{"type": "text", "text": q.answer}]}]
                record = {"messages": messages}
            else:
                record = {"parts": [{"image": img}, {"text": f"{q.question} {q.answer}"}]}
            record["question"] = q.as_dict()
        else:
            spec = next(specs)
            scene = drawing_example(spec, rng, split)
            img = scenes.render(scene)
            if chat:
                record = {"messages": [{"role": "user", "content": [{"type": "text",
                                                                      "text": DRAW_REQUEST.format(spec.text())}]},
                                       {"role": "assistant", "content": [{"type": "image", "image": img}]}]}
            else:
                record = {"parts": [{"text": spec.text()}, {"image": img}]}
            record["spec"] = spec.as_dict()
        record["scene"] = [s.as_dict() for s in scene]
        out.append(record)
    return out


def chat_records(n: int, rng: np.random.Generator, split: str = "seen", image_to_text_fraction: float = 0.35
                 ) -> list[dict]:
    """``training_records`` as conversations (SFT)."""
    return training_records(n, rng, split, image_to_text_fraction, chat=True)


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------
Draw = Callable[[list[PromptItem]], np.ndarray]  # prompts -> uint8 pictures [n, S, S, 3]
Answer = Callable[[list[PromptItem]], list[str]]  # prompts -> text answers


@dataclass
class Scored:
    """Binary scores of one split's items, grouped by category (or task)."""
    right: dict = field(default_factory=dict)  # group -> list of 0/1

    def table(self, groups: tuple[str, ...]) -> dict:
        out = {g: float(np.mean(self.right[g])) if self.right.get(g) else None for g in groups}
        have = [x for x in out.values() if x is not None]
        out["overall"] = float(np.mean(have)) if have else None  # GenEval's overall: the mean of the categories
        return out


def score_drawings(items: list[PromptItem], images) -> Scored:
    """The reward's own scoring of drawn pictures, grouped by category."""
    s = Scored()
    for it, img in zip(items, images):
        s.right.setdefault(it.truth.category, []).append(toy_geneval(it.prompt, Sample([], "image", image=img),
                                                                     it.truth))
    return s


def score_answers(items: list[PromptItem], answers: list[str]) -> Scored:
    """The reward's own scoring of text answers, grouped by task."""
    s = Scored()
    for it, text in zip(items, answers):
        s.right.setdefault(it.truth.task, []).append(toy_geneval(it.prompt, Sample([], "text", text=text), it.truth))
    return s


def evaluate_geneval(model, tok, n: int = 50, seed: int = 0, cfg_scale: float = 1.0, temperature: float = 0.0,
                     max_new_tokens: int = 32, out_dir=None, draw: Optional[Draw] = None,
                     answer: Optional[Answer] = None) -> dict:
    """Per split: ``n`` prompts per category (text -> image) and ``n`` questions per task (image -> text), sampled
    from the model (or from ``draw`` / ``answer``: a test draws the truth), scored by the ``toy_geneval`` reward.
    Report: ``generation`` and ``understanding``, each split -> group -> fraction right, plus ``overall``."""
    t0 = time.time()
    side = image_side(tok)
    sampling = SamplingConfig.from_options(temperature=temperature, seed=seed)
    v = tok.vocab
    draw = draw or (lambda items: codes_to_images(tok, generate(model, v, [it.prompt.ids for it in items], "image",
                                                                sampling=sampling, cfg_scale=cfg_scale)))
    answer = answer or (lambda items: [text_of(tok, r) for r in generate(
        model, v, [it.prompt.ids for it in items], "text", max_new_tokens=max_new_tokens, sampling=sampling)])
    report = {"generation": {}, "understanding": {}, "n": n, "seed": seed, "cfg_scale": cfg_scale,
              "temperature": temperature, "image_side": side}
    shown = []
    for k, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, k])
        gen = [_drawing_item(tok, s) for c in CATEGORIES for s in sample_specs(n, rng, split, (c,))]
        drawn = np.asarray(draw(gen))
        report["generation"][split] = score_drawings(gen, drawn).table(CATEGORIES)
        qa = _question_items(tok, [x for t in TASKS for x in sample_questions(n, rng, split, (t,))])
        report["understanding"][split] = score_answers(qa, answer(qa)).table(TASKS)
        shown.append([(drawn[i], f"draw ({split}):", gen[i].prompt.text) for i in range(0, len(gen), max(n, 1))])
    report["wall_seconds"] = round(time.time() - t0, 1)
    if out_dir is not None:
        sample_grid(shown, Path(out_dir) / "samples.png", per_row=len(CATEGORIES))
    return report


def format_geneval(report: dict) -> str:
    f = lambda x: "   -   " if x is None else f"{x:7.3f}"  # noqa: E731
    lines = [f"{'toy-geneval':22s}" + "".join(f"{s:>8s}" for s in SPLITS)]
    for title, key, groups in (("text -> image", "generation", CATEGORIES), ("image -> text", "understanding", TASKS)):
        lines.append(title)
        for g in (*groups, "overall"):
            lines.append(f"  {g:20s}" + "".join(f" {f(report[key][s][g])}" for s in SPLITS))
    lines.append(f"({report['n']} per category or task and split; seed {report['seed']}; {report['wall_seconds']} s)")
    return "\n".join(lines)


def _run(model, tok, a, out: Path) -> dict:
    return evaluate_geneval(model, tok, n=50 if a.n is None else a.n, seed=0 if a.seed is None else a.seed,
                            cfg_scale=a.cfg_scale, temperature=a.temperature, max_new_tokens=a.max_new_tokens,
                            out_dir=out)


TOY_GENEVAL = Benchmark(_run, format_geneval, None,
                        "toy-geneval: GenEval's six categories on toy scenes of one to four shapes (text -> image) "
                        "and count/list/relation questions (image -> text), seen and held-out combinations (--n per "
                        "category and split, default 50; --seed 0; --max-new-tokens for answers)")
