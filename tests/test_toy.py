"""The toy world: fixed split, determinism, captions that parse back, and a checker that reads pixels correctly."""
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from megannm.toy import world as toy


def _accuracy(examples, images=None) -> dict[str, float]:
    """Per-attribute fraction of images whose checker reading equals the attributes they were drawn from."""
    images = [img for _, img, _ in examples] if images is None else images
    hits = dict.fromkeys(toy.ATTRIBUTES, 0)
    for (attrs, _, _), img in zip(examples, images):
        got = toy.check_image(img)
        for name in toy.ATTRIBUTES:
            hits[name] += got[name] == getattr(attrs, name)
    return {name: hits[name] / len(examples) for name in toy.ATTRIBUTES}


@pytest.fixture(scope="module")
def examples():
    return {split: toy.make_examples(1000, seed=11, split=split) for split in ("seen", "heldout")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The same small data set written twice, into two folders."""
    dirs = [tmp_path_factory.mktemp(f"toy{i}") for i in range(2)]
    return [(d, toy.write_toy_dataset(d, n_train=300, n_valid=40, seed=5, image_to_text_fraction=0.35))
            for d in dirs]


# --- the world and its split ---------------------------------------------------------------------------------------
def test_world_size_and_heldout_split():
    assert (len(toy.KINDS), len(toy.COLOURS), len(toy.SIZES), len(toy.POSITIONS)) == (4, 6, 2, 5)
    assert len(toy.ALL_COMBOS) == len(set(toy.ALL_COMBOS)) == 240
    assert len(toy.HELDOUT) == 40
    assert sum(toy.split_of(a) == "heldout" for a in toy.ALL_COMBOS) == 40
    seen = [a for a in toy.ALL_COMBOS if toy.split_of(a) == "seen"]
    assert len(seen) == 200
    # The documented rule (k + c + 2s + p) % 6 == 0: index 0 everywhere is held out, one step of colour is not.
    assert toy.split_of(toy.Attrs("circle", "red", "small", "top left")) == "heldout"
    assert toy.split_of(toy.Attrs("circle", "green", "small", "top left")) == "seen"
    # Only four-way combinations are new: every value, pair and triple of values occurs in training.
    for r in (1, 2, 3):
        for names in itertools.combinations(toy.ATTRIBUTES, r):
            every = set(itertools.product(*(toy.VALUES[n] for n in names)))
            in_seen = {tuple(getattr(a, n) for n in names) for a in seen}
            assert in_seen == every, names


def test_attrs_validate_and_sample_respects_split():
    with pytest.raises(ValueError, match="colour='pink'"):
        toy.Attrs("circle", "pink", "small", "center")
    rng = np.random.default_rng(0)
    assert all(toy.split_of(a) == "seen" for a in toy.sample_attrs(500, rng, "seen"))
    held = toy.sample_attrs(500, rng, "heldout")
    assert all(a in toy.HELDOUT for a in held) and len(set(held)) == 40  # 500 draws cover all 40
    with pytest.raises(ValueError, match="split must be one of"):
        toy.sample_attrs(1, rng, "train")


# --- determinism ---------------------------------------------------------------------------------------------------
def test_examples_are_deterministic_by_seed():
    a, b, c = (toy.make_examples(200, seed=s, split="all") for s in (3, 3, 4))
    assert [x[0] for x in a] == [x[0] for x in b]
    assert [x[2] for x in a] == [x[2] for x in b]
    assert np.stack([x[1] for x in a]).tobytes() == np.stack([x[1] for x in b]).tobytes()
    assert [x[2] for x in a] != [x[2] for x in c]


def test_render_is_one_shape_in_the_palette_with_small_jitter():
    rng = np.random.default_rng(0)
    a = toy.Attrs("square", "blue", "large", "center")
    imgs = np.stack([toy.render(a, rng) for _ in range(60)])
    assert imgs.shape == (60, 32, 32, 3) and imgs.dtype == np.uint8
    colours = {tuple(p) for p in imgs.reshape(-1, 3)}
    assert colours == {toy.BACKGROUND, toy.PALETTE["blue"]}
    assert ((imgs != 0).any(3).sum((1, 2)) == 14 * 14).all()
    tops = {int(np.nonzero((img != 0).any(2))[0][0]) for img in imgs}
    assert tops == {8, 9, 10}  # centroid 15.5 - 6.5 = 9, jittered by +-1


# --- captions ------------------------------------------------------------------------------------------------------
def test_every_caption_template_parses_back():
    rng = np.random.default_rng(0)
    texts = [(a, toy.caption(a)) for a in toy.ALL_COMBOS]
    texts += [(a, toy.caption(a, rng)) for a in toy.ALL_COMBOS for _ in range(8)]
    assert sum(toy.parse_caption(t) == a.as_dict() for a, t in texts) == len(texts) == 240 * 9
    assert len({t.split(" a ")[0] for _, t in texts}) >= 3  # several templates really are used
    assert toy.caption(toy.Attrs("cross", "cyan", "small", "center")) == "a small cyan cross in the center"


def test_parse_caption_says_none_when_absent_or_ambiguous():
    assert toy.parse_caption("") == dict.fromkeys(toy.ATTRIBUTES)
    got = toy.parse_caption("A red and blue CIRCLE at the top left or in the middle")
    assert got == {"kind": "circle", "colour": None, "size": None, "position": None}
    assert toy.parse_caption("large yellow square, bottom  right")["position"] == "bottom right"
    assert toy.parse_caption("a circled square")["kind"] == "square"  # whole words only


# --- the checker ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["seen", "heldout"])
def test_checker_reads_generated_images(examples, split):
    acc = _accuracy(examples[split])
    assert min(acc.values()) >= 0.99, acc


def test_checker_reads_every_image_the_world_can_draw():
    attrs, images = toy.every_image()
    assert images.shape == (240 * 9, 32, 32, 3)
    acc = _accuracy([(a, None, None) for a in attrs], images)
    assert min(acc.values()) >= 0.99, acc


def test_checker_returns_none_on_garbage():
    rng = np.random.default_rng(0)
    nothing = dict.fromkeys(toy.ATTRIBUTES)
    assert toy.check_image(np.zeros((32, 32, 3), np.uint8)) == nothing
    assert toy.check_image(np.full((32, 32, 3), 255, np.uint8)) == nothing
    assert toy.check_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) == nothing
    assert toy.check_image(np.zeros((16, 16, 3), np.uint8)) == nothing
    sparse = (rng.random((32, 32)) < 0.15)[..., None] * np.array(toy.PALETTE["red"], np.uint8)
    assert toy.check_image(sparse.astype(np.uint8))["kind"] is None  # red, but scattered: no shape, no place
    assert toy.check_image(sparse.astype(np.uint8))["position"] is None


def test_checker_tolerates_a_few_wrong_pixels():
    rng = np.random.default_rng(1)
    examples = toy.make_examples(300, seed=2, split="all")
    noisy = []
    for _, img, _ in examples:
        img = img.copy()
        ys, xs = rng.integers(0, 32, size=(2, 4))
        img[ys, xs] = rng.integers(0, 256, size=(4, 3))  # 4 random pixels of random colour
        noisy.append(img)
    acc = _accuracy(examples, noisy)
    assert min(acc.values()) >= 0.95, acc


# --- the written data set -------------------------------------------------------------------------------------------
def test_dataset_is_deterministic_and_well_formed(written):
    (d1, s1), (d2, _) = written
    for name in ("train", "valid_seen", "valid_heldout"):
        assert (d1 / f"{name}.jsonl").read_bytes() == (d2 / f"{name}.jsonl").read_bytes()
    images1 = sorted((d1 / "images").iterdir())
    assert len(images1) == s1["images"] == 300 + 2 * 40
    assert all(p.read_bytes() == (d2 / "images" / p.name).read_bytes() for p in images1)
    assert not list(d1.glob("*.tmp"))

    for name, n, split in (("train", 300, "seen"), ("valid_seen", 40, "seen"), ("valid_heldout", 40, "heldout")):
        records = [json.loads(line) for line in (d1 / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == s1[name]["records"] == n
        image_first = [r for r in records if "image" in r["parts"][0]]
        assert len(image_first) == s1[name]["image_to_text"] == round(0.35 * n)
        for r in records:
            attrs = toy.Attrs(**r["attrs"])
            assert toy.split_of(attrs) == split
            (text,) = [p["text"] for p in r["parts"] if "text" in p]
            (rel,) = [p["image"] for p in r["parts"] if "image" in p]
            assert toy.parse_caption(text) == attrs.as_dict()
            img = np.asarray(Image.open(d1 / rel).convert("RGB"))
            assert toy.check_image(img) == attrs.as_dict()


def test_dataset_counts(tmp_path):
    # speed belongs in benchmarks, not in a timed unit test; here only what was written
    summary = toy.write_toy_dataset(tmp_path, n_train=2000, n_valid=100, seed=0)
    assert summary["images"] == 2200


def test_scene_records_are_seen_items_whose_texts_say_what_the_pixels_show(tmp_path):
    """The compositional benchmark's training data (``megannm demo --benchmark toy-geneval``): every record of the
    training file is a seen prompt and its truth scene, or a scene and a seen question with the right answer, read
    back from the written PNG alone; the chat form holds the same kinds of items."""
    from collections import Counter
    from megannm.toy import geneval, scenes
    summary = toy.write_toy_dataset(tmp_path, n_train=150, n_valid=5, seed=0, make=geneval.training_records)
    assert summary["train"]["image_to_text"] == round(150 * 0.35) and summary["images"] == 160
    asked = Counter()
    for line in (tmp_path / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        (text,) = [p["text"] for p in r["parts"] if "text" in p]
        (rel,) = [p["image"] for p in r["parts"] if "image" in p]
        found = scenes.read_scene(np.asarray(Image.open(tmp_path / rel).convert("RGB")))
        drawn = tuple(scenes.Shape(**s) for s in r["scene"])
        assert sorted((f.kind, f.colour) for f in found) == sorted((s.kind, s.colour) for s in drawn)
        assert not geneval.colour_pair_leaks(drawn)  # no held-out colour pair, named or not
        if "spec" in r:  # caption first: the prompt as the benchmark asks it, and a drawing that satisfies it
            spec = geneval.Spec.from_dict(r["spec"])
            assert "text" in r["parts"][0] and text == spec.text() and not geneval.is_heldout(spec)
            assert geneval.satisfied(spec, found)
            asked[spec.category] += 1
        else:  # picture first: a seen question, and the answer the pixels give
            q = geneval.Question(**r["question"])
            assert "image" in r["parts"][0] and text == f"{q.question} {q.answer}"
            if q.task == "count":
                kind = next(k for k, p in geneval.PLURAL.items() if f" {p} " in q.question)
                assert q.answer == geneval.NUMBERS[sum(f.kind == kind for f in found)]
                assert (toy.KINDS.index(kind) + geneval.NUMBERS.index(q.answer)) % 3  # seen
            if q.task == "list":
                assert geneval.parse_list(q.answer) == Counter((f.colour, f.kind) for f in found)
            asked[q.task] += 1
    assert set(asked) == {*geneval.CATEGORIES, *geneval.TASKS}
    chat = geneval.chat_records(20, np.random.default_rng(1))
    assert all(r["messages"][-1]["role"] == "assistant" and ("spec" in r) != ("question" in r) for r in chat)


# --- the toy as a package the core finds by name ------------------------------------------------------------------
CORE = ("model", "data", "train", "phases", "convert", "checkpoint", "rewards", "generate.py", "evaluate.py",
        "parallel.py", "config.py", "vocab.py", "fileio.py")


def test_the_core_never_imports_the_toy():
    import ast
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "megannm"
    files = [p for c in CORE for p in ([root / c] if c.endswith(".py") else (root / c).rglob("*.py")) if p.exists()]
    assert len(files) > 20
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n == "megannm.toy" or n.startswith("megannm.toy.") for n in names), (path, node.lineno)


def test_every_toy_name_resolves_through_entry_points():
    from megannm import rewards
    from megannm.evaluate import Benchmark, get_benchmark
    from megannm.phases.rl.prompts import find_generator
    from megannm.toy import evaluate, prompts
    from megannm.toy import rewards as toy_rewards
    names = ["toy_caption", "toy_image", "toy_format"] + [f"{f}_{a}" for f in ("toy_caption", "toy_image")
                                                           for a in toy.ATTRIBUTES]
    for name in names:
        assert rewards.get(name) is getattr(toy_rewards, name)
    assert rewards.get("format") is rewards.well_formed  # the core's own
    for name in ("toy_image", "toy_caption", "toy_draw"):
        assert find_generator(name) is getattr(prompts, name)
    assert get_benchmark("toy") is evaluate.TOY and isinstance(get_benchmark("toy-chat"), Benchmark)
    with pytest.raises(ValueError,
                       match=r"unknown reward 'nope' \(registered: format, (.*, )?toy_caption, .*toy_image_size"):
        rewards.get("nope")
    with pytest.raises(ValueError, match=r"unknown benchmark 'nope' \(registered: toy, toy-chat"):
        get_benchmark("nope")


def test_rewards_and_the_evaluation_share_one_scoring():
    from megannm.rewards import Prompt, Sample, get, parse_weights
    from megannm.toy.evaluate import score_captions, score_images
    ex = toy.make_examples(40, seed=3, split="all")
    truths = [a for a, _, _ in ex]
    captions = [toy.caption(a if i % 3 else toy.Attrs(a.kind, "red" if a.colour != "red" else "blue", a.size,
                                                      a.position)) for i, a in enumerate(truths)]
    images = [img if i % 4 else np.zeros_like(img) for i, (_, img, _) in enumerate(ex)]
    for attr in toy.ATTRIBUTES:
        cap, im = get(f"toy_caption_{attr}"), get(f"toy_image_{attr}")
        assert score_captions(captions, truths)[attr] == pytest.approx(
            np.mean([cap(Prompt([], "text"), Sample([], "text", text=c), t) for c, t in zip(captions, truths)]))
        assert score_images(images, truths)[attr] == pytest.approx(
            np.mean([im(Prompt([], "image"), Sample([], "image", image=x), t) for x, t in zip(images, truths)]))
    # the generic format reward knows nothing of the toy grammar; toy_format does
    assert get("format")(Prompt([], "text"), Sample([], "text", text="a shape somewhere"), None) == 1.0
    assert get("format")(Prompt([], "text"), Sample([], "text", text="a", well_formed=False), None) == 0.0
    assert get("format")(Prompt([], "text"), Sample([], "text", text=" "), None) == 0.0
    assert get("toy_format")(Prompt([], "text"), Sample([], "text", text="a shape somewhere"), None) == 0.0
    # a family of rewards by wildcard, each reported at weight 0 beside the total
    assert parse_weights("toy_image,toy_image_*=0") == {"toy_image": 1.0, "toy_image_colour": 0.0,
                                                        "toy_image_kind": 0.0, "toy_image_position": 0.0,
                                                        "toy_image_size": 0.0}


def test_toy_prompts_are_a_pure_function_of_the_generator(toy_data):
    from megannm.data.tokenize import Tokenizers
    from megannm.toy import prompts
    tok = Tokenizers.load(toy_data["tokenizers"])
    v = tok.vocab
    for name, kind in (("toy_image", "image"), ("toy_caption", "text"), ("toy_draw", "image")):
        make = getattr(prompts, name)
        a = make(tok, 6, np.random.default_rng(4), "heldout")
        assert a == make(tok, 6, np.random.default_rng(4), "heldout")
        assert all(it.prompt.kind == kind and toy.split_of(it.truth) == "heldout" for it in a)
        assert all(it.prompt.ids[0] == v.bos_id for it in a)
        assert all((it.prompt.ids[-1] == v.boi_id) == (kind == "image") for it in a)
        assert all(it.chat == (name == "toy_draw") for it in a)
    assert toy.parse_caption(prompts.toy_image(tok, 1, np.random.default_rng(0))[0].prompt.text) == \
        prompts.toy_image(tok, 1, np.random.default_rng(0))[0].truth.as_dict()


def test_one_sampling_constructor():
    from megannm.generate import SamplingConfig
    assert SamplingConfig.from_options() == SamplingConfig(greedy=True, temperature=0.0)
    assert SamplingConfig.from_options(temperature=0.7, top_k=5, top_p=0.9, seed=3) == SamplingConfig(
        greedy=False, temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert not SamplingConfig.from_options(temperature=1.0, greedy=False).greedy
