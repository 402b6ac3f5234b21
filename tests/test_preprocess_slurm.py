"""slurm/preprocess.sbatch on the one-node CI Slurm cluster (scripts/slurm_up.sh): an array of 3 tasks, each
tokenising its slice of 5 input files, then the dependent merge job; the merged pair must be byte-identical
to one preprocess.py run over all the files. Completion is observed through scontrol (job states), never
by sleeping a fixed time. Without the shell syntax check, skipped where no Slurm node is idle."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from data_tools import preprocess
from tests.test_preprocess import docs, files_of, sample_docs, tokenizer, write_jsonl  # noqa: F401
from tests.test_slurm import TERMINAL, base_env, on_slurm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "slurm", "preprocess.sbatch")


def test_bash_syntax_and_refusals(tmp_path):
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    r = subprocess.run(["bash", SCRIPT], env=base_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "set INPUT, TOKENIZER and OUT" in r.stderr
    r = subprocess.run(["bash", SCRIPT], env=base_env(INPUT="x", TOKENIZER=str(tmp_path / "none.model"),
                                                     OUT=str(tmp_path / "o"), TASKS="0"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "TASKS=0" in r.stderr


def job_state(job: str) -> str | None:
    """JobState of a job (an array job: of any task still known), None once Slurm has purged it."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    states = re.findall(r"JobState=(\S+)", out.stdout)
    return next((s for s in states if s not in TERMINAL), states[0] if states else None)


@on_slurm
def test_array_of_three_then_merge_equals_one_run(tmp_path, tokenizer, docs):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        write_jsonl(d / f"shard_{i}.jsonl", (docs + sample_docs(12, start=500 + 12 * i))[i::5])
    pattern = str(d / "shard_*.jsonl")
    assert preprocess.main(["--input", pattern, "--tokenizer-model", tokenizer, "--append-eod", "--workers", "1",
                            "--output-prefix", str(tmp_path / "single")]) == 0
    out = str(tmp_path / "out" / "web")
    env = base_env(INPUT=pattern, TOKENIZER=tokenizer, OUT=out, TASKS="3", WORKERS="1", LOGS=str(tmp_path / "logs"),
                   LOOPMOE_ROOT=ROOT, PYTHON=sys.executable,
                   SBATCH_ARGS=f"--cpus-per-task=1 --time=10 --job-name=pptest-{uuid.uuid4().hex[:8]}")
    r = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"array job (\d+) \(3 tasks\), merge job (\d+)", r.stdout)
    assert m, r.stdout
    array, merge = m.groups()
    deadline = time.monotonic() + 600  # generous: the node is shared with other tests
    try:
        while True:
            state = job_state(merge)
            if state is None or state in TERMINAL:
                break
            assert time.monotonic() < deadline, f"merge job {merge} still {state}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", array, merge], capture_output=True)
    logs = {p: (tmp_path / "logs" / p).read_text() for p in os.listdir(tmp_path / "logs")}
    assert state in (None, "COMPLETED"), f"merge job {merge} ended {state}: {logs}"
    assert len([p for p in logs if re.search(rf"-{array}_[012]\.out$", p)]) == 3, list(logs)
    assert any("merged 3 pair(s)" in text for text in logs.values()), logs
    assert files_of(out + "_text_document") == files_of(str(tmp_path / "single_text_document"))
