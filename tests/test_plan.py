"""``megannm plan``: its memory model against the measured peak memory of small CPU runs at six layouts (ZeRO 0,
ZeRO 1 with activation checkpointing, bf16's BF16_Optimizer, data, tensor and pipeline parallel), the nmm-7b chain
on its GPUs, the warnings, and the learning-rate schedule continuing across the chain's stages."""
import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from tests import dist

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

REPO = Path(__file__).resolve().parents[1]
NMM = REPO / "recipes" / "nmm-7b"
SCRIPT = "tests/scripts/memory_cases.py"
sys.path.insert(0, str(REPO / "tests" / "scripts"))
import memory_cases  # noqa: E402  (the cases' recipes, shared with the measuring script)

SINGLE, PAIR = ["z0", "z1_ckpt", "bf16_z1"], ["dp2", "tp2", "pp2"]
TOLERANCE = 0.25


@pytest.fixture(scope="module")
def measured(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    shards = str(toy_data["shards"])
    # glibc returns freed tensors to the system at once: resident memory then follows the live tensors
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    dist.run([SCRIPT, str(out), shards, *SINGLE], nproc=1, launcher="single", **env)
    dist.run([SCRIPT, str(out), shards, *PAIR], nproc=2, launcher="torchrun", **env)
    return out, shards


def test_memory_model_is_within_25_percent_of_measured_peaks(measured):
    from megannm.config import recipe_from_dict
    from megannm.estimate import estimate_recipe
    out, shards = measured
    rows = []
    for f in sorted(out.glob("*.rank*.json")):
        m = json.loads(f.read_text())
        c = memory_cases.CASES[m["case"]]
        world = c.get("world", c.get("tp", 1) * c.get("pp", 1))
        r = recipe_from_dict(memory_cases.recipe_dict(m["case"], shards), world_size=world)
        estimate = estimate_recipe(r, world, "cpu").stages[m["pp_rank"]].total
        rows.append((m["case"], m["rank"], m["peak"] / 2 ** 20, estimate / 2 ** 20, m["peak"] / estimate))
    print("\ncase      rank  measured MiB  plan MiB  measured/plan")
    for row in rows:
        print("{:9s} {:4d} {:13.1f} {:9.1f} {:14.3f}".format(*row))
    assert {r[0] for r in rows} == set(SINGLE + PAIR) and len(rows) == len(SINGLE) + 2 * len(PAIR)
    bad = [r for r in rows if abs(r[4] - 1) > TOLERANCE]
    assert not bad, bad


def test_planning_counts_the_engine_s_buckets():
    from megannm import estimate
    from megannm.train import engine
    assert estimate.BUCKET_ELEMENTS == engine.BUCKET_ELEMENTS


def _plan(recipe, world, gpu="h100", overrides=()):
    from megannm.config import load_recipe
    from megannm.estimate import estimate_recipe
    return estimate_recipe(load_recipe(recipe, list(overrides)), world, gpu, source=str(recipe))


def test_nmm_7b_joint_fits_64_h100s_without_warnings():
    from megannm.estimate import GiB
    p = _plan(NMM / "joint.yaml", 64)
    assert (p.tp, p.pp, p.dp, p.zero_stage, p.precision) == (2, 1, 32, 1, "bf16")
    assert p.total_params == pytest.approx(11.95e9, rel=1e-3) and p.active_params == pytest.approx(6.28e9, rel=1e-3)
    assert p.flops_per_token == pytest.approx(42.28e9, rel=1e-3)
    assert 0.3 * 79.6 * GiB < p.peak.total < 0.85 * 79.6 * GiB and p.warnings == []
    parts = p.peak.parts
    assert parts["weights"] == pytest.approx(2 * 11.95e9 / 2, rel=1e-2)  # bf16, half the model per tensor rank
    assert parts["gradients"] == pytest.approx(6 * 11.95e9 / 2, rel=1e-2)  # bf16 + the fp32 accumulation buffer
    assert parts["optimizer"] == pytest.approx(12 * 11.95e9 / 2 / 32, rel=1e-2)  # fp32 master + Adam, sharded


def test_every_nmm_7b_stage_fits_its_slurm_resources():
    from megannm import slurm
    jobs = slurm.chain_jobs(NMM / "chain.yaml", run_dir="/runs/nmm-7b")["stages"]
    assert [j["kind"] for j in jobs] == ["train"] * 5  # one layout throughout: no conversion job
    for j in jobs:
        p = _plan(j["recipe"], j["world_size"], overrides=j["overrides"])
        assert p.warnings == [], (j["name"], p.warnings)


def test_plan_command_prints_the_table_and_json():
    from megannm.cli.train import estimate as main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([str(NMM / "joint.yaml"), "--world-size", "64", "--gpu", "h100"])
    text = buf.getvalue()
    for word in ("11.95 B total, 6.28 B active", "42.28 GFLOP", "1F1B bubble", "weights", "gradients", "optimizer",
                 "activations", "logits", "of 79.6 GiB", "at 40% MFU", "tokens/s", "no warnings"):
        assert word in text, word
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([str(NMM / "joint.yaml"), "parallel.pipeline_parallel=2", "--world-size", "128", "--json"])
    d = json.loads(buf.getvalue())
    assert d["pp"] == 2 and len(d["stages"]) == 2 and 0 < d["bubble"] < 0.05 and d["tokens_per_s"] > 0


@pytest.mark.parametrize("overrides, world, gpu, expected", [
    (["parallel.tensor_parallel=16", "model.num_kv_heads=16"], 128, "h100",
     "tensor_parallel=16 is above the 8 devices of a node"),
    (["parallel.tensor_parallel=8", "parallel.pipeline_parallel=2"], 64, "h200", "memory under 30% used"),
    (["parallel.tensor_parallel=1", "parallel.activation_checkpointing=false"], 32, "a100", "does not fit"),
    (["parallel.pipeline_parallel=4", "data.global_batch_size=64"], 64, "b200", "pipeline bubble"),
])
def test_plan_warns_when_a_layout_wastes_or_overflows_the_devices(overrides, world, gpu, expected):
    p = _plan(NMM / "joint.yaml", world, gpu, overrides)
    assert any(expected in w for w in p.warnings), p.warnings


def test_plan_errors_are_one_line():
    from megannm.config import load_recipe
    from megannm.estimate import estimate_recipe
    with pytest.raises(ValueError) as e:
        estimate_recipe(load_recipe(NMM / "joint.yaml"), 63, "h100", source="joint.yaml")
    assert str(e.value).startswith("joint.yaml: parallel.world_size: ") and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="--gpu must be one of a100, h100, h200, b200"):
        estimate_recipe(load_recipe(NMM / "joint.yaml"), 64, "v100")


# ---------------------------------------------------------------------------------------------------------------------
# the learning-rate schedule across the chain


def _rates(name):
    from megannm.config import load_recipe
    from megannm.train.engine import lr_multiplier
    r = load_recipe(NMM / f"{name}.yaml")
    f = lr_multiplier(r)
    return r, lambda step: r.optimizer.lr * f(step)


def test_the_nmm_7b_rate_continues_from_stage_to_stage():
    align, a = _rates("align")
    joint, j = _rates("joint")
    anneal, n = _rates("anneal")
    assert a(align.schedule.train_steps - 1) == pytest.approx(3e-4)
    # joint: a short warm-up back to align's rate (a fresh Adam), stable, then the last 6,000 steps decay
    stable_until = joint.schedule.train_steps - joint.schedule.decay_steps
    assert j(joint.schedule.warmup_steps) == pytest.approx(3e-4) and j(stable_until - 1) == pytest.approx(3e-4)
    assert 3e-5 < j(stable_until + 3000) < 3e-4
    assert j(joint.schedule.train_steps - 1) == pytest.approx(3e-5)
    assert n(0) == pytest.approx(j(joint.schedule.train_steps - 1))  # the anneal starts where joint ended
    assert n(anneal.schedule.train_steps - 1) < 1e-7 and anneal.schedule.warmup_steps == 0


@pytest.mark.parametrize("schedule, key", [({"decay": "cosine", "decay_steps": 10}, "schedule.decay_steps"),
                                           ({"decay": "wsd", "warmup_steps": 60, "decay_steps": 50},
                                            "schedule.decay_steps")])
def test_schedule_keys_are_checked(schedule, key):
    from megannm.config import RecipeError, recipe_from_dict
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"schedule": {"train_steps": 100, **schedule}}, source="r.yaml")
    assert str(e.value).startswith(f"r.yaml: {key}: ")
