"""Pipeline parallelism (DeepSpeed PipelineModule, 1F1B) composed with megatron-core tensor parallelism, on real gloo
ranks through the real launchers: the trainer at PP=2 and PP=2 x TP=2 trains, evaluates and logs the same numbers
as without a pipeline, resumes bitwise, and DeepSpeed's grid groups the same ranks as megatron-core.

Two launches (tests/scripts/pipeline_cases.py): the deepspeed launcher with 2 ranks (the PP=1 references, PP=2,
resume, parameter names at TP=1) and torchrun with 4 (PP=2 x TP=2, names at TP=2, the grid for every split of 4).
"""
import json

import pytest

from tests import dist

SCRIPT = "tests/scripts/pipeline_cases.py"
STEPS = 6
# Observed differences are <= 5e-7 (summation order). Tighter than 1e-5 on purpose: gradient clipping that leaves
# out one stage's norms (DeepSpeed's ZeRO-0 clip over the pipeline grid, see pipeline._count_replicated_once)
# moves the losses by ~1e-5 within 6 steps.
TOL = 2e-6


def load(out, name):
    return json.loads((out / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    shards = str(toy_data["shards"])
    dist.run([SCRIPT, str(out), shards, "ref:mot", "ref:dense", "pp2:mot", "pp2:dense", "resume", "init", "map"],
             nproc=2, launcher="deepspeed")
    dist.run([SCRIPT, str(out), shards, "pp2tp2:mot", "pp2tp2:dense", "map", "grid"], nproc=4, launcher="torchrun")
    return out


@pytest.mark.parametrize("layout", ["pp2", "pp2tp2"])
@pytest.mark.parametrize("arch", ["mot", "dense"])  # dense also covers ZeRO 0, the uniform partition, checkpointing
def test_pipeline_trains_like_no_pipeline(runs, layout, arch):
    ref, got = load(runs, f"ref_{arch}"), load(runs, f"{layout}_{arch}")
    assert len(ref["steps"]) == len(got["steps"]) == STEPS
    assert ref["steps"][-1]["loss"] < ref["steps"][0]["loss"] - 0.3  # it learns
    for step, (a, b) in enumerate(zip(ref["steps"], got["steps"]), start=1):
        for key in ("loss", "text_loss", "image_loss", "z_loss", "grad_norm"):  # grad_norm: None at ZeRO 0
            if a[key] is None:
                assert b[key] is None, (key, step)
            else:
                assert b[key] == pytest.approx(a[key], rel=0, abs=TOL), (key, step)
        assert (b["text_tokens"], b["image_tokens"]) == (a["text_tokens"], a["image_tokens"])
        assert b["lr"] == a["lr"]
    # eval between train_batch calls (step 3) and at the end, over the same whole validation set
    assert [e["step"] for e in got["eval"]] == [e["step"] for e in ref["eval"]] == [3, 6]
    for a, b in zip(ref["eval"], got["eval"]):
        assert (b["text_tokens"], b["image_tokens"]) == (a["text_tokens"], a["image_tokens"]) and a["image_tokens"]
        assert b["text_loss"] == pytest.approx(a["text_loss"], rel=0, abs=TOL)
        assert b["image_loss"] == pytest.approx(a["image_loss"], rel=0, abs=TOL)
    # rank 0 holds the first stage: the embedding and block 0 (either partition), blocks checkpointed when asked
    assert got["bounds"] == [0, 2]
    assert got["checkpointed"] == ([] if arch == "mot" else [False, True])


def test_per_modality_stats_reach_rank_0(runs):
    """Global rank 0 is the FIRST stage, which computes no loss: its log holds the last stage's statistics."""
    got = load(runs, "pp2tp2_mot")
    assert all(s["text_loss"] > 0 and s["image_loss"] > 0 and s["text_tokens"] > 0 and s["image_tokens"] > 0
               for s in got["steps"])
    records = [json.loads(x) for x in (runs / "pp2tp2_mot" / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["layout"].startswith("world 4 = tensor 2 x data 1 x pipeline 2")


def test_resume_at_pp2_is_bitwise(runs):
    straight, resumed = load(runs, "pp2_mot"), load(runs, "resumed")
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in straight["steps"]]  # same floats
    assert [s["grad_norm"] for s in resumed["steps"]] == [s["grad_norm"] for s in straight["steps"]]
    assert [e["loss"] for e in resumed["eval"]] == [e["loss"] for e in straight["eval"]]
    assert resumed["events"] == ["start", "exit", "done", "start", "resumed", "saved", "done"]


def test_init_from_a_pipeline_checkpoint(runs):
    """checkpoint.init_from (how a chain's next stage starts) loads the trained stages' weights, module only."""
    got, trained = load(runs, "init"), load(runs, "pp2_mot")
    assert "initialised" in got["events"]
    assert got["steps"][0]["loss"] < trained["steps"][-1]["loss"]  # starts where pp2_mot ended, not from scratch
    assert got["steps"][0]["lr"] == trained["steps"][0]["lr"]  # a fresh schedule


@pytest.mark.parametrize("name,tp", [("pp2_mot", 1), ("pp2tp2_mot", 2), ("pp2tp2_dense", 2)])
def test_checkpoint_holds_every_layer_of_every_tensor_rank(runs, name, tp):
    files = load(runs, name)["files"]
    for position in range(4):  # embedding, 2 blocks, head
        for t in range(tp):
            assert f"layer_{position:02d}-model_{t:02d}-model_states.pt" in files
    assert "megannm.json" in files and "rng" in files


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_names_and_weights_are_nmm_models(runs, tp):
    """Each stage's state dict maps onto NMMModel's canonical names, with the same weights from the same seed."""
    r = load(runs, f"map_tp{tp}")
    assert all(not rank["problems"] for rank in r["ranks"]), [rank["problems"] for rank in r["ranks"]]
    for t in range(tp):
        stages = sorted((x for x in r["ranks"] if x["tp_rank"] == t), key=lambda x: x["pp_rank"])
        assert [x["bounds"] for x in stages] == [[0, 2], [2, 4]]
        names = [n for x in stages for n in x["names"]]
        assert sorted(names) == r["canonical"]  # the stages together: every parameter exactly once


def test_deepspeed_grid_is_megatron_order(runs):
    rows = load(runs, "grid_w4")
    assert {(x["tp"], x["pp"], x["dp"]) for x in rows} == {(1, 1, 4), (2, 1, 2), (4, 1, 1), (1, 2, 2), (2, 2, 1),
                                                          (1, 4, 1)}
    for x in rows:
        assert x["ds"] == x["megatron"], x  # tensor (DeepSpeed's model-axis slice), data and pipeline groups
        assert x["ds_coords"] == x["coords"], x
    # tensor innermost, then data, pipeline outermost: rank = tp_rank + tp * (dp_rank + dp * pp_rank)
    for x in rows:
        t, d, p = x["coords"]
        assert x["rank"] == t + x["tp"] * (d + x["dp"] * p)


# ---------------------------------------------------------------------------------------------------------------------
# no launch


def test_name_mapping_round_trips():
    from megannm.model.pipeline import canonical_to_pipeline, pipeline_to_canonical
    n = 4
    cases = {"0.embed_tokens.weight": "embedding.embed_tokens.weight",
             "1.attn.q_proj.1.weight": "layers.0.attn.q_proj.1.weight",
             "4.ffn.down_proj.0.weight": "layers.3.ffn.down_proj.0.weight",
             "5.norm.1.weight": "head.norm.1.weight",
             "5.output.weight": "head.output.weight"}
    for pipe, canonical in cases.items():
        assert pipeline_to_canonical(pipe) == canonical
        position, inner = canonical_to_pipeline(canonical, n)
        assert f"{position}.{inner}" == pipe
        # a DeepSpeed layer file (layer_{position:02d}-...) holds the inner names
        assert pipeline_to_canonical(inner, layer_offset=position) == canonical
    assert pipeline_to_canonical("0.attn.o_proj.0.weight", layer_offset=2) == "layers.1.attn.o_proj.0.weight"
    for bad in ("3.embed_tokens.weight", "0.attn.q_proj.0.weight", "2.mystery.weight"):
        with pytest.raises(ValueError, match="pipeline name"):
            pipeline_to_canonical(bad)
    with pytest.raises(ValueError, match="4 layers"):
        canonical_to_pipeline("layers.4.attn.q_proj.0.weight", n)


def test_pipeline_refuses_objectives_it_cannot_compute():
    """Only phases whose loss is the last stage's ``lm_loss`` declare ``pipeline``; the recipe schema refuses the
    others with pipeline stages before any process starts."""
    from megannm.config import PIPELINE_PHASES, RecipeError, recipe_from_dict
    from megannm.phases import PHASES, phase_class
    assert {k for k in PHASES if phase_class(k).pipeline} == set(PIPELINE_PHASES) == {"pretrain"}
    options = {"sft": {}, "grpo": {"prompts": "p.jsonl", "rewards": ["format"]}, "dpo": {"pairs": "pairs"}}
    for kind, opts in options.items():
        with pytest.raises(RecipeError, match=f"parallel.pipeline_parallel: .*{kind}"):
            recipe_from_dict({"phase": {"kind": kind, "options": opts}, "parallel": {"pipeline_parallel": 2},
                              "model": {"num_layers": 2}}, source="r.yaml")
