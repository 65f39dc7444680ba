"""Recipe schema: inheritance, overrides, and one clear line for every impossible combination."""
import subprocess
import sys
import textwrap

import pytest

from megannm.config import RecipeError, load_recipe


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
