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
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

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


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a Slurm node list, in the order ``scontrol show hostnames`` prints them:
    ``gpu[003-005,010],cpu1`` -> gpu003 gpu004 gpu005 gpu010 cpu1; ``rack[1-2]-node[01-02]`` -> rack1-node01
    rack1-node02 rack2-node01 rack2-node02 (several bracket groups in one name: every combination, the last
    varying fastest). Zero padding is kept from the range's first bound. Raises ValueError on a malformed list."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        pieces = re.findall(r"[^\[\]]+|\[[^\[\]]*\]", name)  # literal text and [ranges], alternating
        if not name or "".join(pieces) != name:
            raise ValueError(f"Slurm node list {nodelist!r}: cannot parse {name!r}")
        expanded = [""]
        for piece in pieces:
            values = ([piece] if not piece.startswith("[") else
                      [v for part in piece[1:-1].split(",") for v in _expand_range(part, nodelist)])
            expanded = [h + v for h in expanded for v in values]
        hosts += expanded
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in nodelist:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _expand_range(part: str, nodelist: str) -> list[str]:
    lo, sep, hi = part.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise ValueError(f"Slurm node list {nodelist!r}: bad range {part!r}")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise ValueError(f"Slurm node list {nodelist!r}: range {part!r} runs backwards")
    return [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: where task 0 of a step runs under srun's default (block) distribution."""
    return expand_hostlist(nodelist)[0]


def _mpi_launch(launcher: str, env) -> Optional[LaunchInfo]:
    """Rank discovery from MPI itself, where ``mpi4py`` imports: exact under any MPI launcher (Open MPI's or
    MPICH's mpirun, ``srun --mpi=pmix``), across nodes. Local ranks come from the node-local communicator, and
    rank 0's host name and a port free there are broadcast, so no launcher variable has to name the master (an
    explicit MASTER_ADDR / MASTER_PORT still wins)."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    host, port = comm.bcast((socket.gethostname(), _free_port("")) if comm.rank == 0 else None, root=0)
    local_rank = local.rank
    local.Free()
    return LaunchInfo(comm.rank, comm.size, local_rank, env.get("MASTER_ADDR", host),
                      int(env.get("MASTER_PORT", port)), launcher)


def _mpi_master(env, size: int, local_size: Optional[int], launcher_args: str) -> str:
    """MASTER_ADDR of an MPI run without mpi4py: given, or 127.0.0.1 for a run known to be on one node. A run
    across nodes without it is refused: 127.0.0.1 there would make every node rendezvous with itself."""
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    nodes = int(env.get("SLURM_JOB_NUM_NODES", "1"))
    multi_node = local_size < size if local_size is not None else nodes > 1
    if multi_node:
        raise LayoutError(f"mpirun across nodes ({size} ranks, {local_size or '?'} on this node): MASTER_ADDR is not "
                          f"set (pass {launcher_args} MASTER_ADDR=<rank 0's host>, or install mpi4py to read the "
                          f"rendezvous from MPI)")
    return "127.0.0.1"


def discover_launch(env: Optional[dict] = None, mpi: Optional[bool] = None) -> LaunchInfo:
    """Read rank, world size, local rank and the rendezvous from whichever launcher started this process.

    ``mpi``: ask MPI (``mpi4py``) under an MPI launcher; by default only for this process's own environment (a
    dict passed in is someone else's: parsed, never answered by this process's MPI)."""
    use_mpi = env is None if mpi is None else mpi
    env = os.environ if env is None else env
    port_default = 29500
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, the deepspeed launcher, or a user who set them
        launcher = "deepspeed" if "LOCAL_SIZE" in env and "TORCHELASTIC_RUN_ID" not in env else "torchrun"
        return LaunchInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", port_default)), launcher)
    # Open MPI's mpirun before srun: mpirun inside a Slurm allocation starts its daemons as a Slurm step, so its
    # ranks also see SLURM_PROCID/SLURM_NTASKS of that one-task-per-node step (node index, node count).
    if "OMPI_COMM_WORLD_RANK" in env:  # Open MPI's mpirun
        found = _mpi_launch("mpirun", env) if use_mpi else None
        if found is not None:
            return found
        size, local = int(env["OMPI_COMM_WORLD_SIZE"]), env.get("OMPI_COMM_WORLD_LOCAL_SIZE")
        return LaunchInfo(int(env["OMPI_COMM_WORLD_RANK"]), size, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                          _mpi_master(env, size, int(local) if local else None, "mpirun -x"),
                          int(env.get("MASTER_PORT", port_default)), "mpirun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:  # srun, one task per device
        # (SLURM_STEP_ID: the batch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but is no rank)
        found = _mpi_launch("slurm", env) if use_mpi and "PMIX_RANK" in env else None  # srun --mpi=pmix
        if found is not None:
            return found
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                          env.get("MASTER_ADDR") or _first_slurm_host(nodelist),
                          int(env.get("MASTER_PORT", 20000 + job % 20000)), "slurm")
    if "PMI_RANK" in env and "PMI_SIZE" in env:  # MPICH / Intel MPI (Hydra)
        found = _mpi_launch("mpirun", env) if use_mpi else None
        if found is not None:
            return found
        size, local = int(env["PMI_SIZE"]), env.get("MPI_LOCALNRANKS")
        return LaunchInfo(int(env["PMI_RANK"]), size, int(env.get("MPI_LOCALRANKID", 0)),
                          _mpi_master(env, size, int(local) if local else None, "mpiexec -genv"),
                          int(env.get("MASTER_PORT", port_default)), "mpirun")
    return LaunchInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0) or 0), "single")


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: every factor of world = tp x dp x pp, this rank's coordinate on each, and the process
    groups of its three axes. Whoever needs a collective takes the group from here, passed in explicitly."""
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
    tp_group: Any = field(default=None, compare=False, repr=False)  # ranks of this rank's tensor-parallel group
    dp_group: Any = field(default=None, compare=False, repr=False)  # ... of its data-parallel group
    pp_group: Any = field(default=None, compare=False, repr=False)  # ... of its pipeline (one rank per stage)

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


def init_parallel(tp: int = 1, pp: int = 1, timeout_s: float = 600, env: Optional[dict] = None) -> Layout:
    """Initialise torch.distributed, DeepSpeed's comm backend and megatron-core's parallel_state; return the layout.

    Works for a single process too (a world of one), so model code can always use megatron-core layers.
    ``timeout_s``: how long one collective may wait (the recipe's ``parallel.timeout_minutes``); past it the rank
    fails with the collective named instead of hanging until the job's time limit.
    """
    info = discover_launch(env)
    dp = check_layout(info.world_size, tp, pp)
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # NCCL's watchdog aborts the communicator and ends the process on a failed or timed-out collective, so
        # one crashed rank fails the job (and srun --wait ends the rest) instead of leaving the others blocked.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
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
                  dp_rank=ps.get_data_parallel_rank(), local_rank=info.local_rank, launcher=info.launcher,
                  tp_group=ps.get_tensor_model_parallel_group(), dp_group=ps.get_data_parallel_group(),
                  pp_group=ps.get_pipeline_model_parallel_group())


def _free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` ("" = every interface: a master that other nodes connect to)."""
    with socket.socket() as s:
        s.bind((host, 0))
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
# collectives over a group handed in by the caller (from its Layout); all of them are no-ops in a world of one


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def all_reduce(t: torch.Tensor, group=None, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over ``group`` (None = the whole world); a no-op when not distributed."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t


def broadcast(t: torch.Tensor, group, src: int = 0) -> torch.Tensor:
    """In-place broadcast from the ``src``-th rank OF ``group`` (0 = its first rank) to the rest of the group."""
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension; the backward keeps this rank's slice. (megatron-core's
    gather_from_tensor_model_parallel_region allocates its buffer on ``torch.cuda.current_device()``, so it cannot
    run on the CPU.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        mine = grad.chunk(dist.get_world_size(ctx.group), dim=-1)[dist.get_rank(ctx.group)]
        return mine.contiguous(), None


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[..., n] on each rank of ``group`` -> [..., n * size] in rank order, on every rank (differentiable)."""
    if group_size(group) == 1:
        return x
    return _GatherLastDim.apply(x, group)


def check_pipeline_grid(grid, layout: "Layout") -> None:
    """DeepSpeed's pipeline grid and this layout's groups (megatron-core's) must hold the same ranks on every axis:
    the layers reduce over megatron-core's tensor group while DeepSpeed partitions activations over its own."""
    def ranks(group):
        return sorted(dist.get_process_group_ranks(group))

    pairs = (("tensor", sorted(grid.slice_group), ranks(layout.tp_group)),
             ("data", sorted(grid.dp_group), ranks(layout.dp_group)),
             ("pipeline", sorted(grid.pp_group), ranks(layout.pp_group)))
    for axis, theirs, ours in pairs:
        if theirs != ours:
            raise RuntimeError(f"parallel layout: rank {layout.rank}: DeepSpeed's {axis} group {theirs} differs "
                               f"from megatron-core's {ours} (the topology must be built in Megatron's order by "
                               f"megannm.parallel.pipeline_topology)")


class MegatronMPU:
    """What DeepSpeed's ZeRO asks of an ``mpu``, answered from the layout's groups (megatron-core's).

    DeepSpeed calls ``get_model_parallel_{world_size,rank,group}``, which megatron-core does not define; without a
    pipeline the model-parallel group is the tensor-parallel group. Anything else DeepSpeed asks for falls through to
    megatron-core's ``parallel_state``, which holds the same groups.
    """

    def __init__(self, layout: "Layout"):
        from megatron.core import parallel_state
        self._ps = parallel_state
        self.layout = layout

    def __getattr__(self, name):
        return getattr(self._ps, name)

    def get_model_parallel_world_size(self):
        return self.layout.tp

    def get_model_parallel_rank(self):
        return self.layout.tp_rank

    def get_model_parallel_group(self):
        return self.layout.tp_group

    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_world_size(self):
        return self.layout.dp

    def get_data_parallel_rank(self):
        return self.layout.dp_rank


def pipeline_topology(layout: Layout):
    """DeepSpeed's topology with megatron-core's rank order: axes (pipe, data, model), model innermost."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    return PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)


def broadcast_tensors(tensors: Optional[dict], spec: dict, group, src: int = 0) -> dict:
    """A dict of tensors from the ``src``-th rank OF ``group`` to every rank of it.

    ``spec`` maps each name to ``(shape, dtype)``, known on every rank, so receivers allocate without a first round
    trip; the sender passes its ``tensors`` (the same names, shapes and dtypes), the others pass None. Tensors
    travel on the group's device (CUDA for NCCL, the CPU for gloo), in ``spec``'s order, and come back there; a
    world of one, or a group of one, hands the sender's tensors back unchanged."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if tensors is None:
            raise ValueError("broadcast_tensors: nothing to receive from in a group of one")
        return tensors
    on = device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
    sender = dist.get_rank(group) == src
    if sender:
        for name, (shape, dtype) in spec.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"broadcast_tensors: {name} is {tuple(t.shape)} {t.dtype}, the spec says "
                                 f"{tuple(shape)} {dtype}")
    out = {}
    for name, (shape, dtype) in spec.items():
        t = tensors[name].to(on).contiguous() if sender else torch.empty(shape, dtype=dtype, device=on)
        dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
        out[name] = t
    return out


def record_launcher_exception(error: BaseException) -> None:
    """An unexpected error with its traceback into torchrun's error file (``TORCHELASTIC_ERROR_FILE``), through
    torch.distributed.elastic's own ``ErrorHandler``: the launcher's failure summary then shows it."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler
    ErrorHandler().record_exception(error)
