"""The prepared GPU check (bench/gpu_check.py) on the CPU: the commands it launches are the real trainer's,
valid for the config system, with save, stop and resume; its dry run runs them at tiny shapes and the
resumed run continues the uninterrupted one. The real run needs a GPU and never happens here."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import torch

from loopmoe.config import load_config
from loopmoe.parallel.layout import validate_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def overrides_of(cmd: list[str]) -> tuple[str, list[str]]:
    i = cmd.index("--config")
    return cmd[i + 1], [a for a in cmd[i + 2:] if "=" in a and not a.startswith("--")]


def test_the_check_launches_the_real_trainer_with_save_stop_and_resume():
    res = run("--print-commands")
    assert res.returncode == 0, res.stderr[-3000:]
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if line.strip()]
    trainer = [c for c in cmds if "pretrain_loopmoe.py" in c]
    a, b1, b2 = trainer[:3]
    for cmd in cmds:  # every command is valid for the config system and the one-GPU layout
        config, ov = overrides_of(cmd)
        cfg = load_config(os.path.join(ROOT, config), [o for o in ov if not o.startswith("data.prefixes")])
        validate_layout(cfg, 1)
    _, ov_a = overrides_of(a)
    cfg = load_config(os.path.join(ROOT, "configs/loopmoe_3b.yaml"), ov_a)
    m = cfg.model
    # the 3B widths and vocabulary, 1 + 1x2 + 1 layers, 4,096-token sequences, bf16, ZeRO-1, megatron linears
    assert (m.d_model, m.n_experts, m.expert_hidden, m.vocab_size) == (1536, 72, 384, 64000)
    assert (m.n_prelude, m.n_loop, m.loop_iters, m.n_coda, cfg.data.seq_len) == (1, 1, 2, 1, 4096)
    assert (cfg.train.precision, cfg.train.zero_stage, m.linear_backend) == ("bf16", 1, "megatron")
    assert "train.exit_interval=3" in b1 and b1[:-1] == b2  # stop at 3, then the same command resumes
    assert a[:-1] == b2[:-1] and a[-1] != b2[-1]  # A: the same run in another run directory
    fp8 = [c for c in trainer if "train.precision=fp8" in c]
    assert any("train.fp8_backend=torchao" in c for c in fp8) and any("model.linear_backend=te" in c for c in fp8)
    assert any("bench/gpu_probe.py" in c for c in cmds)


@pytest.mark.slow
def test_dry_run_resumes_exactly_and_reports_no_gpu_figures(tmp_path):
    out = tmp_path / "gpu.md"
    res = run("--dry-run", "--skip-tests", "--skip-fp8", "--skip-probes", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# GPU check -- DRY RUN on the CPU: no GPU figures")
    ran = text.split("## What ran")[1].split("## What was skipped")[0]
    assert "6 steps (A)" in ran and "resumed to step 6 (B)" in ran
    # bf16 on the CPU: the resumed run's steps 4-6 equal the uninterrupted run's bitwise
    assert "Verdict: **PASS" in text and "(tolerance 0)" in text, text.split("## Save, stop")[1][:2000]
    speed = text.split("## Step time, MFU and memory of A")[1].split("Estimator")[0]
    assert speed.count("n/a (CPU)") == 3 and "TFLOP/s (dense bf16)" not in speed  # no MFU, no device memory


def test_refuses_without_gpu_and_dry_run_needs_an_out_path():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = run()
    assert res.returncode == 2 and "no CUDA device visible" in res.stderr and "--dry-run" in res.stderr
    res = run("--dry-run")
    assert res.returncode != 0 and "--dry-run needs --out" in res.stderr
