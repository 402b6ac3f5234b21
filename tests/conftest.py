"""Shared fixtures. Every test runs on the CPU; distributed pieces use gloo."""
from __future__ import annotations

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "python_docs.jsonl")
sys.path.insert(0, ROOT)  # data_tools/ and bench/ are importable as top-level packages in tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_group():
    """A world of one (gloo) with megatron-core's model-parallel groups at TP=PP=1.

    megatron-core's tensor-parallel layers and dataset cache need an initialised process group even
    in a single process.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        # A tcp:// address, not MASTER_ADDR/MASTER_PORT in os.environ: training subprocesses started later
        # by other tests inherit the environment and would try to bind this process's port.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield


def make_token_data(d, n_docs: int, vocab: int, preprocess: bool = True) -> dict:
    """The first ``n_docs`` documents of the demo corpus, a ``vocab``-piece tokenizer trained on them and
    (with ``preprocess``) their .bin/.idx, all made by our own data tools as a user would.
    Returns {"dir", "corpus", "tok", "prefix"}."""
    import subprocess

    src = d / "slice.jsonl"
    with open(CORPUS) as f, open(src, "w") as out:
        for i, line in enumerate(f):
            if i >= n_docs:
                break
            out.write(line)
    py = sys.executable
    subprocess.run([py, "data_tools/train_tokenizer.py", "--input", str(src), "--vocab-size", str(vocab),
                    "--output-prefix", str(d / "tok")], cwd=ROOT, check=True, capture_output=True)
    if preprocess:
        subprocess.run([py, "data_tools/preprocess.py", "--input", str(src), "--tokenizer-model",
                        str(d / "tok.model"), "--output-prefix", str(d / "docs"), "--append-eod", "--workers", "1"],
                       cwd=ROOT, check=True, capture_output=True)
    return {"dir": d, "corpus": str(src), "tok": str(d / "tok.model"), "prefix": str(d / "docs_text_document")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: torch's intra-op thread pool costs far more than it saves (10x on a busy machine).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_torchrun(script: str, nproc: int = 2, timeout: int = 800):
    """Run ``script`` under torchrun with ``nproc`` gloo processes (one thread each); fail with its output."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), os.path.abspath(script)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def cpu_peak_bytes(fn) -> tuple[int, int, int]:
    """(peak, final, lowest) growth of the bytes that torch's CPU allocator holds while ``fn()`` runs,
    relative to its start: every allocation and free in the window is recorded by torch.profiler
    (profile_memory) and replayed in time order. A measurement of real allocations, independent of any
    estimate. ``lowest`` < 0 means memory allocated before the window was freed inside it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = low = 0
    for _, n in events:
        live += n
        peak, low = max(peak, live), min(low, live)
    return peak, live, low


def ep_worker(checks, ep: int = 2) -> None:
    """The body of an expert-parallel torchrun worker: a gloo world, megatron's groups, DeepSpeed's expert
    groups from the one constructor (the model only looks them up), ``checks(rank)``, then the orderly
    shutdown once the layers (which hold the expert group) are gone (see distributed.shutdown)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from loopmoe.parallel.distributed import shutdown
    from loopmoe.parallel.groups import create_expert_groups

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(1, 1)
    create_expert_groups(ep)
    checks(dist.get_rank())
    shutdown()


def assert_grads_match_one_process(model, ref_grads: dict, rank: int, tp: int, msg: str = "") -> None:
    """Every gradient of a TP (optionally sequence-parallel) ``model`` equals the one-process ``ref_grads``:
    a TP-split weight's gradient is this rank's slice of the full one; a sequence-parallel parameter's is
    summed over the TP group first (each rank saw a sequence shard)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    for n, p in model.named_parameters():
        g, want = p.grad, ref_grads[n]
        if getattr(p, "tensor_model_parallel", False):  # this rank's slice of the full weight
            want = want.chunk(tp, dim=p.partition_dim)[rank]
        elif getattr(p, "sequence_parallel", False):  # grads of a sequence shard: sum over TP
            dist.all_reduce(g, group=ps.get_tensor_model_parallel_group())
        torch.testing.assert_close(g, want, atol=1e-5, rtol=1e-4, msg=f"{n} {msg}")


# The files whose tests take longest (minutes of subprocesses: Slurm jobs, torchrun worlds, trained fixtures),
# heaviest first. `make test` runs the suite on several pytest-xdist workers with --dist loadfile, which hands
# out whole files in collection order: starting with these keeps one long file from running alone at the end.
HEAVY_FIRST = ["test_slurm", "test_launchers", "test_reliability", "test_train", "test_bf16", "test_parallel",
               "test_te_layout", "test_reshard", "test_export", "test_analysis", "test_resume_verify_e2e",
               "test_gpu_check", "test_recompute", "test_ctrl_c", "test_group_timeouts", "test_resume_verify",
               "test_moe", "test_grouped_experts", "test_eval", "test_fp8", "test_memory", "test_run_tools"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.stem, len(rank)))  # stable: file order kept inside each file
