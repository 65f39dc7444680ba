"""`megannm stage` and slurm/train.sbatch: the chain schema and dry run, then real jobs on a one-node Slurm cluster
(tests/slurm_cluster.py): dependencies and init_from between stages, preemption -> save -> requeue -> exact resume,
a failed stage leaving the next one never started, status and cancel."""
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from megannm import slurm
from megannm.cli.slurm import stage

pytest.register_assert_rewrite("tests.slurm_cluster")
from tests.slurm_cluster import PYTHON, TINY_STEPS, events, losses, metrics  # noqa: E402

pytest_plugins = ["tests.slurm_cluster"]  # its session fixtures: the cluster, the tiny recipe

REPO = Path(__file__).resolve().parents[1]
RESOURCES = {"nodes": 1, "ntasks_per_node": 2, "cpus_per_task": 1}


def write_chain(folder: Path, recipe: Path, stages: list[dict], **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    chain = {"name": "t", "slurm": RESOURCES, **top,
             "stages": [{"recipe": str(recipe), **s} for s in stages]}
    path = folder / "chain.yaml"
    path.write_text(yaml.safe_dump(chain, sort_keys=False))
    return path


def table(out: str) -> dict[str, list[str]]:
    """`megannm stage status` output -> stage -> its columns (job, state, step)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]
    assert rows[0] == ["stage", "job", "state", "step"], rows[0]
    return {r[0]: r[1:] for r in rows[1:]}


def stage_jobs(run: Path) -> dict[str, str]:
    return {s["name"]: s["job_id"] for s in json.loads((run / "stages.json").read_text())["stages"]}


# ---------------------------------------------------------------------------------------------------------------------
# the schema and the plan, no Slurm needed


def test_nmm_7b_chain_validates():
    p = slurm.chain_jobs(REPO / "recipes" / "nmm-7b" / "chain.yaml", run_dir="/runs/nmm-7b")
    jobs = {j["name"]: j for j in p["stages"]}
    # one tensor x pipeline layout throughout (tensor 2, no pipeline): no conversion job between stages
    assert list(jobs) == ["align", "joint", "anneal", "sft", "grpo"]
    assert [jobs[n]["world_size"] for n in ("align", "joint", "anneal", "sft", "grpo")] == [64, 64, 64, 32, 64]
    # each stage starts from the previous one's checkpoints
    assert "checkpoint.init_from=/runs/nmm-7b/align/checkpoints" in jobs["joint"]["overrides"]
    assert jobs["sft"]["init_from"] == "/runs/nmm-7b/anneal/checkpoints"
    assert "checkpoint.init_from=/runs/nmm-7b/sft/checkpoints" in jobs["grpo"]["overrides"]
    # resources: chain defaults < the recipe's slurm: < the stage entry
    assert jobs["align"]["resources"]["time"] == "1-00:00:00" and jobs["joint"]["resources"]["time"] == "2-00:00:00"
    assert jobs["grpo"]["resources"]["qos"] == "high" and jobs["grpo"]["resources"]["nodes"] == 8
    assert jobs["align"]["resources"]["ntasks_per_node"] == 8  # one task per GPU
    for name in ("align", "joint", "anneal", "sft", "grpo"):
        r = slurm.load_recipe(jobs[name]["recipe"], jobs[name]["overrides"], world_size=jobs[name]["world_size"])
        assert (r.model.hidden_size, r.model.num_layers, r.model.num_heads, r.model.ffn_hidden_size,
                r.data.seq_len) == (4096, 32, 32, 11008, 4096)
        assert (r.parallel.tensor_parallel, r.parallel.pipeline_parallel) == (2, 1)
    assert slurm.load_recipe(jobs["grpo"]["recipe"]).phase.kind == "grpo"



def test_a_stage_that_changes_the_layout_starts_from_a_consolidated_copy(tmp_path, tiny_recipe):
    """Between stages of different tensor x pipeline layouts the chain converts the previous checkpoint once."""
    chain = write_chain(tmp_path, tiny_recipe,
                        [{"name": "a"}, {"name": "b", "overrides": ["parallel.tensor_parallel=2"]}])
    p = slurm.chain_jobs(chain, run_dir="/runs/t")
    jobs = {j["name"]: j for j in p["stages"]}
    assert list(jobs) == ["a", "b:convert", "b"]
    assert jobs["b"]["init_from"] == "/runs/t/b/init-consolidated"
    assert jobs["b:convert"]["run"][-4:] == ["/runs/t/a/checkpoints", "/runs/t/b/init-consolidated", "--to",
                                             "consolidated"]
    assert jobs["b:convert"]["world_size"] == 1 and jobs["b:convert"]["note"] == "tensor x pipeline 1x1 -> 2x1"


def test_dry_run_prints_runnable_commands(tmp_path, tiny_recipe, capsys):
    chain = write_chain(tmp_path, tiny_recipe, [{"name": "a"}, {"name": "b", "overrides": ["schedule.train_steps=3"],
                                                                 "slurm": {"time": "00:10:00"}}])
    run = tmp_path / "run"
    assert stage([str(chain), "--dry-run", "--run-dir", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"mkdir -p {run / 'a'} {run / 'b'}"
    a, b = lines[2], lines[3]
    assert a.startswith("job1=$(sbatch --parsable --job-name=t-a ") and "--dependency" not in a
    assert "--dependency=afterok:$job1 " in b and "--time=00:10:00" in b and "--time" not in a
    assert f"{REPO / 'slurm' / 'train.sbatch'} {tiny_recipe} logging.dir={run / 'a'})" in a
    assert f"schedule.train_steps=3 logging.dir={run / 'b'} checkpoint.init_from={run / 'a' / 'checkpoints'})" in b
    assert "--nodes=1 --ntasks-per-node=2 --cpus-per-task=1" in a
    assert not run.exists()  # a dry run writes nothing


@pytest.mark.parametrize("chain, expected", [
    ({"stages": [{"name": "a", "recipe": "R", "slurmm": {}}]}, "stages.0.slurmm: unknown key"),
    ({"stages": [{"name": "a", "recipe": "R", "slurm": {"nodes": 0}}]}, "stages.0.slurm.nodes: "),
    ({"stages": [{"name": "a", "recipe": "R", "slurm": {"extra": ["exclusive"]}}]},
     "stages.0.slurm.extra: each extra sbatch argument is an option starting with '-' (got 'exclusive')"),
    ({"slurm": {"time": 90}, "stages": [{"name": "a", "recipe": "R"}]}, "slurm.time: a time limit is a quoted string"),
    ({"stages": []}, "stages: "),
    ({"stages": [{"name": "a", "recipe": "R"}, {"name": "a", "recipe": "R"}]},
     "stages: stage names must be unique (got 'a' twice)"),
    ({"stages": [{"name": "a/b", "recipe": "R"}]}, "stages.0.name: a stage name is letters"),
    ({"stages": [{"name": "a", "recipe": "R", "overrides": ["lr"]}]},
     "stages.0.overrides: an override is key.path=value (got 'lr')"),
    ({"stages": [{"name": "a", "recipe": "missing.yaml"}]}, "stages.0.recipe: "),
    ({"stages": [{"name": "a", "recipe": "R", "overrides": ["model.hidden_size=oops"]}]},
     "stages.0.recipe: R: model.hidden_size: "),
    # the recipe is checked at the world size the resources give: 3 ranks do not hold tensor 2
    ({"slurm": {"ntasks_per_node": 3}, "stages": [{"name": "a", "recipe": "R",
                                                   "overrides": ["parallel.tensor_parallel=2"]}]},
     "stages.0.recipe: R: parallel.world_size: world size is not tensor x pipeline x data (got 3"),
    ({"slurm": {"gpus_per_node": 4, "ntasks_per_node": 2}, "stages": [{"name": "a", "recipe": "R"}]},
     "stages.0.slurm.ntasks_per_node: one task per device (got 2, expected gpus_per_node=4)"),
    ({"overrides": ["checkpoint.dir=/tmp/same"],
      "stages": [{"name": "a", "recipe": "R"}, {"name": "b", "recipe": "R"}]},
     "stages.1.recipe: checkpoint.dir /tmp/same is also stage a's: a stage would resume from another stage's"),
])
def test_chain_errors_are_one_line(tmp_path, tiny_recipe, chain, expected):
    for s in chain["stages"]:
        s["recipe"] = str(tiny_recipe) if s["recipe"] == "R" else s["recipe"]
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain))
    with pytest.raises(slurm.ChainError) as e:
        slurm.chain_jobs(path, run_dir=str(tmp_path / "run"))
    msg = str(e.value).replace(str(tiny_recipe), "R")
    assert msg.startswith(f"{path}: ") and expected in msg, msg
    assert "\n" not in msg


def test_recipe_slurm_section_is_checked(tmp_path, tiny_recipe):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {tiny_recipe}\nslurm: {{nodez: 2}}\n")
    path = write_chain(tmp_path, bad, [{"name": "a"}])
    with pytest.raises(slurm.ChainError, match=r"stages\.0\.recipe: .*bad\.yaml: slurm\.nodez: unknown key"):
        slurm.chain_jobs(path)


@pytest.mark.parametrize("chain", sorted((REPO / "recipes").glob("*/chain.yaml")), ids=lambda p: p.parent.name)
def test_every_chain_in_the_repo_validates(chain, tmp_path):
    p = slurm.chain_jobs(chain, run_dir=str(tmp_path))
    assert p["stages"] and all(s["world_size"] >= 1 for s in p["stages"])


# ---------------------------------------------------------------------------------------------------------------------
# real jobs on the one-node cluster


@pytest.fixture(scope="module")
def chain_run(slurm_cluster, tiny_recipe, tmp_path_factory):
    """Stage s1 (TINY_STEPS steps) then s2 (3 steps) from s1's checkpoint, submitted by `megannm stage`; s1 gets
    USR1 (as from --signal=B:USR1@N) soon after it starts training, so it saves, requeues and resumes first."""
    root = tmp_path_factory.mktemp("chain")
    chain = write_chain(root, tiny_recipe, [{"name": "s1"}, {"name": "s2", "overrides": ["schedule.train_steps=3"]}])
    run = root / "run"
    assert stage([str(chain), "--run-dir", str(run)]) == 0
    jobs = stage_jobs(run)
    # The trainer installs its signal handler before it logs "start": signal then, well before its last step.
    deadline = time.time() + 300
    while not events(metrics(run / "s1"), "start"):
        assert time.time() < deadline, slurm_cluster.job_log(slurm_cluster.job(jobs["s1"]))
        time.sleep(0.02)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", jobs["s1"]])
    infos = {name: slurm_cluster.wait_finished(job) for name, job in jobs.items()}
    return {"run": run, "jobs": jobs, "info": infos}


def test_chain_runs_stage_2_after_stage_1_from_its_checkpoint(chain_run, slurm_cluster, capsys):
    run, info = chain_run["run"], chain_run["info"]
    assert info["s1"]["JobState"] == "COMPLETED", slurm_cluster.job_log(info["s1"])
    assert info["s2"]["JobState"] == "COMPLETED", slurm_cluster.job_log(info["s2"])
    m1, m2 = metrics(run / "s1"), metrics(run / "s2")
    # both ran as 2 Slurm tasks (parallel.py read SLURM_*), and s2 started only after s1 had finished (requeue and
    # all: afterok waits through it)
    for m in (m1, m2):
        assert "world 2 = tensor 1 x data 2 x pipeline 1 (launcher slurm)" in events(m, "start")[0]["layout"]
    assert events(m2, "start")[0]["time"] > events(m1, "done")[0]["time"]
    assert info["s2"]["StartTime"] >= info["s1"]["EndTime"]
    # s2 starts from s1's final checkpoint: the event, its recipe, and a loss far below a fresh model's
    final = run / "s1" / "checkpoints" / f"step{TINY_STEPS:08d}"
    assert events(m2, "initialised")[0]["detail"] == f"initialised from {final}"
    assert yaml.safe_load((run / "s2" / "recipe.yaml").read_text())["checkpoint"]["init_from"] == str(
        run / "s1" / "checkpoints")
    l1, l2 = losses(m1), losses(m2)
    assert sorted(l2) == [1, 2, 3] and l2[1] < l1[1] - 0.5, (l1[1], l2)
    assert stage(["status", str(run)]) == 0
    rows = table(capsys.readouterr().out)
    assert rows == {"s1": [chain_run["jobs"]["s1"], "COMPLETED", f"{TINY_STEPS}/{TINY_STEPS}"],
                    "s2": [chain_run["jobs"]["s2"], "COMPLETED", "3/3"]}


def test_preempted_stage_requeues_and_resumes_exactly(chain_run, slurm_cluster, reference_run):
    """USR1 to the batch script -> forwarded to every rank -> save, exit 124 -> scontrol requeue -> --resume from
    latest: the same per-step losses as the same recipe trained uninterrupted (by torchrun)."""
    info, m = chain_run["info"]["s1"], metrics(chain_run["run"] / "s1")
    assert info["Restarts"] == "1", slurm_cluster.job_log(info)
    preempted, resumed = events(m, "preempted"), events(m, "resumed")
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGUSR1" and preempted[0]["step"] < TINY_STEPS
    assert len(resumed) == 1 and resumed[0]["step"] == preempted[0]["step"]
    assert resumed[0]["detail"].startswith(f"resumed from {chain_run['run'] / 's1' / 'checkpoints'}/step")
    steps = [r["step"] for r in m if r.get("split") == "train"]
    assert steps == list(range(1, TINY_STEPS + 1))  # each step once, none lost or repeated
    assert losses(m) == losses(metrics(reference_run))  # bitwise: same data order, optimizer and RNG state
    log = Path(info["StdOut"]).read_text()
    assert "saved after preemption; requeueing job" in log and "(restart 1)" in log


@pytest.fixture(scope="module")
def failed_run(slurm_cluster, tiny_recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("failed")
    chain = write_chain(root, tiny_recipe, [
        {"name": "f1", "overrides": [f"data.train=[{{path: {root / 'no-such-shards'}}}]"]}, {"name": "f2"}])
    run = root / "run"
    assert stage([str(chain), "--run-dir", str(run)]) == 0
    jobs = stage_jobs(run)
    info1 = slurm_cluster.wait_finished(jobs["f1"])
    info2 = slurm_cluster.wait(jobs["f2"], lambda i: i.get("Reason") == "DependencyNeverSatisfied" or
                               i.get("JobState") != "PENDING", timeout=30, what="DependencyNeverSatisfied")
    return {"run": run, "chain": chain, "jobs": jobs, "info1": info1, "info2": info2}


def test_failed_stage_leaves_the_next_never_started(failed_run, slurm_cluster, capsys):
    run, jobs = failed_run["run"], failed_run["jobs"]
    assert failed_run["info1"]["JobState"] == "FAILED"
    assert "no-such-shards" in Path(failed_run["info1"]["StdOut"]).read_text()  # the trainer's one-line error
    assert failed_run["info2"]["JobState"] == "PENDING"
    assert not (run / "f2" / "metrics.jsonl").exists() and not list((run / "f2").glob("slurm-*.out"))
    assert stage(["status", str(run)]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["f1"][:2] == [jobs["f1"], "FAILED (exit 2:0)"], rows
    assert rows["f2"] == [jobs["f2"], "never (DependencyNeverSatisfied)", "-"], rows


def test_resubmitting_a_live_run_is_refused_then_cancel(failed_run, slurm_cluster, capsys):
    run, jobs = failed_run["run"], failed_run["jobs"]
    queued = slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split()
    out = subprocess.run([PYTHON, "-m", "megannm", "stage", str(failed_run["chain"]), "--run-dir", str(run)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and f"f2 (job {jobs['f2']}, never (DependencyNeverSatisfied))" in err, err
    assert slurm_cluster.run(["squeue", "-h", "-o", "%i"]).stdout.split() == queued  # nothing submitted
    assert stage(["cancel", str(run)]) == 0
    assert f"cancelled: f2 (job {jobs['f2']}" in capsys.readouterr().out
    assert slurm_cluster.wait_finished(jobs["f2"], timeout=30)["JobState"] == "CANCELLED"
    assert stage(["status", str(run)]) == 0
    assert table(capsys.readouterr().out)["f2"][1] == "CANCELLED"
