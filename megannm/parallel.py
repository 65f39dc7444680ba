"""THE one place for process groups.

Rank discovery for every launcher megannm supports (torchrun, the ``deepspeed`` launcher, ``srun``, ``mpirun``),
torch.distributed initialisation (gloo on the CPU, nccl on GPUs), megatron-core ``parallel_state`` (tensor and
pipeline groups), the adapter DeepSpeed's ZeRO needs over megatron-core's groups, and the DeepSpeed pipeline topology
built in Megatron's rank order (tensor innermost, then data, pipeline outermost).

Nothing else in megannm reads launcher environment variables or creates process groups: the result is a ``Layout``
that callers pass explicitly.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """The launcher's world cannot hold the requested tensor x pipeline layout."""


@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | slurm | mpirun | single


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm nodelist such as ``gpu[003-007,010],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return "127.0.0.1"
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def discover_launch(env: Optional[dict] = None) -> LaunchInfo:
    """Read rank, world size, local rank and the rendezvous from whichever launcher started this process."""
    env = os.environ if env is None else env
    port_default = 29500
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher, or a user who set them
        launcher = "deepspeed" if "LOCAL_SIZE" in env and "TORCHELASTIC_RUN_ID" not in env else "torchrun"
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", port_default)), launcher)
    # Open MPI's mpirun before srun: mpirun inside a Slurm allocation starts its daemons as a Slurm step, so its
    # ranks also see SLURM_PROCID/SLURM_NTASKS of that one-task-per-node step (node index, node count).
    if "OMPI_COMM_WORLD_RANK" in env:  # Open MPI's mpirun
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                          int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                          int(env.get("MASTER_PORT", port_default)), "mpirun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # srun, one task per device
        # (SLURM_STEP_ID: the batch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but is no rank)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          env.get("MASTER_ADDR", _first_slurm_host(nodelist)),
                          int(env.get("MASTER_PORT", 20000 + job % 20000)), "slurm")
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Intel MPI
        return LaunchInfo(int(env["PMI_RANK"]), int(env["PMI_SIZE"]), int(env.get("MPI_LOCALRANKID", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", port_default)), "mpirun")
    return LaunchInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0) or 0), "single")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: every factor of world = tp x dp x pp and this rank's coordinate on each."""
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    local_rank: int = 0
    launcher: str = "single"

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return (f"world {self.world_size} = tensor {self.tp} x data {self.dp} x pipeline {self.pp} "
                f"(launcher {self.launcher})")

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "dp": self.dp}


def check_layout(world_size: int, tp: int, pp: int) -> int:
    """Data-parallel size, or one line naming every factor when the world does not divide."""
    if tp < 1 or pp < 1 or world_size % (tp * pp):
        raise LayoutError(f"parallel layout: world size {world_size} is not tensor {tp} x pipeline {pp} x data "
                          f"(expected a multiple of {tp * pp})")
    return world_size // (tp * pp)


def _skip_deepspeed_cpu_builds() -> None:
    """DeepSpeed JIT-compiles a shared-memory comm op on first init on the CPU (42 s); gloo does our collectives."""
    try:
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # pragma: no cover - older DeepSpeed without the registry
        pass


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(tp: int = 1, pp: int = 1, timeout_s: int = 600, env: Optional[dict] = None) -> Layout:
    """Initialise torch.distributed, DeepSpeed's comm backend and megatron-core's parallel_state; return the layout.

    Works for a single process too (a world of one), so model code can always use megatron-core layers.
    """
    info = discover_launch(env)
    dp = check_layout(info.world_size, tp, pp)
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        port = info.master_port or _free_port()
        # DeepSpeed reads the torchrun variables; srun and mpirun do not set them. A plain process exports none:
        # its children (launchers, sbatch) would read a world of one and a port already taken.
        if info.launcher != "single":
            for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size),
                               ("MASTER_ADDR", info.master_addr), ("MASTER_PORT", port)):
                os.environ.setdefault(key, str(value))
        dist.init_process_group(backend=backend, init_method=f"tcp://{info.master_addr}:{port}",
                                rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    _skip_deepspeed_cpu_builds()
    # DeepSpeed's engine reads LOCAL_RANK (asserts it, or OMPI_COMM_WORLD_LOCAL_RANK, which must then agree); srun
    # sets neither, and a value inherited from the submitting shell would be wrong for every rank but one.
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))

    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # Megatron's order: tensor innermost, then data, pipeline outermost ("tp-cp-ep-dp-pp").
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return Layout(world_size=info.world_size, rank=info.rank, tp=tp, pp=pp, dp=dp,
                  tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                  dp_rank=ps.get_data_parallel_rank(), local_rank=info.local_rank, launcher=info.launcher)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown() -> None:
    """Barrier then destroy: without it ~1 run in 5 aborted at exit with gloo (measured)."""
    from megatron.core import parallel_state as ps
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# groups other code needs, handed out from here


def tensor_group():
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_group()


def data_group():
    from megatron.core import parallel_state as ps
    return ps.get_data_parallel_group()


def pipeline_group():
    from megatron.core import parallel_state as ps
    return ps.get_pipeline_model_parallel_group()


def all_reduce(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over ``group`` (None = world); a no-op when not distributed."""
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class MegatronMPU:
    """What DeepSpeed's ZeRO asks of an ``mpu``, answered from megatron-core's ``parallel_state``.

    DeepSpeed calls ``get_model_parallel_{world_size,rank,group}``, which megatron-core does not define; without a
    pipeline the model-parallel group is the tensor-parallel group. Every other attribute falls through to
    ``parallel_state`` (get_data_parallel_group, get_tensor_model_parallel_rank, ...).
    """

    def __init__(self):
        from megatron.core import parallel_state
        self._ps = parallel_state

    def __getattr__(self, name):
        return getattr(self._ps, name)

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()


def pipeline_topology(layout: Layout):
    """DeepSpeed's topology with megatron-core's rank order: axes (pipe, data, model), model innermost."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)


def broadcast_in_tensor_group(t: torch.Tensor) -> torch.Tensor:
    """Make ``t`` identical on every tensor-parallel rank (the group's first rank wins); no-op at TP=1."""
    from megatron.core import parallel_state as ps
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return t
    if ps.get_tensor_model_parallel_world_size() == 1:
        return t
    dist.broadcast(t, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
    return t
