"""The compositional toy benchmark: scenes, the pixel checker (exact on rendered scenes), GenEval's categories with
seen and held-out combinations, the understanding questions, the reward and prompt generators, and the
``megannm evaluate --benchmark toy-geneval`` table on a tiny random checkpoint (perfect drawings score 1.0)."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

from megannm.toy import geneval, scenes, world
from megannm.toy.geneval import Obj, Spec
from megannm.toy.scenes import Found


def _truth(scene):
    return sorted((s.kind, s.colour, s.size, *s.centre()) for s in scene)


def _read(img):
    return sorted((f.kind, f.colour, f.size, f.y, f.x) for f in scenes.read_scene(img))


# ---------------------------------------------------------------------------------------------------------------------
# scenes and the checker


def test_checker_reads_every_shape_of_random_scenes_exactly():
    rng = np.random.default_rng(0)
    for n in range(400):
        scene = scenes.random_scene(rng, n % scenes.MAX_SHAPES + 1)
        assert len(scene) == n % scenes.MAX_SHAPES + 1
        assert _read(scenes.render(scene)) == _truth(scene), scene
    for size in (128, 256):  # upscaled for a larger image tokenizer, and read back at the canvas
        scene = scenes.random_scene(rng, 4)
        assert scenes.render(scene, size).shape == (size, size, 3)
        assert _read(scenes.render(scene, size)) == _truth(scene)


def test_scenes_keep_shapes_apart_and_on_the_canvas():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = scenes.random_scene(rng, 4)
        for i, a in enumerate(scene):
            top, left, side = a.box()
            assert 0 <= top and top + side <= scenes.CANVAS and 0 <= left and left + side <= scenes.CANVAS
            for b in scene[i + 1:]:
                assert scenes.slots_apart((a.row, a.col), (b.row, b.col))
    with pytest.raises(ValueError, match="a scene holds 1 to 4 shapes"):
        scenes.place([], rng)
    with pytest.raises(ValueError, match="does not hold the 64 px canvas"):
        scenes.render(scene, 96)


def test_checker_says_none_or_nothing_where_it_cannot_read():
    assert scenes.read_scene(np.zeros((64, 64, 3), np.uint8)) == []
    assert scenes.read_scene(np.zeros((32, 32, 3), np.uint8)) == []  # not a scene canvas
    img = np.zeros((64, 64, 3), np.uint8)
    img[2:4, 2:4] = world.PALETTE["red"]  # 4 px of noise: not a shape
    img[20:50, 20:50] = world.PALETTE["blue"]  # 900 px: something, but no known shape
    (big,) = scenes.read_scene(img)
    assert (big.kind, big.colour, big.size) == (None, None, None) and abs(big.y - 34.5) < 1e-6
    rng = np.random.default_rng(2)
    scene = scenes.place([("square", "green", "large")], rng)
    img = scenes.render(scene)
    top, left, _ = scene[0].box()
    img[top + 3:top + 6, left + 3:left + 6] = world.PALETTE["red"]  # a few wrong pixels inside: still a square
    (f,) = scenes.read_scene(img)
    assert (f.kind, f.colour, f.size) == ("square", "green", "large")


# ---------------------------------------------------------------------------------------------------------------------
# GenEval's categories


def test_every_prompt_is_satisfied_by_its_truth_and_not_by_near_misses():
    rng = np.random.default_rng(3)
    for category in geneval.CATEGORIES:
        specs = geneval.all_specs(category)
        for spec in (specs if len(specs) < 50 else [specs[i] for i in rng.choice(len(specs), 50, replace=False)]):
            found = scenes.read_scene(scenes.render(geneval.truth_scene(spec, rng)))
            assert geneval.satisfied(spec, found), (spec.text(), found)

    def drawn(*shapes, where=None):
        return scenes.read_scene(scenes.render(scenes.place(list(shapes), rng, where)))

    red_circle, blue_square = ("circle", "red", "small"), ("square", "blue", "large")
    assert geneval.satisfied(Spec("counting", (Obj("circle"),), 2), drawn(red_circle, red_circle))
    assert not geneval.satisfied(Spec("counting", (Obj("circle"),), 3), drawn(red_circle, red_circle))
    assert not geneval.satisfied(Spec("two_object", (Obj("circle"), Obj("cross"))), drawn(red_circle, blue_square))
    assert not geneval.satisfied(Spec("colors", (Obj("circle", "blue"),)), drawn(red_circle))
    # attribute binding: the right colours on the wrong shapes is wrong
    attr = Spec("color_attr", (Obj("circle", "red"), Obj("square", "blue")))
    assert geneval.satisfied(attr, drawn(red_circle, blue_square))
    assert not geneval.satisfied(attr, drawn(("circle", "blue", "small"), ("square", "red", "large")))
    left = Spec("position", (Obj("circle"), Obj("square")), relation="left of")
    assert geneval.satisfied(left, drawn(red_circle, blue_square, where=[(3, 0), (3, 4)]))
    assert not geneval.satisfied(left, drawn(red_circle, blue_square, where=[(3, 4), (3, 0)]))
    assert not geneval.satisfied(left, drawn(red_circle, blue_square, where=[(0, 3), (4, 3)]))  # above, not left
    assert geneval.satisfied(Spec("position", (Obj("circle"), Obj("square")), relation="above"),
                             drawn(red_circle, blue_square, where=[(0, 3), (4, 3)]))
    # a drawing must be a clean scene: a circle beside an unreadable blob, or among five shapes, is not "a circle"
    blob = scenes.render(scenes.place([red_circle], rng, [(0, 0)]))
    blob[30:60, 30:60] = world.PALETTE["green"]
    assert not geneval.satisfied(Spec("single_object", (Obj("circle"),)), scenes.read_scene(blob))
    five = [Found("circle", "red", "small", 8.0 * i, 8.0) for i in range(5)]
    assert not geneval.satisfied(Spec("single_object", (Obj("circle"),)), five)
    assert geneval.satisfied(Spec("single_object", (Obj("circle"),)), five[:4])
    assert [s.text() for s in (attr, left, Spec("counting", (Obj("cross"),), 3))] == [
        "a red circle and a blue square", "a circle left of a square", "three crosses"]


def test_held_out_combinations_are_new_compositions_of_seen_parts():
    for category in geneval.CATEGORIES:
        seen, held = geneval.specs_of(category, "seen"), geneval.specs_of(category, "heldout")
        if category == "single_object":
            assert seen == held == geneval.all_specs(category)
            continue
        assert held and seen and not set(seen) & set(held)
        assert set(seen) | set(held) == set(geneval.all_specs(category))
        assert 1 / 6 <= len(held) / (len(seen) + len(held)) <= 1 / 3, category
        # the parts of a held-out prompt appear in seen prompts: its objects (kind with colour), or for colors,
        # where the object is the whole combination, its kind and its colour
        part = (lambda o: [o.kind, o.colour]) if category == "colors" else (lambda o: [o])
        seen_parts = {x for s in seen for o in s.objects for x in part(o)}
        assert all(x in seen_parts for s in held for o in s.objects for x in part(o)), category
    assert {s.count for s in geneval.specs_of("counting", "seen")} == set(geneval.COUNTS)
    pairs = {frozenset(o.kind for o in s.objects) for s in geneval.specs_of("position", "seen")}
    assert len(pairs) == 6  # every pair of kinds is seen in some relation
    assert all(geneval.is_heldout(s) for s in geneval.sample_specs(30, np.random.default_rng(0), "heldout")
               if s.category != "single_object")


def test_questions_and_their_answers():
    rng = np.random.default_rng(4)
    for split in ("seen", "heldout"):
        items = geneval.sample_questions(60, rng, split)
        assert {q.task for _, q in items} == set(geneval.TASKS)
        for scene, q in items:
            assert geneval.answer_correct(q, q.answer), q
            if q.task == "count":
                kind = next(k for k, p in geneval.PLURAL.items() if f" {p} " in q.question)
                assert geneval.NUMBERS.index(q.answer) == sum(s.kind == kind for s in scene)
            if q.task == "list":
                assert sum(geneval.parse_list(q.answer).values()) == len(scene)
    count = geneval.Question("count", "how many circles are there?", "two")
    assert geneval.answer_correct(count, "there are 2 circles") and not geneval.answer_correct(count, "two or three")
    rel = geneval.Question("relation", "is the red circle left of the blue square?", "no")
    assert geneval.answer_correct(rel, "no, it is not") and not geneval.answer_correct(rel, "yes and no")
    lst = geneval.Question("list", "what shapes are there?", "two red circles and a blue square")
    assert geneval.answer_correct(lst, "a blue square, a red circle and a red circle")
    assert not geneval.answer_correct(lst, "a red circle and a blue square")
    assert geneval.parse_list("three green crosses and a cyan triangle") == Counter(
        {("green", "cross"): 3, ("cyan", "triangle"): 1})


def test_the_reward_scores_both_directions_and_reads_its_truth_from_json():
    from megannm.rewards import Prompt, Sample, get
    assert get("toy_geneval") is geneval.toy_geneval
    rng = np.random.default_rng(5)
    spec = Spec("color_attr", (Obj("triangle", "yellow"), Obj("cross", "purple")))
    img = scenes.render(geneval.truth_scene(spec, rng))
    p = Prompt([], "image", spec.text())
    for truth in (spec, json.loads(json.dumps(spec.as_dict()))):
        assert get("toy_geneval")(p, Sample([], "image", image=img), truth) == 1.0
    assert geneval.toy_geneval(p, Sample([], "image", image=np.zeros_like(img)), spec) == 0.0
    assert geneval.toy_geneval(p, Sample([], "image", image=None, well_formed=False), spec) == 0.0
    q = geneval.Question("count", "how many crosses are there?", "one")
    assert geneval.toy_geneval(Prompt([], "text"), Sample([], "text", text="one"), q.as_dict()) == 1.0
    assert geneval.toy_geneval(Prompt([], "text"), Sample([], "text", text="four"), q) == 0.0
    with pytest.raises(ValueError, match="toy_geneval needs a Spec or Question"):
        geneval.toy_geneval(p, Sample([], "image", image=img), {"kind": "circle"})


# ---------------------------------------------------------------------------------------------------------------------
# prompts and the benchmark over a tokenizer bundle that holds the canvas


@pytest.fixture(scope="module")
def scene_tok(tmp_path_factory):
    """A tokenizer bundle for scenes: a small BPE over the benchmark's texts, a lossless 8 px patch_vq."""
    from megannm.data.image_tokenizer import PatchVQ
    from megannm.data.text_tokenizer import train_text_tokenizer
    from megannm.data.tokenize import Tokenizers
    out = tmp_path_factory.mktemp("scene_tok")
    rng = np.random.default_rng(6)
    texts = [s.text() for c in geneval.CATEGORIES for s in geneval.all_specs(c)[:40]]
    texts += [f"{q.question} {q.answer}" for _, q in geneval.sample_questions(100, rng, "all")]
    images = np.stack([scenes.render(scenes.random_scene(rng)) for _ in range(300)])
    PatchVQ.train(images, codebook_size=1024, patch=8).save(out / "vq.npz")
    Tokenizers.build(train_text_tokenizer(texts, out / "text", vocab_size=300), out / "vq.npz").save(out / "tok")
    return out / "tok"


def test_prompt_generators_are_registered_and_refuse_a_tokenizer_without_the_canvas(scene_tok):
    from megannm.data.tokenize import Tokenizers
    from megannm.evaluate import get_benchmark
    from megannm.phases.rl.prompts import find_generator
    tok = Tokenizers.load(scene_tok)
    v = tok.vocab
    assert find_generator("toy_geneval") is geneval.generation_prompts
    assert find_generator("toy_geneval_qa") is geneval.question_prompts
    assert get_benchmark("toy-geneval") is geneval.TOY_GENEVAL
    gen = geneval.generation_prompts(tok, 12, np.random.default_rng(0), "heldout")
    assert gen == geneval.generation_prompts(tok, 12, np.random.default_rng(0), "heldout")
    assert all(it.prompt.kind == "image" and it.prompt.ids[-1] == v.boi_id and isinstance(it.truth, Spec)
               for it in gen)
    assert all(geneval.is_heldout(it.truth) for it in gen if it.truth.category != "single_object")
    qa = geneval.question_prompts(tok, 6, np.random.default_rng(0), "seen")
    assert all(it.prompt.kind == "text" and it.prompt.ids[:2] == [v.bos_id, v.boi_id] for it in qa)
    assert tok.text.decode(qa[0].prompt.ids[3 + v.image_grid:]) == qa[0].truth.question

    class Small:  # the single-shape world's 32 px tokenizer
        def image_size(self):
            return (32, 32)
    with pytest.raises(ValueError, match=r"toy-geneval: the image tokenizer's native size is 32x32; the scenes need "
                                         r"a square size that is a multiple of 64"):
        geneval.generation_prompts(Small(), 1, np.random.default_rng(0))


def test_evaluate_prints_the_table_and_perfect_drawings_score_one(scene_tok, tmp_path, capsys):
    from megannm.cli import main
    from megannm.checkpoint import consolidated
    from megannm.data.tokenize import Tokenizers
    from megannm.generate import codes_to_images
    from megannm import parallel
    from megannm.config import ModelConfig
    from megannm.model.args import ModelArgs
    from megannm.model.transformer import NMMModel
    tok = Tokenizers.load(scene_tok)
    args = ModelArgs.from_config(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                                             max_seq_len=160), tok.vocab, tp=1)
    torch.manual_seed(0)
    state = dict(NMMModel(args, parallel.init_parallel(1, 1)).state_dict())
    for k in ("embedding.embed_tokens.weight", "head.output.weight"):  # the canonical form: unpadded rows
        state[k] = state[k][:tok.vocab.size].clone()
    consolidated.write(consolidated.Consolidated(state, consolidated.normalise_args(args, tok.vocab), tok.vocab,
                                                 {"kind": "test"}), tmp_path / "ckpt")
    assert main(["evaluate", str(tmp_path / "ckpt"), "--tokenizers", str(scene_tok), "--benchmark", "toy-geneval",
                 "--n", "2", "--out", str(tmp_path / "eval")]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table if line.startswith("  ")}
    assert set(rows) == {*geneval.CATEGORIES, *geneval.TASKS, "overall"} and all(len(r) == 2 for r in rows.values())
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for key, groups in (("generation", geneval.CATEGORIES), ("understanding", geneval.TASKS)):
        for split in ("seen", "heldout"):
            assert set(report[key][split]) == {*groups, "overall"}
            got = report[key][split]
            assert all(got[g] in (0.0, 0.5, 1.0) for g in groups), got  # right answers of 2 prompts each
            assert got["overall"] == pytest.approx(sum(got[g] for g in groups) / len(groups))
    assert (tmp_path / "eval" / "samples.png").exists()

    # the same scoring path with the truth drawn (through the image tokenizer and back) and the reference answers
    rng = np.random.default_rng(7)

    def perfect(items):
        truth = np.stack([scenes.render(geneval.truth_scene(it.truth, rng), tok.image_size()[0]) for it in items])
        return codes_to_images(tok, tok.vocab.image_ids(tok.image.encode(truth)).tolist())

    best = geneval.evaluate_geneval(None, tok, n=4, draw=perfect, answer=lambda items: [it.truth.answer
                                                                                         for it in items])
    for key in ("generation", "understanding"):
        assert all(x == 1.0 for split in ("seen", "heldout") for x in best[key][split].values()), best[key]
    assert "overall" in geneval.format_geneval(best)


# ---------------------------------------------------------------------------------------------------------------------
# the headline's chain (`megannm demo --benchmark toy-geneval`)


def test_the_demo_chain_validates_and_refuses_a_stage_from_a_later_one(tmp_path):
    from megannm.config import load_recipe
    from megannm.phases import check_phase
    from megannm.toy import demo
    stages = demo.load_chain(demo.GENEVAL_CHAIN)
    assert [s["name"] for s in stages] == ["pretrain", "sft", "grpo", "dpo"]
    assert stages[2]["from"] == stages[3]["from"] == stages[3]["pairs"]["from"] == "sft"  # RL side by side from SFT
    kinds = []
    for s in stages:
        recipe = load_recipe(s["recipe"], ["data.vocab=x/vocab.json"], world_size=1)
        check_phase(recipe, str(s["recipe"]))
        kinds.append(recipe.phase.kind)
    assert kinds == ["pretrain", "sft", "grpo", "dpo"]
    grpo = load_recipe(stages[2]["recipe"], world_size=1).phase.options
    assert grpo.prompts == "toy_geneval" and grpo.rewards == {"toy_geneval": 1.0} and grpo.prompt_split == "seen"
    assert stages[3]["pairs"]["prompts"] == "toy_geneval" and stages[3]["pairs"]["rewards"] == "toy_geneval"
    bad = tmp_path / "chain.yaml"
    bad.write_text("stages:\n  - {name: a, recipe: x.yaml, from: b}\n  - {name: b, recipe: y.yaml}\n")
    with pytest.raises(ValueError, match=r"chain.yaml: stages\[0\] \(a\): from: 'b' is not an earlier stage"):
        demo.load_chain(bad)
    bad.write_text("stages:\n  - {name: a, recipe: x.yaml, form: b}\n")
    with pytest.raises(ValueError, match=r"stages\[0\]: unknown key\(s\) form"):
        demo.load_chain(bad)
