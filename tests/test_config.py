"""Recipe schema: inheritance, overrides, and one clear line for every impossible combination."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from megannm.cli import main
from megannm.config import (GRPOOptions, Recipe, RecipeError, SlurmConfig, dump_recipe, format_validation_error,
                            load_recipe, recipe_from_dict)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", """
        name: base
        model: {hidden_size: 64, num_layers: 4, num_heads: 4, ffn_hidden_size: 128}
        optimizer: {lr: 0.001, min_lr: 0.0001}
    """)
    child = write(tmp_path, "child.yaml", """
        base: base.yaml
        name: child
        model: {num_layers: 2}
    """)
    r = load_recipe(child, ["optimizer.lr=0.002", "model.mot=false", "parallel.zero_stage=3"])
    assert r.name == "child"
    assert r.model.hidden_size == 64 and r.model.num_layers == 2  # merged key by key
    assert r.optimizer.lr == 0.002 and r.optimizer.min_lr == 0.0001
    assert r.model.mot is False and r.parallel.zero_stage == 3


@pytest.mark.parametrize("body, overrides, world, expected", [
    ("model: {hidden_size: 64, num_heads: 4, ffn_hidden_size: 128}\nmodel_typo: 1\n", [], None,
     "model_typo: unknown key"),
    ("model: {hidden_size: 64, num_heads: 4, ffn_hidden_size: 128, dropout: 0.1}\n", [], None,
     "model.dropout: unknown key"),
    ("model: {hidden_size: sixty}\n", [], None, "model.hidden_size: "),
    ("parallel: {pipeline_parallel: 2, zero_stage: 2}\nmodel: {num_layers: 4}\n", [], None,
     "parallel.zero_stage: ZeRO stage 2 cannot run with pipeline parallelism"),
    ("parallel: {pipeline_parallel: 2, zero_stage: 3}\n", [], None, "parallel.zero_stage"),
    ("model: {hidden_size: 96, num_heads: 3, ffn_hidden_size: 128}\nparallel: {tensor_parallel: 2}\n", [], None,
     "model.num_heads: heads must divide by the tensor-parallel size (got 3"),
    ("model: {num_layers: 3}\nparallel: {pipeline_parallel: 2, zero_stage: 1}\n", [], None,
     "model.num_layers: layers must divide by the pipeline size (got 3"),
    ("parallel: {tensor_parallel: 2, pipeline_parallel: 2, zero_stage: 1}\n", [], 6,
     "parallel.world_size: world size is not tensor x pipeline x data (got 6"),
    ("parallel: {pipeline_parallel: 4, zero_stage: 1}\nmodel: {num_layers: 4}\n"
     "data: {micro_batch_size: 4, global_batch_size: 8}\n", [], 4,
     "data.global_batch_size: micro-batches per step fewer than pipeline stages (got 2"),
    ("data: {micro_batch_size: 3, global_batch_size: 8}\n", [], 2, "data.global_batch_size: must divide"),
    ("{}\n", ["model.ffn_hidden_size=100", "parallel.tensor_parallel=8", "model.num_heads=8",
              "model.hidden_size=256"], None, "model.ffn_hidden_size: must divide by the tensor-parallel size"),
    ("{}\n", ["schedule.warmup_steps=500", "schedule.train_steps=100"], None, "schedule.warmup_steps"),
])
def test_errors_are_one_line_naming_file_and_key(tmp_path, body, overrides, world, expected):
    p = write(tmp_path, "recipe.yaml", body)
    with pytest.raises(RecipeError) as e:
        load_recipe(p, overrides, world_size=world)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{p}: ")
    assert expected in msg, msg


def test_valid_layouts_pass(tmp_path):
    p = write(tmp_path, "r.yaml", "parallel: {tensor_parallel: 2, pipeline_parallel: 2, zero_stage: 1}\n"
                                  "data: {micro_batch_size: 2, global_batch_size: 8}\n")
    r = load_recipe(p, world_size=8)
    assert r.data_parallel(8) == 2 and r.grad_accum(8) == 2


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_refuses_zero3_with_pipeline_before_any_process_starts(tmp_path):
    """End to end through `megannm train`: one line on stderr, exit 2, and no rank ever started."""
    p = write(tmp_path, "bad.yaml", "parallel: {pipeline_parallel: 2, zero_stage: 3}\n"
                                    f"logging: {{dir: {tmp_path / 'run'}}}\n")
    out = subprocess.run([sys.executable, "-m", "megannm", "train", str(p)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "parallel.zero_stage" in lines[0] and str(p) in lines[0], out.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------------------
# phase options, slurm resources and the phase x layout rules: refused at load, before any process starts

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("**/*.yaml"))
STAGE_RECIPES = [p for p in RECIPES if "stages" not in (yaml.safe_load(p.read_text()) or {})]  # not chains
TOY = REPO / "recipes" / "toy"
GRPO_KEYS = ("prompts, prompt_split, tokenizers, rewards, group_size, prompts_per_step, ppo_epochs, mini_batches, "
             "clip_ratio, clip_ratio_high, kl_coef, loss_normalisation, dynamic_sampling, scale_rewards, adv_eps, "
             "temperature, top_k, top_p, cfg_scale, max_new_tokens, rollout_batch_size")
SLURM_KEYS = ("partition, account, qos, time, nodes, ntasks_per_node, gpus_per_node, cpus_per_task, mem, constraint, "
              "extra")


@pytest.mark.parametrize("recipe, overrides, world, expected", [
    ("grpo", ["phase.options.bogus=1"], None,
     f"phase.options.bogus: unknown option for phase grpo (got 'bogus', expected one of {GRPO_KEYS})"),
    ("grpo", ["phase.options.group_size=many"], None,
     "phase.options.group_size: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("grpo", ["phase.options.clip_ratio=1.5"], None, "phase.options.clip_ratio: Input should be less than 1 (got 1.5)"),
    ("grpo", ["phase.options.rewards=5"], None,
     "phase.options.rewards: Input should be list[str] or dict[str,float] (got 5)"),
    ("sft", ["phase.options.beta=0.1"], None,
     "phase.options.beta: unknown option for phase sft (got 'beta', expected none)"),
    ("dpo", ["phase.options=null"], None, "phase.options.pairs: required key is missing"),
    ("grpo", ["slurm.nodez=2"], None, f"slurm.nodez: unknown key (got 'nodez', expected one of {SLURM_KEYS})"),
    ("grpo", ["slurm.nodes=two"], None,
     "slurm.nodes: Input should be a valid integer, unable to parse string as an integer (got 'two')"),
    ("grpo", ["slurm.time=12:00:00"], None,  # unquoted, YAML 1.1 reads a base-60 number
     "slurm.time: a time limit is a quoted string such as \"12:00:00\" or \"2-00:00:00\" (got the number 43200: "
     "YAML reads an unquoted 12:00:00 as 43200)"),
    ("grpo", ["slurm.time=tomorrow"], None, "slurm.time: not a Slurm time limit (got 'tomorrow', expected minutes, "
                                             "hours:minutes:seconds or days-hours:minutes:seconds)"),
    ("grpo", ["slurm.extra=[exclusive]"], None,
     "slurm.extra: each extra sbatch argument is an option starting with '-' (got 'exclusive')"),
    ("sft", ["parallel.pipeline_parallel=2"], None,
     "parallel.pipeline_parallel: phase sft cannot run with pipeline parallelism (got pipeline_parallel=2 with "
     "phase.kind=sft, expected pipeline_parallel = 1: only phase pretrain has a pipeline loss)"),
    ("grpo", ["parallel.pipeline_parallel=2"], None,
     "parallel.pipeline_parallel: phase grpo cannot run with pipeline parallelism (got pipeline_parallel=2 with "
     "phase.kind=grpo, expected pipeline_parallel = 1: only phase pretrain has a pipeline loss)"),
    ("dpo", ["parallel.pipeline_parallel=2"], None,
     "parallel.pipeline_parallel: phase dpo cannot run with pipeline parallelism (got pipeline_parallel=2 with "
     "phase.kind=dpo, expected pipeline_parallel = 1: only phase pretrain has a pipeline loss)"),
    ("grpo", ["phase.options.prompts_per_step=3"], None,
     "phase.options.prompts_per_step: prompts_per_step x group_size answers must fill mini_batches optimizer steps "
     "of data.global_batch_size (got 3 x 8 = 24, expected 2 x 64 = 128)"),
    # 16 ranks: data-parallel 16, but 8 prompts per rollout cannot keep each group on one rank
    ("grpo", ["phase.options.prompts_per_step=8", "phase.options.group_size=16", "data.micro_batch_size=4"], 16,
     "phase.options.prompts_per_step: must divide by the data-parallel size (got 8, dp=16): a group stays on one "
     "rank"),
])
def test_recipe_errors_are_the_exact_line(recipe, overrides, world, expected):
    path = TOY / f"{recipe}.yaml"
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides, world_size=world)
    assert str(e.value) == f"{path}: {expected}"


def test_check_command_refuses_an_unknown_phase_option(capsys):
    path = str(TOY / "grpo.yaml")
    assert main(["check", path, "phase.options.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err == (f"megannm check: error: {path}: phase.options.bogus: unknown option for phase grpo (got 'bogus', "
                   f"expected one of {GRPO_KEYS})\n")


def test_check_command_refuses_an_unregistered_phase_and_a_custom_phase_without_options(capsys, monkeypatch):
    """Kinds beyond the built-in four are looked up in the phase registry before launch."""
    from megannm import phases
    path = str(TOY / "common.yaml")
    assert main(["check", path, "phase.kind=ppo"]) == 2
    assert capsys.readouterr().err == (f"megannm check: error: {path}: phase.kind: unknown phase 'ppo' (expected one "
                                       f"of pretrain, sft, grpo, dpo)\n")
    monkeypatch.setitem(phases.PHASES, "plain", "megannm.phases.pretrain:PretrainPhase")  # no Options of its own
    assert main(["check", path, "phase.kind=plain"]) == 0
    assert main(["check", path, "phase.kind=plain", "phase.options.x=1"]) == 2
    assert capsys.readouterr().err.endswith(f"{path}: phase.options: phase plain takes no options (got 'x')\n")


def test_phase_options_and_slurm_are_typed():
    r = load_recipe(TOY / "grpo.yaml", ["slurm.nodes=2", "slurm.time='1-00:00:00'", "slurm.mem=0"])
    assert isinstance(r.phase.options, GRPOOptions)
    assert (r.phase.options.group_size, r.phase.options.prompts_per_step, r.phase.options.mini_batches) == (8, 16, 2)
    assert r.phase.options.rewards == {"toy_image": 1.0} and r.phase.options.top_p == 1.0  # given, and a default
    assert isinstance(r.slurm, SlurmConfig) and (r.slurm.nodes, r.slurm.time, r.slurm.mem) == (2, "1-00:00:00", "0")
    assert load_recipe(TOY / "dpo.yaml").phase.options.beta == 0.2
    assert load_recipe(TOY / "common.yaml").phase.kind == "pretrain"  # no phase: pretraining
    assert recipe_from_dict({"phase": {"options": {}}}).phase.kind == "pretrain"  # no kind: pretraining
    # activation checkpointing is not refused without a pipeline (the nmm-7b SFT stage uses it)
    assert load_recipe(REPO / "recipes" / "nmm-7b" / "sft.yaml").parallel.activation_checkpointing


def test_grpo_data_parallel_rule_waits_for_the_world_size():
    """Without a world size the data-parallel rule waits for the launcher; with one it applies."""
    over = ["phase.options.prompts_per_step=8", "phase.options.group_size=16", "data.micro_batch_size=4"]
    assert load_recipe(TOY / "grpo.yaml", over).phase.options.prompts_per_step == 8
    assert load_recipe(TOY / "grpo.yaml", over, world_size=8).data_parallel(8) == 8


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_stage_recipe_checks_and_round_trips(path, capsys, tmp_path, monkeypatch):
    # the 7B GRPO recipe names a reward of the user's own package, which `check` resolves: a stand-in for it
    pkg = tmp_path / "my_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "verifiers.py").write_text("def image_matches_prompt(prompt, sample, truth):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    over = []
    r = load_recipe(path)
    prompts = str(r.phase.options.prompts) if r.phase.kind == "grpo" else ""
    if "/" in prompts and not Path(prompts).exists():  # the cluster's prompt file: here a stand-in
        line = {"prompt": "a red circle", "answer": "red circle", "answer_kind": "image"}
        (tmp_path / "prompts.jsonl").write_text(json.dumps(line) + "\n")
        over = [f"phase.options.prompts={tmp_path / 'prompts.jsonl'}"]
    assert main(["check", str(path), *over]) == 0, capsys.readouterr().err
    r = load_recipe(path)
    # the checkpoint's copy (model_dump) and recipe.yaml (dump_recipe) load back to the same recipe
    assert recipe_from_dict(r.model_dump(mode="json"), source="checkpoint") == r
    dumped = tmp_path / "recipe.yaml"
    dumped.write_text(dump_recipe(r))
    assert load_recipe(dumped) == r


def test_chains_are_not_stage_recipes():
    chains = {p.relative_to(REPO / "recipes").as_posix() for p in RECIPES} - {
        p.relative_to(REPO / "recipes").as_posix() for p in STAGE_RECIPES}
    assert chains == {"toy/chain.yaml", "toy/geneval/chain.yaml", "toy/continuous/chain.yaml", "nmm-7b/chain.yaml"}
    assert len(STAGE_RECIPES) >= 12


def test_one_formatter_strips_union_tags_and_works_without_a_model():
    from pydantic import ValidationError
    try:
        Recipe.model_validate({"phase": {"kind": "grpo", "options": {"group_size": 1, "prompts": "p.jsonl",
                                                                     "rewards": ["format"]}}})
    except ValidationError as e:
        assert format_validation_error("r.yaml", e, Recipe) == (
            "r.yaml: phase.options.group_size: Input should be greater than or equal to 2 (got 1)")
        assert format_validation_error("r.yaml", e).startswith("r.yaml: phase.grpo.options.group_size: ")
    else:
        raise AssertionError("group_size 1 validated")
