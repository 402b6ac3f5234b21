"""Start torch.distributed from whatever launched us: torchrun, srun (Slurm), mpirun (mpi4py), or nothing.

All three paths end in the same place: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment and ``init_process_group(init_method="env://")``, then megatron-core's model-parallel groups.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodes: str) -> list[str]:
    """Slurm's compressed host list in full, as ``scontrol show hostnames`` prints it:
    ``gpu[01-03,07],cpu-a[1-2]-ib`` -> gpu01 gpu02 gpu03 gpu07 cpu-a1-ib cpu-a2-ib (zero padding kept, several
    bracket groups in one name expand as a product). Raises ValueError on an unbalanced bracket."""
    hosts: list[str] = []
    for name in _split_top_level(nodes):
        hosts += _expand_host(name)
    return hosts


def _split_top_level(nodes: str) -> list[str]:
    """Split on the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in nodes.strip():
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"SLURM_NODELIST {nodes!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"SLURM_NODELIST {nodes!r}: unbalanced brackets")
    return [p for p in parts + [cur] if p]


def _expand_host(name: str) -> list[str]:
    if "[" not in name:
        return [name]
    head, rest = name.split("[", 1)
    body, tail = rest.split("]", 1)
    values = []
    for item in body.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"SLURM_NODELIST host {name!r}: {item!r} is not a number or a range")
        width = len(lo)  # gpu[01-10]: zero padding to the width of the lower bound
        values += [f"{v:0{width}d}" for v in range(int(lo), int(hi or lo) + 1)]
    return [head + v + t for v in values for t in _expand_host(tail)]


def _slurm_master_addr() -> str:
    """The first host of the job: via ``scontrol show hostnames`` where Slurm's tools exist, else our own
    expansion of the compressed list (``gpu[01-04]`` is not a host name)."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
        if out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError):
        pass
    return expand_nodelist(nodes)[0]


def _from_mpi(env) -> DistEnv:
    from mpi4py import MPI  # only on this path: a plain run must not need MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", 0)))
    if rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        addr = env.get("MASTER_ADDR", socket.gethostname() if world > 1 else "127.0.0.1")
        master = (addr, env.get("MASTER_PORT", str(port)))
    else:
        master = None
    addr, port = comm.bcast(master, root=0)
    env.setdefault("MASTER_ADDR", addr)
    env.setdefault("MASTER_PORT", port)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return DistEnv(rank, world, local, "mpi")


def detect_env() -> DistEnv:
    """Find rank and world size, exporting the env:// variables where a launcher did not."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also torchrun inside srun)
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    # mpirun first: under Slurm its ranks inherit the job step's SLURM_* variables.
    if "OMPI_COMM_WORLD_SIZE" in env:
        return _from_mpi(env)
    # srun, one task per device. SLURM_STEP_ID tells a task of a job step from the batch shell itself, which
    # also carries SLURM_PROCID=0 and SLURM_NTASKS=N but is one process.
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and ntasks > 1:
        rank, world = int(env["SLURM_PROCID"]), ntasks
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        # A port derived from the job id, so two jobs sharing a node do not collide.
        # 10000-32767: below Linux's default ephemeral range (32768+), where a port may be taken by any
        # outgoing connection (slurm/common.sh derives the templates' port the same way)
        env.setdefault("MASTER_PORT", str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 22768))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return DistEnv(rank, world, local, "slurm")
    if "PMI_SIZE" in env or "PMIX_RANK" in env:  # other MPI launchers (MPICH, Intel MPI, PMIx)
        return _from_mpi(env)
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env["MASTER_PORT"] = str(s.getsockname()[1])
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return DistEnv(0, 1, 0, "single")


def _deepspeed_comm(backend: str) -> None:
    """``deepspeed.init_distributed``. On the CPU it compiles (or loads) its shared-memory collective op and
    says so with a compiler probe logged at INFO and a print on stdout, on every start: that goes to this
    module's DEBUG log, not the first screen. Errors and warnings still show."""
    import contextlib
    import io

    import deepspeed

    out = io.StringIO()
    logging.disable(logging.INFO)  # only for this call: the op builder's compiler-probe INFO records
    try:
        with contextlib.redirect_stdout(out):
            deepspeed.init_distributed(dist_backend=backend)
    finally:
        logging.disable(logging.NOTSET)
    if out.getvalue().strip():
        log.debug("deepspeed.init_distributed: %s", out.getvalue().strip())


def init_distributed(tp: int = 1, pp: int = 1, backend: str = "auto", timeout_minutes: int = 10,
                     ep: int = 1) -> DistEnv:
    """Process group + megatron-core's tensor/pipeline/data groups (+ DeepSpeed's expert groups inside
    the data-parallel group when ``ep`` > 1, see groups.py). Idempotent.

    The time-out bounds every collective: a rank killed mid-step makes the others fail within it
    instead of hanging the job. Where CUDA is absent, megatron's CPU adapter is installed
    (megatron_cpu_adapter.py).
    """
    from megatron.core import parallel_state

    from loopmoe.parallel import megatron_cpu_adapter

    denv = detect_env()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(denv.local_rank)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=denv.rank, world_size=denv.world_size,
                                timeout=timeout)
    _deepspeed_comm(backend)  # DeepSpeed's comm layer adopts the group made above
    megatron_cpu_adapter.install()
    # Every group gets the same time-out: torch's new_group and megatron's groups default to 30 minutes,
    # so a peer hung during ZeRO's gradient all-reduce (megatron's data-parallel group) or an expert
    # all-to-all held the job for 30 minutes whatever parallel.timeout_minutes said. megatron's extra gloo
    # copies of its groups serve only its distributed optimizer (unused here) and one of them
    # (EXPERT_DATA_PARALLEL_GROUP_GLOO, megatron-core 0.16) ignores the time-out: not made.
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                 distributed_timeout_minutes=timeout_minutes,
                                                 create_gloo_process_groups=False)
    if ep > 1:
        from loopmoe.parallel.groups import create_expert_groups

        create_expert_groups(ep, timeout=timeout)
    log.info("distributed: %s launcher, rank %d of %d, backend %s, TP=%d PP=%d DP=%d EP=%d", denv.launcher,
             denv.rank, denv.world_size, backend, tp, pp, parallel_state.get_data_parallel_world_size(), ep)
    return denv


def seed_model_parallel_rng(seed: int) -> bool:
    """Seed megatron's CUDA RNG tracker (``model_parallel_cuda_manual_seed``): its "model-parallel-rng"
    state, from which TE draws each tensor-parallel shard of its linears (layers.py hands TE megatron's
    tracker), differs by TP rank and is the same across data-parallel ranks. Call it after the process
    groups exist (it reads the TP rank) and before the model is built. CUDA only (the tracker holds CUDA
    generator states); on the CPU nothing is seeded and nothing is logged: TE cannot run there, and the
    megatron and torch backends draw their weights from the global RNG. Returns whether it seeded."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not torch.cuda.is_available() or not parallel_state.model_parallel_is_initialized():
        return False
    model_parallel_cuda_manual_seed(seed)  # also torch.cuda.manual_seed(seed): the data-parallel state
    return True


def shutdown() -> None:
    """Tear distributed down on every rank, in order, while the interpreter is fully alive.

    A ProcessGroup still referenced at exit (DeepSpeed's expert-group dicts, its comm layer, megatron's
    globals) was destroyed during interpreter finalisation, where gloo's worker threads can abort the process
    ("terminate called without an active exception", SIGABRT after a run that finished). So: a barrier (no
    peer is still in a collective when the groups go), every registry that holds groups cleared, the groups
    destroyed, and a garbage collection so their C++ objects and threads go now. Call it after the model and
    engine are released (pretrain_loopmoe.py calls it once train() has returned)."""
    import gc

    from megatron.core import parallel_state

    from loopmoe.parallel.groups import destroy_expert_groups

    if dist.is_initialized() and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError as e:  # a peer is gone: nothing left to wait for
            log.warning("shutdown: barrier failed (%s); tearing down anyway", e)
    destroy_expert_groups()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    try:
        from deepspeed import comm as ds_comm

        ds_comm.comm.cdb = None  # DeepSpeed's comm backend object holds the world group
    except (ImportError, AttributeError):
        pass
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
