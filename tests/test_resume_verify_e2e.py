"""pretrain_loopmoe.py at world 2 resumes from a checkpoint whose digests the two ranks split (slow)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, make_token_data
from tests.test_train import SMALL, train


def torchrun_train(run_dir, data: dict, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL, f"data.prefixes={data['prefix']}",
           f"data.tokenizer_model={data['tok']}", "model.vocab_size=1024", f"logging.run_dir={run_dir}",
           "logging.tensorboard=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800)


@pytest.mark.slow  # one training run, two torchrun launches of pretrain_loopmoe.py
def test_world_2_splits_the_resume_check_and_both_ranks_refuse_a_damaged_step(tmp_path):
    (tmp_path / "data").mkdir()
    data = make_token_data(tmp_path / "data", 300, 1024)
    run = tmp_path / "run"
    train(run, data["prefix"], data["tok"], "train.steps=3", "checkpoint.interval=1", "checkpoint.keep_last=3")
    step3 = run / "checkpoints" / "step_00000003"
    shard = sorted((step3 / "dist").glob("*.distcp"))[0]
    os.truncate(shard, os.path.getsize(shard) // 2)

    out = torchrun_train(run, data, "train.steps=4")
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("input error")]
    assert len(errors) == 1, out.stderr[-3000:]  # said once (rank 0); every rank stops alike (tests/test_resume_verify.py)
    assert "step 3" in errors[0] and shard.name in errors[0] and "newest intact earlier step is 2" in errors[0]
    assert "step_00000003 verified by 2 ranks" in out.stdout, out.stdout[-3000:]  # split, not read twice
    assert "exitcode  : 2" in out.stderr  # torchrun's summary: the ranks exited 2
    assert "run directory" not in out.stdout  # refused before the config is saved and the model built

    out = torchrun_train(run, data, "train.steps=3", "checkpoint.resume=latest_intact")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "DAMAGED" in out.stdout and "step_00000002 verified by 2 ranks" in out.stdout
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    assert open(run / "checkpoints" / "latest").read().strip() == "step_00000003"  # step 3 trained again
