"""Resume checks the config first (issue 26): against the config saved with the checkpoint, a change of a
model field that changes a parameter's shape or meaning is refused, a schedule change (train.steps,
optim.*) is refused unless checkpoint.allow_schedule_change says so (then logged with the learning rate at
the resume step before and after); a refused resume leaves the run directory byte for byte as it was."""
from __future__ import annotations

import json
import logging
import math
import os

import pytest

from tests.conftest import ROOT, make_token_data
from tests.test_train import train

STEPS = 6  # SMALL warms up over 5 steps: step 6 is on the cosine (at its end, min_lr)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """A finished 6-step run (checkpoint at step 6) of the SMALL LoopMoE."""
    data = make_token_data(tmp_path_factory.mktemp("data"), 300, 1024)
    run = tmp_path_factory.mktemp("runs") / "run"
    train(run, data["prefix"], data["tok"], f"train.steps={STEPS}", "train.log_interval=1")
    return {"run": run, "prefix": data["prefix"], "tok": data["tok"]}


def snapshot(run) -> dict[str, tuple[int, int]]:
    """Every file under the run directory: (size, mtime in ns), and config.yaml's bytes."""
    out = {}
    for d, _, files in os.walk(run):
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), run)] = (st.st_size, st.st_mtime_ns)
    out["config.yaml bytes"] = (run / "config.yaml").read_bytes()
    return out


def refused(saved, *extra) -> str:
    before = snapshot(saved["run"])
    out = train(saved["run"], saved["prefix"], saved["tok"], *extra, check=False)
    assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("input error")]
    assert len(lines) == 1, out.stderr
    assert snapshot(saved["run"]) == before  # nothing in the run directory touched, config.yaml included
    return lines[0]


def test_shape_change_is_refused_before_anything_is_written(saved):
    line = refused(saved, f"train.steps={STEPS}", "model.n_experts=4")
    assert "model.n_experts: 8 -> 4" in line
    assert "logging.run_dir=" in line and "checkpoint.resume=none" in line


def test_meaning_change_of_equal_shapes_is_refused(saved):
    line = refused(saved, f"train.steps={STEPS}", "model.router_score=softmax_then_topk")
    assert "model.router_score" in line


def test_schedule_change_is_refused_with_the_lr_jump(saved):
    line = refused(saved, f"train.steps={2 * STEPS}")
    assert f"train.steps: {STEPS} -> {2 * STEPS}" in line and "checkpoint.allow_schedule_change=true" in line
    with open(saved["run"] / "metrics.jsonl") as f:  # the LR the saved run logged at its last step
        lr_logged = [json.loads(x) for x in f if '"lr"' in x][-1]["lr"]
    assert f"from {lr_logged:.3g} to" in line, line


def _cfg(saved, *overrides):
    from loopmoe.config import load_config
    from tests.test_train import SMALL

    return load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                       [*SMALL, f"data.prefixes={saved['prefix']}", f"data.tokenizer_model={saved['tok']}",
                        "model.vocab_size=1024", f"logging.run_dir={saved['run']}", *overrides])


def test_schedule_change_allowed_when_asked_is_logged_with_both_lrs(saved, caplog):
    from loopmoe.train.resume_check import check_resume_config

    cfg = _cfg(saved, f"train.steps={2 * STEPS}")
    with caplog.at_level(logging.WARNING):
        check_resume_config(cfg, str(saved["run"] / "checkpoints"), None, allow_schedule_change=True)
    msg = next(r.getMessage() for r in caplog.records if "SCHEDULE CHANGED" in r.getMessage())
    o = cfg.optim  # the cosine written out here, independent of optim.lr_at
    after = o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * (STEPS - o.warmup_steps) / (2 * STEPS - o.warmup_steps)))
    with open(saved["run"] / "metrics.jsonl") as f:
        before = [json.loads(x) for x in f if '"lr"' in x][-1]["lr"]
    assert f"{before:.4g} before, {after:.4g} now" in msg, msg
    assert before != pytest.approx(after)


def test_runtime_fields_and_fresh_starts_pass(saved, caplog):
    from loopmoe.train.resume_check import ResumeConfigError, check_resume_config

    ckpt = str(saved["run"] / "checkpoints")
    check_resume_config(_cfg(saved, f"train.steps={STEPS}", "model.dispatch=einsum", "train.log_interval=3"),
                        ckpt, None, allow_schedule_change=False)  # how a step is computed, not what a weight is
    check_resume_config(_cfg(saved, "model.n_experts=4", "checkpoint.resume=none"), ckpt, None, False)
    with pytest.raises(ResumeConfigError):
        check_resume_config(_cfg(saved, f"train.steps={STEPS}", "optim.lr=0.1"), ckpt, None, False)
    check_resume_config(_cfg(saved, "model.n_experts=4"), str(saved["run"] / "elsewhere"), None, False)  # nothing saved


def test_the_field_through_the_command_line(saved):
    """checkpoint.allow_schedule_change=true as a user writes it (config.py's field). Last: it extends the
    module's run to another step."""
    out = train(saved["run"], saved["prefix"], saved["tok"], f"train.steps={STEPS + 1}",
                "checkpoint.allow_schedule_change=true", "train.log_interval=1")
    assert "SCHEDULE CHANGED" in out.stdout + out.stderr
    assert (saved["run"] / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS + 1:08d}"
