"""``megannm stage``: a recipe chain on Slurm, one job per stage, each starting after the previous one succeeded.

    megannm stage CHAIN.yaml [--dry-run] [--run-dir DIR]   submit every stage (sbatch --dependency=afterok:<previous>)
    megannm stage status RUN                               each stage's state (squeue, sacct or scontrol)
    megannm stage cancel RUN                               scancel every stage's job that is still pending or running

A chain file (validated by ``Chain`` below, extra keys forbidden)::

    name: nmm-7b                      # job names <name>-<stage>; default: the chain file's folder name
    run_dir: runs/nmm-7b              # default run folder (relative to the current directory); --run-dir wins
    overrides: ["data.seed=7"]        # key.path=value for every stage's recipe
    slurm: {partition: gpu, account: proj, time: "2-00:00:00", nodes: 16, gpus_per_node: 8, cpus_per_task: 12}
    stages:
      - name: align
        recipe: align.yaml            # relative to the chain file
        overrides: ["schedule.train_steps=10000"]
        slurm: {time: "12:00:00"}     # this stage's resources: chain slurm < the recipe's own `slurm:` < this

Each stage's recipe gets ``logging.dir=RUN/<stage>`` and, after the first, ``checkpoint.init_from=<the previous
stage's checkpoint dir>``; every recipe is loaded and checked (with the world size its resources give) before
anything is submitted. Where the tensor/pipeline layout changes between two stages, a one-task conversion job
between them writes the previous checkpoint in the consolidated form, which loads at any layout. Each stage's job
runs ``slurm/train.sbatch`` (srun, one task per device, ``--resume``, requeue on preemption). The run folder gets
``stages.json`` (the table printed at submission), which ``status`` and ``cancel`` read, and one folder per stage
with its metrics, checkpoints and ``slurm-<job>.out``. Submitting again to the same run folder (refused while any
of its jobs is pending or running) continues every stage from its own ``latest``: finished stages end at once.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from megannm.config import RecipeError, SlurmConfig, format_validation_error, load_recipe
from megannm.fileio import atomic_write_json

TRAIN_SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
STAGES_FILE = "stages.json"
# Job states in which a job still holds or waits for resources (squeue's long names).
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class ChainError(ValueError):
    """A chain file that cannot be submitted; the message is one line naming the file and key."""


class SlurmError(RuntimeError):
    """A Slurm command failed; the message is one line with the command and what it said."""


# ---------------------------------------------------------------------------------------------------------------------
# the chain schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage(_Strict):
    name: str = Field(description="Folder and job-name suffix: letters, digits, '.', '_', '-'.")
    recipe: str = Field(description="Recipe YAML, relative to the chain file.")
    overrides: list[str] = Field(default_factory=list, description="key.path=value, after the chain's overrides.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="This stage's sbatch resources (win over "
                                                                        "the recipe's `slurm:` and the chain's).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("a stage name is letters, digits, '.', '_' and '-' (it names a folder and a job)")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        for o in v:
            if "=" not in o:
                raise ValueError(f"an override is key.path=value (got {o!r})")
        return v


class Chain(_Strict):
    name: Optional[str] = Field(None, description="Job-name prefix; default: the chain file's folder name.")
    run_dir: Optional[str] = Field(None, description="Run folder (relative to the current directory); default "
                                                     "runs/<name>; --run-dir wins.")
    overrides: list[str] = Field(default_factory=list, description="key.path=value for every stage.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Every stage's default sbatch resources.")
    stages: list[Stage] = Field(min_length=1)

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        return Stage._overrides(v)

    @field_validator("stages")
    @classmethod
    def _unique(cls, v: list[Stage]) -> list[Stage]:
        seen = set()
        for s in v:
            if s.name in seen:
                raise ValueError(f"stage names must be unique (got {s.name!r} twice)")
            seen.add(s.name)
        return v


def merge_resources(*layers: SlurmConfig) -> SlurmConfig:
    """Later layers win key by key; ``extra`` arguments accumulate in order."""
    merged: dict = {}
    extra: list[str] = []
    for layer in layers:
        merged.update(layer.model_dump(exclude_none=True, exclude={"extra"}))
        extra += layer.extra
    return SlurmConfig(**merged, extra=extra)


def sbatch_args(res: SlurmConfig) -> list[str]:
    """``--<key>=<value>`` for every resource that is set (the key with '-' for '_'), then ``extra`` verbatim."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in res.model_dump(exclude={"extra"}).items()
            if value is not None] + list(res.extra)


def load_chain(path: str | Path) -> Chain:
    """Read and validate a chain file; ChainError with one line ``chain.yaml: key.path: what is wrong``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ChainError(f"{path}: chain file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ChainError(f"{path}: {f'line {mark.line + 1}' if mark else '?'}: not valid YAML "
                         f"({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ChainError(f"{path}: (top): a chain file is a mapping with a stages: list (got {type(data).__name__})")
    try:
        chain = Chain.model_validate(data)
    except ValidationError as e:
        raise ChainError(format_validation_error(str(path), e, Chain)) from None
    if chain.name is None:
        chain.name = path.resolve().parent.name
    return chain


# ---------------------------------------------------------------------------------------------------------------------
# planning: every stage resolved and checked before anything is submitted


def chain_jobs(chain_path: str | Path, run_dir: Optional[str] = None) -> dict:
    """A chain's jobs, in order and not yet submitted, each with its recipe, overrides (logging.dir, init_from),
    resources and command; every recipe loaded with ``megannm.config.load_recipe`` at the world size its resources give.

    Where a stage's tensor/pipeline layout differs from the previous stage's (a DeepSpeed checkpoint loads only at
    its own layout), a one-task job ``<stage>:convert`` between them writes the previous checkpoint in the
    consolidated form (``megannm convert SRC DST --to consolidated``), which loads at any layout."""
    chain_path = Path(chain_path)
    chain = load_chain(chain_path)
    run = Path(run_dir or chain.run_dir or Path("runs") / chain.name).resolve()
    jobs, previous, ckpt_owner = [], None, {}  # previous: (checkpoint dir, (tp, pp)) of the stage before
    for i, stage in enumerate(chain.stages):
        where = f"{chain_path}: stages.{i}"
        recipe_path = (chain_path.parent / stage.recipe).resolve()
        stage_dir = run / stage.name
        overrides = [*chain.overrides, *stage.overrides, f"logging.dir={stage_dir}"]
        try:
            first = load_recipe(recipe_path, overrides)
        except RecipeError as e:
            raise ChainError(f"{where}.recipe: {e}") from None
        res = merge_resources(chain.slurm, first.slurm, stage.slurm)
        if res.gpus_per_node and res.ntasks_per_node and res.gpus_per_node != res.ntasks_per_node:
            raise ChainError(f"{where}.slurm.ntasks_per_node: one task per device (got {res.ntasks_per_node}, "
                             f"expected gpus_per_node={res.gpus_per_node})")
        res = res.model_copy(update={"nodes": res.nodes or 1, "ntasks_per_node": res.tasks_per_node()})
        layout = (first.parallel.tensor_parallel, first.parallel.pipeline_parallel)
        if previous is not None:
            init = previous[0]
            if previous[1] != layout:
                init = stage_dir / "init-consolidated"
                convert = SlurmConfig(**res.model_dump(include={"partition", "account", "qos", "time",
                                                                "cpus_per_task", "mem", "constraint"}),
                                      nodes=1, ntasks_per_node=1)
                jobs.append({"kind": "convert", "name": f"{stage.name}:convert",
                             "job_name": f"{chain.name}-{stage.name}-convert", "dir": str(stage_dir),
                             "train_steps": None, "world_size": 1,
                             "resources": convert.model_dump(exclude_none=True),
                             "run": [sys.executable, "-m", "megannm", "convert", str(previous[0]), str(init),
                                     "--to", "consolidated"],
                             "note": f"tensor x pipeline {previous[1][0]}x{previous[1][1]} -> {layout[0]}x{layout[1]}"})
            overrides.append(f"checkpoint.init_from={init}")
        try:
            recipe = load_recipe(recipe_path, overrides, world_size=res.world_size())
        except RecipeError as e:
            raise ChainError(f"{where}.recipe: {e} (world size {res.world_size()} = nodes {res.nodes or 1} x "
                             f"{res.tasks_per_node()} tasks per node)") from None
        ckpt = Path(recipe.checkpoint.dir).resolve() if recipe.checkpoint.dir else stage_dir / "checkpoints"
        if ckpt in ckpt_owner:
            raise ChainError(f"{where}.recipe: checkpoint.dir {ckpt} is also stage {ckpt_owner[ckpt]}'s: a stage "
                             f"would resume from another stage's checkpoints (give each its own)")
        ckpt_owner[ckpt] = stage.name
        jobs.append({"kind": "train", "name": stage.name, "job_name": f"{chain.name}-{stage.name}",
                     "dir": str(stage_dir), "train_steps": recipe.schedule.train_steps,
                     "world_size": res.world_size(), "resources": res.model_dump(exclude_none=True),
                     "recipe": str(recipe_path), "overrides": overrides, "checkpoint_dir": str(ckpt),
                     "init_from": recipe.checkpoint.init_from})
        previous = (ckpt, layout)
    return {"chain": str(chain_path.resolve()), "name": chain.name, "run_dir": str(run), "stages": jobs}


def sbatch_command(job: dict, dependency: Optional[str]) -> list[str]:
    """``sbatch --parsable [--dependency=afterok:<previous>] <resources> slurm/train.sbatch RECIPE overrides``
    (a conversion job: ``... --wrap "python -m megannm convert ..."``)."""
    res = SlurmConfig.model_validate(job["resources"])
    log = "slurm-%j.out" if job["kind"] == "train" else "convert-%j.out"
    cmd = ["sbatch", "--parsable", f"--job-name={job['job_name']}", f"--output={Path(job['dir']) / log}"]
    if dependency:
        cmd.append(f"--dependency=afterok:{dependency}")
    # The jobs run this interpreter (a shared venv on a cluster); a later --export in `extra` wins.
    cmd += [f"--export=ALL,MEGANNM_PYTHON={sys.executable}", *sbatch_args(res)]
    if job["kind"] == "convert":
        done = shlex.quote(str(Path(job["run"][5]) / "consolidated.json"))  # a resubmitted chain converts once
        return cmd + ["--wrap", f"test -e {done} || exec {shlex.join(job['run'])}"]
    return cmd + [str(TRAIN_SBATCH), job["recipe"], *job["overrides"]]


# ---------------------------------------------------------------------------------------------------------------------
# talking to Slurm


def _slurm(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{cmd[0]}: not found (is this a Slurm login node? `megannm stage CHAIN --dry-run` prints "
                         f"the commands without Slurm)") from None
    if check and out.returncode != 0:
        said = (out.stderr.strip() or out.stdout.strip() or f"exit code {out.returncode}").splitlines()[-1]
        raise SlurmError(f"{' '.join(cmd[:2])} ...: {said}")
    return out


def _query(cmd: list[str]) -> subprocess.CompletedProcess:
    """squeue / scontrol: an unknown job id is an answer (exit 1, "Invalid job id"); any other failure (slurmctld
    busy or unreachable) is retried twice, then raised, rather than shown as a job state."""
    for attempt in range(3):
        out = _slurm(cmd, check=False)
        if out.returncode == 0 or "Invalid job id" in out.stderr:
            return out
        time.sleep(1 + attempt)
    return _slurm(cmd)


def job_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (state, reason). Live jobs from squeue; finished ones from sacct (needs slurmdbd); without an
    accounting database sacct fails ("accounting storage is disabled"), so fall back to ``scontrol show job``,
    which knows finished jobs for MinJobAge seconds (300 by default) after they end. Older: ("UNKNOWN", why)."""
    ids = [str(j) for j in job_ids]
    states: dict[str, tuple[str, str]] = {}
    if not ids:
        return states
    q = _query(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%r"])
    for line in q.stdout.splitlines():
        jid, state, reason = (line.split("|") + ["", ""])[:3]
        if jid in ids:
            states[jid] = (state, reason if reason != "None" else "")
    rest = [j for j in ids if j not in states]
    if rest:
        a = _slurm(["sacct", "-n", "-X", "-P", "-j", ",".join(rest), "-o", "JobIDRaw,State,ExitCode"], check=False)
        if a.returncode == 0:
            for line in a.stdout.splitlines():
                jid, state, code = (line.split("|") + ["", ""])[:3]
                if jid in rest and state:
                    states[jid] = (state.split()[0], f"exit {code}" if state.startswith("FAILED") else "")
    for jid in [j for j in ids if j not in states]:
        s = _query(["scontrol", "show", "job", "-o", jid])
        fields = dict(kv.split("=", 1) for kv in s.stdout.split() if "=" in kv)
        if s.returncode == 0 and "JobState" in fields:
            reason = fields.get("Reason", "None")
            if fields["JobState"] == "FAILED" and fields.get("ExitCode"):
                reason = f"exit {fields['ExitCode']}"
            states[jid] = (fields["JobState"], "" if reason == "None" else reason)
        else:
            states[jid] = ("UNKNOWN", "finished longer ago than slurmctld's MinJobAge and no accounting database")
    return states


def describe(state: str, reason: str) -> str:
    """PENDING (why), "never (DependencyNeverSatisfied)" for a job whose dependency failed, FAILED (exit code)."""
    if state == "PENDING" and reason == "DependencyNeverSatisfied":
        return "never (DependencyNeverSatisfied)"
    return f"{state} ({reason})" if reason and state in ("PENDING", "FAILED", "UNKNOWN") else state


# ---------------------------------------------------------------------------------------------------------------------
# commands


def _read_run(run: str | Path) -> tuple[Path, dict]:
    run = Path(run)
    path = run if run.name == STAGES_FILE else run / STAGES_FILE
    try:
        return path.parent, json.loads(path.read_text())
    except FileNotFoundError:
        raise ChainError(f"{path}: not found (a run folder written by `megannm stage CHAIN.yaml`)") from None
    except json.JSONDecodeError as e:
        raise ChainError(f"{path}: not valid JSON ({e})") from None


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def live_jobs(run: Path) -> list[str]:
    """"stage (job N, STATE)" for every job of an earlier submission to ``run`` that is still pending or running."""
    if not (run / STAGES_FILE).exists():
        return []
    _, info = _read_run(run)
    stages = [s for s in info["stages"] if s.get("job_id")]
    states = job_states([s["job_id"] for s in stages])
    return [f"{s['name']} (job {s['job_id']}, {describe(*states[s['job_id']])})" for s in stages
            if states[s["job_id"]][0] in LIVE]


def submit(chain_path: str, run_dir: Optional[str] = None, dry_run: bool = False, out=print) -> dict:
    p = chain_jobs(chain_path, run_dir)
    run = Path(p["run_dir"])
    if dry_run:
        out(f"# chain {p['name']}: {len(p['stages'])} stages, run folder {run} (dry run: nothing submitted)")
        out("mkdir -p " + " ".join(shlex.quote(s["dir"]) for s in p["stages"]))
        for i, s in enumerate(p["stages"]):
            cmd = sbatch_command(s, f"$job{i}" if i else None)
            line = " ".join(c if c.startswith("--dependency=") else shlex.quote(c) for c in cmd)
            out(f"job{i + 1}=$({line})  # {s['name']}" + (f": {s['note']}" if s.get("note") else ""))
        return p
    if not TRAIN_SBATCH.exists():
        raise ChainError(f"{TRAIN_SBATCH}: the batch script is missing (megannm must run from its source tree: "
                         f"pip install -e .)")
    live = live_jobs(run)
    if live:
        raise ChainError(f"{run}: jobs of an earlier submission are still live: {', '.join(live)} (wait, or "
                         f"`megannm stage cancel {run}` first)")
    previous, submitted, made = None, [], []
    for i, s in enumerate(p["stages"]):
        made += _mkdirs(Path(s["dir"]))  # sbatch's --output folder must exist
        cmd = sbatch_command(s, previous)
        try:
            res = _slurm(cmd)
        except SlurmError as e:
            if submitted:
                _slurm(["scancel", *submitted], check=False)
            for d in reversed(made):  # leave no empty stage (or run) folder behind a failed submission
                try:
                    d.rmdir()  # only if still empty: a cancelled job's log stays
                except OSError:
                    pass
            raise SlurmError(f"stage {s['name']}: {e}" + (f" (cancelled this submission's jobs "
                                                           f"{', '.join(submitted)})" if submitted else "")) from None
        previous = res.stdout.strip().split(";")[0]
        submitted.append(previous)
        s.update(job_id=previous, depends_on=submitted[-2] if i else None, command=cmd)
        # after every job, so that status / cancel / the live check know each submitted job whatever happens next
        atomic_write_json(run / STAGES_FILE, dict(p, submitted_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            stages=[j for j in p["stages"] if "job_id" in j]))
    rows = [[s["name"], s["job_id"], s["depends_on"] or "-", str(s["world_size"]), s["resources"].get("time", "-"),
             _short(s["recipe"]) if s["kind"] == "train" else s["note"]] for s in p["stages"]]
    out(_table(rows, ["stage", "job", "after", "ranks", "time", "recipe"]))
    out(f"run folder: {run}  (megannm stage status {run})")
    return p


def _mkdirs(folder: Path) -> list[Path]:
    """``mkdir -p``; returns the folders it made, outermost first."""
    missing = [d for d in (folder, *folder.parents) if not d.exists()][::-1]
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _progress(stage: dict) -> str:
    """Last logged step / the stage's steps, from its metrics.jsonl (written by rank 0)."""
    path = Path(stage["dir"]) / "metrics.jsonl"
    step = None
    if stage["kind"] == "train" and path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            if "step" in rec and rec.get("split") == "train":
                step = rec["step"]
    return f"{step}/{stage['train_steps']}" if step is not None else "-"


def status(run: str, out=print) -> list[dict]:
    run_dir, info = _read_run(run)
    stages = info["stages"]
    states = job_states([s["job_id"] for s in stages])
    rows, result = [], []
    for s in stages:
        state = describe(*states[s["job_id"]])
        result.append({"name": s["name"], "job_id": s["job_id"], "state": state})
        rows.append([s["name"], s["job_id"], state, _progress(s)])
    out(_table(rows, ["stage", "job", "state", "step"]))
    return result


def cancel(run: str, out=print) -> list[str]:
    _, info = _read_run(run)
    stages = info["stages"]
    states = job_states([s["job_id"] for s in stages])
    live = [s for s in stages if states[s["job_id"]][0] in LIVE]
    if live:
        _slurm(["scancel", *[s["job_id"] for s in live]])
    out("cancelled: " + (", ".join(f"{s['name']} (job {s['job_id']}, {describe(*states[s['job_id']])})"
                                   for s in live) or "nothing (no stage is pending or running)"))
    return [s["job_id"] for s in live]


# ---------------------------------------------------------------------------------------------------------------------
# inside slurm/train.sbatch: does this job's allocation hold the recipe?


def allocation_problem(recipe_path: str, overrides: list[str], env) -> Optional[str]:
    """Why this batch job cannot run the recipe, as one line with the sbatch command that can (None when it can).

    sbatch reads its resources before the script runs, so ``sbatch slurm/train.sbatch RECIPE`` alone gets Slurm's
    default of one task; the recipe's ``slurm:`` section (``megannm stage`` passes it) says what it wants."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    per_node = int((env.get("SLURM_NTASKS_PER_NODE") or "1").split("(")[0])  # e.g. "8" or "8(x2)"
    tasks = int(env.get("SLURM_NTASKS") or nodes * per_node)
    try:
        recipe = load_recipe(recipe_path, overrides)
    except RecipeError as e:
        return str(e)
    from megannm.config import check_recipe
    errors = check_recipe(recipe, world_size=tasks)
    if not errors:
        return None
    res = recipe.slurm
    if not (res.nodes or res.ntasks_per_node or res.gpus_per_node):  # no resources in the recipe: the smallest fit
        res = res.model_copy(update={"nodes": 1, "ntasks_per_node": recipe.parallel.model_parallel})
    res = res.model_copy(update={"nodes": res.nodes or 1, "ntasks_per_node": res.tasks_per_node()})
    command = shlex.join(["sbatch", *sbatch_args(res), "slurm/train.sbatch", recipe_path, *overrides])
    key, msg = errors[0]
    return (f"{recipe_path}: this job has {tasks} task(s) on {nodes} node(s), and {key}: {msg}; submit it with its "
            f"resources: {command}  (or run the chain with `megannm stage CHAIN.yaml`, which passes them)")

