"""Launchers: parallel.py's reading of each launcher's environment (srun, the batch step, mpirun inside an
allocation, torchrun), and the same tiny training run under Open MPI's mpirun and torchrun: both are the same
computation (2 data-parallel ranks, ZeRO 1), so the losses are equal. Then the rendezvous host: Slurm's node lists
(checked against ``scontrol show hostnames``), MPI across nodes (mpi4py, or a refusal instead of 127.0.0.1), and
``sbatch slurm/train.sbatch RECIPE`` without resources on a one-node Slurm cluster."""
import shutil

import pytest

from megannm.parallel import LaunchInfo, discover_launch
from tests import dist
from tests.dist import run

pytest.register_assert_rewrite("tests.slurm_cluster")
from tests.slurm_cluster import TINY_STEPS, events, losses, metrics  # noqa: E402

pytest_plugins = ["tests.slurm_cluster"]  # its session fixtures: the tiny recipe, the torchrun reference


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "16",
              "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[007-008,012]", "SLURM_JOB_NODELIST": "gpu[007-008,012]"}


@pytest.mark.parametrize("env, expected", [
    (SLURM_STEP, LaunchInfo(3, 16, 1, "gpu007", 20000 + 4242, "slurm")),  # one srun task per device
    # the batch script itself (no SLURM_STEP_ID) is no rank
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}, LaunchInfo(0, 1, 0, "127.0.0.1", 0, "single")),
    # mpirun inside an allocation: its ranks also see the SLURM_* of its one-task-per-node daemon step
    ({**SLURM_STEP, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "OMPI_COMM_WORLD_RANK": "5",
      "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "5", "MASTER_ADDR": "gpu007",
      "MASTER_PORT": "29600"}, LaunchInfo(5, 16, 5, "gpu007", 29600, "mpirun")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29501", "TORCHELASTIC_RUN_ID": "x",
      **SLURM_STEP}, LaunchInfo(1, 2, 1, "127.0.0.1", 29501, "torchrun")),
])
def test_discover_launch(env, expected):
    assert discover_launch(env) == expected


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
def test_mpirun_trains_like_torchrun(tiny_recipe, reference_run, tmp_path):
    reference = metrics(reference_run)  # torchrun, 2 ranks (a session fixture, shared with the Slurm tests)
    run(["-m", "megannm", "train", str(tiny_recipe), f"logging.dir={tmp_path}"], nproc=2, launcher="mpirun")
    m = metrics(tmp_path)
    for launcher, records in (("torchrun", reference), ("mpirun", m)):
        layout = events(records, "start")[0]["layout"]
        assert f"world 2 = tensor 1 x data 2 x pipeline 1 (launcher {launcher})" in layout
    assert sorted(losses(reference)) == list(range(1, TINY_STEPS + 1))
    assert losses(reference)[TINY_STEPS] < losses(reference)[1] - 0.5  # it learned something
    assert losses(m) == losses(reference)


# ---------------------------------------------------------------------------------------------------------------------
# the rendezvous host: Slurm node lists, MPI across nodes


# node lists as Slurm prints them (SLURM_JOB_NODELIST, squeue %N), expanded as `scontrol show hostnames` does
HOSTLISTS = [
    ("rack[1-2]-node[01-04]", ["rack1-node01", "rack1-node02", "rack1-node03", "rack1-node04", "rack2-node01",
                               "rack2-node02", "rack2-node03", "rack2-node04"]),
    ("gpu[003-005,010],cpu1", ["gpu003", "gpu004", "gpu005", "gpu010", "cpu1"]),
    ("a[1-2],b,c[09-11]", ["a1", "a2", "b", "c09", "c10", "c11"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("n1,n[3-4]", ["n1", "n3", "n4"]),
    ("gpu-[1-2]x[3-4]", ["gpu-1x3", "gpu-1x4", "gpu-2x3", "gpu-2x4"]),
    ("localhost", ["localhost"]),
]


@pytest.mark.parametrize("nodelist, hosts", HOSTLISTS)
def test_slurm_node_lists_expand_as_scontrol_does(nodelist, hosts):
    from megannm.parallel import expand_hostlist
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_the_node_list_parser_agrees_with_scontrol(tmp_path):
    import os
    import subprocess
    conf = tmp_path / "slurm.conf"  # `scontrol show hostnames` only parses, but wants a configuration to read
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1\nPartitionName=p "
                    "Nodes=localhost\n")
    env = dict(os.environ, SLURM_CONF=str(conf))
    for nodelist, hosts in HOSTLISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], env=env, capture_output=True, text=True,
                             timeout=30)
        assert out.stdout.split() == hosts, (nodelist, out.stderr)


@pytest.mark.parametrize("bad", ["node[010-008]", "x[1", "a[b]", "a,,b", "a]"])
def test_a_malformed_node_list_is_an_error_naming_it(bad):
    from megannm.parallel import expand_hostlist
    with pytest.raises(ValueError, match=r"Slurm node list"):
        expand_hostlist(bad)


def test_srun_across_racks_rendezvous_on_the_first_node():
    env = {**SLURM_STEP, "SLURM_STEP_NODELIST": "rack[1-2]-node[01-04]", "SLURM_JOB_NODELIST": "rack[1-2]-node[01-04]"}
    assert discover_launch(env).master_addr == "rack1-node01"  # not "rack1"
    assert discover_launch({**env, "MASTER_ADDR": "10.0.0.7"}).master_addr == "10.0.0.7"  # the sbatch script's


@pytest.mark.parametrize("env, message", [
    ({"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, "mpirun -x MASTER_ADDR"),
    ({"PMI_RANK": "3", "PMI_SIZE": "16", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "8"}, "mpiexec -genv MASTER_ADDR"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "SLURM_JOB_NUM_NODES": "2"}, "mpirun -x"),
])
def test_mpi_across_nodes_never_defaults_to_localhost(env, message):
    from megannm.parallel import LayoutError
    with pytest.raises(LayoutError) as e:
        discover_launch(env)
    assert message in str(e.value) and "mpi4py" in str(e.value)
    one_node = {**env, "OMPI_COMM_WORLD_LOCAL_SIZE": env.get("OMPI_COMM_WORLD_SIZE"),
                "MPI_LOCALNRANKS": env.get("PMI_SIZE"), "SLURM_JOB_NUM_NODES": "1"}
    assert discover_launch({k: v for k, v in one_node.items() if v}).master_addr == "127.0.0.1"
    assert discover_launch({**env, "MASTER_ADDR": "n001"}).master_addr == "n001"


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI's mpirun is not installed")
@pytest.mark.distributed
def test_mpirun_ranks_are_read_from_mpi_itself(tmp_path):
    pytest.importorskip("mpi4py")
    import json
    import socket
    import subprocess
    import sys
    code = ("import json, sys; from megannm.parallel import discover_launch as d; i = d(); "
            "open(f'{sys.argv[1]}/rank{i.rank}.json', 'w').write(json.dumps(i.__dict__))")
    out = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "-c",
                          code, str(tmp_path)], capture_output=True, text=True, timeout=120, env=dist.base_env())
    assert out.returncode == 0, out.stderr[-2000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["rank"], i["local_rank"], i["world_size"], i["launcher"]) for i in ranks] == [(0, 0, 2, "mpirun"),
                                                                                           (1, 1, 2, "mpirun")]
    # rank 0's host and a port free there, broadcast: no MASTER_ADDR needed, and never 127.0.0.1 by default
    assert {i["master_addr"] for i in ranks} == {socket.gethostname()} and len({i["master_port"] for i in ranks}) == 1


# ---------------------------------------------------------------------------------------------------------------------
# `sbatch slurm/train.sbatch RECIPE` as the README writes it


def test_an_allocation_too_small_for_the_recipe_says_what_to_pass():
    from megannm.slurm import allocation_problem
    recipe = "recipes/nmm-7b/joint.yaml"
    msg = allocation_problem(recipe, [], {"SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1"})
    assert msg.startswith(f"{recipe}: this job has 1 task(s) on 1 node(s)") and "\n" not in msg
    assert f"sbatch --nodes=8 --ntasks-per-node=8 --gpus-per-node=8 slurm/train.sbatch {recipe}" in msg
    assert allocation_problem(recipe, [], {"SLURM_JOB_NUM_NODES": "8", "SLURM_NTASKS_PER_NODE": "8(x8)"}) is None
    assert allocation_problem("recipes/toy/joint.yaml", [], {"SLURM_NTASKS": "1"}) is None  # one task holds it


def test_sbatch_without_resources_ends_with_the_command_to_use(slurm_cluster, tiny_recipe, tmp_path):
    import sys
    log = tmp_path / "job.out"
    job = slurm_cluster.run(["sbatch", "--parsable", f"--output={log}", f"--export=ALL,MEGANNM_PYTHON={sys.executable}",
                             str(dist.REPO / "slurm" / "train.sbatch"), str(tiny_recipe),
                             "parallel.tensor_parallel=2", f"logging.dir={tmp_path}"]).stdout.strip().split(";")[0]
    info = slurm_cluster.wait_finished(job, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text
    assert "--nodes=1 --ntasks-per-node=2 slurm/train.sbatch" in text and "parallel.tensor_parallel=2" in text
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started
