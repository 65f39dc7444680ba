"""Launchers: parallel.py's reading of each launcher's environment (srun, the batch step, mpirun inside an
allocation, torchrun), and the same tiny training run under Open MPI's mpirun and torchrun: both are the same
computation (2 data-parallel ranks, ZeRO 1), so the losses are equal."""
import shutil

import pytest

from megannm.parallel import LaunchInfo, discover_launch
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
        assert f"world 2 = tensor 1 x data 2 x pipeline 1 (launcher {launcher})" in events(records, "start")[0]["layout"]
    assert sorted(losses(reference)) == list(range(1, TINY_STEPS + 1))
    assert losses(reference)[TINY_STEPS] < losses(reference)[1] - 0.5  # it learned something
    assert losses(m) == losses(reference)
