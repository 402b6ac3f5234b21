"""Nothing is overwritten or deleted silently (issue 26): the Hugging Face export refuses a non-empty --out
without --overwrite, writes to a temporary folder and renames it (an export that fails midway leaves the
previous one intact and no debris); `make demo` trains each invocation into a new run directory and
refuses an existing DEMO_RUN unless DEMO_FRESH=1 (scripts/demo.sh's choice, run with DEMO_PLAN=1)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

pytest.importorskip("transformers")


def tiny_model():
    from loopmoe.config import load_config
    from loopmoe.model import LoopMoEModel

    cfg = load_config(f"{ROOT}/configs/tiny_loopmoe.yaml",
                      ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
                       "model.n_experts=4", "model.expert_hidden=32", "model.adaln_rank=8", "model.vocab_size=256",
                       "model.linear_backend=torch"])
    cfg.data.tokenizer_model = ""  # no tokenizer: the export writes the model alone
    torch.manual_seed(0)
    return LoopMoEModel(cfg.model).eval(), cfg


def digests(folder) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in sorted(os.listdir(folder))}


def test_export_refuses_a_non_empty_out_and_replaces_it_only_whole(tmp_path, monkeypatch):
    from loopmoe.export import hf

    m, cfg = tiny_model()
    out = tmp_path / "export"
    hf.export(m, cfg, str(out))
    first = digests(out)
    assert "model.safetensors" in first
    with pytest.raises(hf.ExportError, match="--overwrite"):
        hf.export(m, cfg, str(out))
    assert digests(out) == first

    # --overwrite, failing midway (after the weights are written, while the remote code is copied)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)  # another model: its export would differ

    def broken_copy(src, dst):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(hf.shutil, "copyfile", broken_copy)
    with pytest.raises(OSError, match="injected"):
        hf.export(m, cfg, str(out), overwrite=True)
    assert digests(out) == first  # the old export, whole
    assert sorted(os.listdir(tmp_path)) == ["export"]  # no temporary folder left behind
    monkeypatch.undo()

    hf.export(m, cfg, str(out), overwrite=True)
    second = digests(out)
    assert second["model.safetensors"] != first["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["export"]


def test_export_command_line_refuses_before_loading(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier export")
    res = subprocess.run([sys.executable, "-m", "loopmoe.export.hf", "--checkpoint", str(tmp_path / "no_such_run"),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "--overwrite" in res.stderr and (out / "keep.txt").read_text() == "an earlier export"


def demo_plan(tmp_path, **env) -> subprocess.CompletedProcess:
    # scripts/demo.sh cds to the repository: a copy of it in a scratch tree keeps runs/ there
    (tmp_path / "scripts").mkdir(exist_ok=True)
    with open(os.path.join(ROOT, "scripts", "demo.sh")) as f:
        (tmp_path / "scripts" / "demo.sh").write_text(f.read())
    return subprocess.run(["bash", str(tmp_path / "scripts" / "demo.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "DEMO_PLAN": "1", **env}, timeout=60)


def test_demo_never_reuses_a_run_directory_unasked(tmp_path):
    res = demo_plan(tmp_path)
    assert res.returncode == 0, res.stderr
    run = res.stdout.split("outputs go to ", 1)[1].split()[0]
    assert run.startswith("runs/demo-") and run != "runs/demo-latest"
    (tmp_path / run).mkdir(parents=True)  # that directory now holds a run: the next plan picks another
    again = demo_plan(tmp_path)
    assert again.stdout.split("outputs go to ", 1)[1].split()[0] not in (run, "runs/demo-latest")

    (tmp_path / "runs" / "mine").mkdir()
    refused = demo_plan(tmp_path, DEMO_RUN="runs/mine")
    assert refused.returncode == 2 and "DEMO_FRESH=1" in refused.stderr
    assert demo_plan(tmp_path, DEMO_RUN="runs/mine", DEMO_FRESH="1").returncode == 0
    assert (tmp_path / "runs" / "mine").is_dir()  # a plan deletes nothing
