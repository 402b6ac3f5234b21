"""The prepared GPU check's CPU-side logic (bench/gpu_check.py --dry-run): it runs the same code at tiny
shapes, reports what it ran and skipped, and never writes a GPU figure. The real run needs a GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "bench/gpu_check.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_dry_run_reports_what_ran_and_skipped_without_gpu_figures(tmp_path):
    out = tmp_path / "gpu.md"
    res = run("--dry-run", "--skip-tests", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# GPU check -- DRY RUN on the CPU: no GPU figures")
    ran = text.split("## What ran")[1].split("## What was skipped")[0]
    skipped = text.split("## What was skipped, and why")[1].split("##")[0]
    assert ran.count("bf16 training steps") == 2
    assert "GPU-marked tests (--skip-tests)" in skipped and "FP8 (Transformer Engine): dry run" in skipped
    rows = [ln for ln in text.splitlines() if ln.startswith("| LoopMoE")]
    assert len(rows) == 2 and all("| n/a |" in r and "n/a (CPU)" in r for r in rows)  # no MFU, no GPU memory
    assert "bf16 dense peak used for MFU: n/a" in text


def test_refuses_without_gpu_and_dry_run_needs_an_out_path():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    res = run()
    assert res.returncode == 2 and "no CUDA device visible" in res.stderr and "--dry-run" in res.stderr
    res = run("--dry-run")
    assert res.returncode != 0 and "--dry-run needs --out" in res.stderr
