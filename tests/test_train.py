"""Training end to end on the CPU: the loss falls, stop-and-resume is bitwise identical, a kill -9 during a
save keeps the previous checkpoint, a NaN stops the run cleanly, the metrics files hold the named scalars."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, make_token_data

# A model small enough to take a step in a few milliseconds, still a LoopMoE with 2 iterations.
SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16", "model.n_experts=8",
         "model.expert_hidden=32", "model.top_k=2", "model.adaln_rank=8", "data.seq_len=64", "train.micro_batch=4",
         "train.eval_iters=2", "logging.progress_bar=false", "logging.tensorboard=true", "optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def token_prefix(tmp_path_factory) -> tuple[str, str]:
    """A 1,500-document slice of the demo corpus, tokenised by our own data tools (vocabulary 1,024)."""
    data = make_token_data(tmp_path_factory.mktemp("data"), 1500, 1024)
    return data["prefix"], data["tok"]


def train(run_dir, prefix, tok, *extra, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL,
           f"data.prefixes={prefix}", f"data.tokenizer_model={tok}", "model.vocab_size=1024",
           f"logging.run_dir={run_dir}", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"training failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_run_loss_falls_and_metrics_are_written(tmp_path, token_prefix):
    run = tmp_path / "run"
    out = train(run, *token_prefix, "train.steps=60", "train.log_interval=5", "train.eval_interval=30",
                "optim.lr=3e-3")
    recs = metrics(run)
    train_recs = [r for r in recs if "loss" in r]
    # From ln(1024) = 6.93 at initialisation; 60 steps of a 64-wide model get well below it.
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.5, [r["loss"] for r in train_recs]
    for key in ("loss", "lm_loss", "lb_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device",
                "mem_gib"):
        assert key in train_recs[-1], key
    val = [r for r in recs if "val/loss" in r]
    assert len(val) == 2 and val[-1]["val/loss"] < val[0]["val/loss"]
    assert "val/loss_exit1" in val[-1] and "val/loss_exit2" in val[-1]
    assert any(k.startswith("val/divergence_l") for k in val[-1]) and any(k.startswith("val/imbalance_l") for k in val[-1])
    assert os.listdir(run / "tensorboard")
    assert "validation: loss" in out.stdout and "tok/s" in out.stdout
    assert "memory estimate per rank:" in out.stdout  # loopmoe/memory.py at start-up
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "latest").exists()


def test_stop_and_resume_is_bitwise_identical(tmp_path, token_prefix):
    common = ["train.steps=12", "train.log_interval=1", "train.eval_interval=100", "checkpoint.interval=100",
              "model.aux_free_bias=true"]
    train(tmp_path / "straight", *token_prefix, *common)
    train(tmp_path / "resumed", *token_prefix, *common, "train.exit_interval=5")  # stops (and saves) at step 5
    first = metrics(tmp_path / "resumed")
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3, 4, 5]
    train(tmp_path / "resumed", *token_prefix, *common)  # resumes from latest (step 5)
    straight = {r["step"]: r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in metrics(tmp_path / "resumed") if "loss" in r}
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == straight  # bitwise: the JSON floats are equal, not close


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, token_prefix):
    """A learning rate of 1e9 with no warm-up or clipping: step 1 is finite, step 2's loss is NaN."""
    run = tmp_path / "run"
    out = train(run, *token_prefix, "train.steps=40", "checkpoint.interval=1", "optim.lr=1e9", "optim.min_lr=1e9",
                "optim.warmup_steps=0", "optim.grad_clip=1e9", "train.log_interval=1", check=False)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "loss is nan at step 2" in out.stdout.lower() or "loss is inf at step 2" in out.stdout.lower(), out.stdout[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (run / "checkpoints" / "step_00000002").exists()


def test_kill_9_during_save_keeps_previous_checkpoint(tmp_path, token_prefix):
    """Kill the trainer while a save writer (a process megatron forks per file) is running; `latest` names a
    complete checkpoint that a resumed run loads, and no process of the trainer outlives it (the writers
    get SIGKILL from the kernel when the trainer dies; no multiprocessing Manager is left with parent 1)."""
    import psutil

    run = tmp_path / "run"
    train(run, *token_prefix, "train.steps=100000", "train.exit_interval=2", "checkpoint.interval=1")
    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL,
           f"data.prefixes={token_prefix[0]}", f"data.tokenizer_model={token_prefix[1]}", "model.vocab_size=1024",
           f"logging.run_dir={run}", "train.steps=100000", "checkpoint.interval=1", "checkpoint.keep_last=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainer = psutil.Process(proc.pid)
    ckpt = run / "checkpoints"
    deadline = time.monotonic() + 600
    # The event: a save of a new step in flight (.tmp/step_* exists) with a writer process alive. The run
    # is far longer than this wait can be, so the kill always lands mid-run.
    while True:
        assert proc.poll() is None, f"the trainer exited ({proc.returncode}) before a save was caught"
        assert time.monotonic() < deadline, "no save with a writer process seen in 600 s"
        tmp = ckpt / ".tmp"
        try:
            in_flight = (ckpt / "latest").read_text().strip() > "step_00000003" and any(tmp.iterdir())
            family = trainer.children(recursive=True)
        except (FileNotFoundError, psutil.NoSuchProcess):
            continue
        if in_flight and family:
            break
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=600)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    latest = (ckpt / "latest").read_text().strip()
    assert (ckpt / latest).is_dir()
    out = train(run, *token_prefix, "train.steps=100000", f"train.exit_interval={int(latest.split('_')[1]) + 1}")
    assert "resumed from" in out.stdout and latest in out.stdout
