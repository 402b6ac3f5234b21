"""The LR plot starts at step 0 (issue 26): the schedule drawn from config.yaml covers the warm-up that
the logged points (every train.log_interval steps) miss, and agrees with the values the run logged."""
from __future__ import annotations

import json
import os

from loopmoe.config import load_config, save_config
from tests.conftest import ROOT


def test_schedule_curve_covers_the_warm_up_and_matches_the_log(tmp_path):
    from loopmoe.plot import plot_run, schedule_curve

    cfg = load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                      ["train.steps=200", "optim.warmup_steps=20", "optim.lr=1e-3", "optim.min_lr=1e-4"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    steps, lrs = schedule_curve(str(tmp_path))
    assert steps[0] == 0 and steps[-1] == 200
    assert [lrs[k] for k in (0, 9, 19)] == [1e-3 * 1 / 20, 1e-3 * 10 / 20, 1e-3]  # the warm-up is there
    assert abs(lrs[200] - 1e-4) < 1e-12 and max(lrs) == 1e-3
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a run logging every 50 steps: no point in the warm-up
        for k in (50, 100, 150, 200):
            f.write(json.dumps({"step": k, "loss": 1.0, "lm_loss": 1.0, "lr": lrs[k], "grad_norm": 1.0}) + "\n")
    assert any(p.endswith("lr.png") for p in plot_run(str(tmp_path)))
    assert schedule_curve(str(tmp_path / "absent")) is None
