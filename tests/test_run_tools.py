"""Around a run (issue 18): a quiet start with one line per missing optional library, an MFU figure on the
CPU, Weights & Biases offline (the scalars are in the run's .wandb file; a requeued run continues the same
W&B run), and ``python -m loopmoe.plot`` drawing the run. One short training, stopped and resumed, serves
them all."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_token_data

pytestmark = pytest.mark.slow  # two training subprocesses (~40 s on 2 idle cores)

SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16", "model.n_experts=8",
         "model.expert_hidden=32", "model.top_k=2", "model.adaln_rank=8", "data.seq_len=64", "train.micro_batch=4",
         "train.eval_iters=2", "logging.progress_bar=false", "logging.tensorboard=false", "optim.warmup_steps=2",
         "model.vocab_size=1024", "train.steps=12", "train.log_interval=2", "train.eval_interval=6",
         "checkpoint.interval=100"]
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
WANDB = ["logging.wandb_project=loopmoe-test", "logging.wandb_run_name=tiny"] if HAVE_WANDB else []
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb is in the dev extra: pip install 'loopmoe[wandb]'")


def _train(run_dir, data, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL, *WANDB,
           f"data.prefixes={data['prefix']}", f"data.tokenizer_model={data['tok']}", f"logging.run_dir={run_dir}",
           *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           "WANDB_SILENT": "false"}
    env.pop("PYTHONWARNINGS", None)
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if out.returncode != 0:
        raise AssertionError(f"training failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """12 steps with W&B offline, as a requeued job: stopped (and checkpointed) at step 6, then resumed."""
    data = make_token_data(tmp_path_factory.mktemp("data"), 600, 1024)
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    first = _train(run_dir, data, "train.exit_interval=6")
    second = _train(run_dir, data)
    return {"dir": run_dir, "first": first, "second": second}


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------------
# A quiet, honest start


def test_start_has_no_library_warnings_and_one_line_per_missing_library(run):
    for proc in (run["first"], run["second"]):
        text = proc.stdout + proc.stderr
        assert "Transformer Engine and Apex are not installed" not in text
        assert "UserWarning" not in text
        assert "Setting accelerator to CPU" not in text  # DeepSpeed's record, replaced by our device line
        assert "built successfully" not in text and "compilers.C" not in text  # DeepSpeed's CPU op build: DEBUG
        lines = text.splitlines()
        for module, name in (("transformer_engine", "Transformer Engine"), ("apex", "NVIDIA Apex")):
            ours = [ln for ln in lines if ln.startswith(f"loopmoe: {name} not installed")]
            missing = importlib.util.find_spec(module) is None
            assert len(ours) == (1 if missing else 0), (name, ours)
        assert sum(ln.startswith("loopmoe: no CUDA GPU visible") for ln in lines) == 1


# ---------------------------------------------------------------------------------------------------
# MFU on the CPU


def test_cpu_log_shows_a_measured_mfu(run):
    out = run["first"].stdout + run["first"].stderr
    assert "MFU peak:" in out and "CPU, measured" in out
    assert "MFU n/a" not in out
    step_lines = [ln for ln in out.splitlines() if ln.startswith("step ")]
    assert step_lines and all("| MFU " in ln and "% (peak " in ln for ln in step_lines), step_lines
    recs = [r for r in _metrics(run["dir"]) if "loss" in r]
    for r in recs:  # MFU = achieved TFLOP/s per device over the measured peak, both logged
        assert r["peak_tflops"] > 0 and r["mfu"] == pytest.approx(r["tflops_per_device"] / r["peak_tflops"])
    first_run = [r for r in recs if r["step"] == 6][0]  # the last record of the first start
    peak = float(step_lines[-1].split("(peak ")[1].split(")")[0])
    assert peak == pytest.approx(first_run["peak_tflops"], rel=5e-3)  # the line shows it to 3 digits


# ---------------------------------------------------------------------------------------------------
# Weights & Biases, offline


def read_wandb_records(path: str) -> list:
    """The protobuf Records of a .wandb file: W&B's LevelDB-log framing (":W&B" header, 32 KiB blocks,
    records split into FULL/FIRST/MIDDLE/LAST chunks), decoded with wandb's own Record message."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    block, pos, chunks, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the tail of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            chunks = chunk
        elif kind == 3:
            chunks += chunk
        elif kind == 4:
            out.append(chunks + chunk)
    records = []
    for raw in out:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def _wandb_runs(run_dir) -> list[dict]:
    """Per offline run directory (in time order): its run id and history rows {step: {key: value}}."""
    runs = []
    for d in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*"))):
        (path,) = glob.glob(os.path.join(d, "run-*.wandb"))
        rid, history = None, {}
        for rec in read_wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                rid = rec.run.run_id
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                history[int(row["_step"])] = row
        runs.append({"dir": d, "id": rid, "history": history})
    return runs


@needs_wandb
def test_wandb_offline_run_holds_the_logged_scalars(run):
    runs = _wandb_runs(run["dir"])
    assert len(runs) == 2, [r["dir"] for r in runs]
    history = {**runs[0]["history"], **runs[1]["history"]}
    train = {r["step"]: r for r in _metrics(run["dir"]) if "loss" in r}
    assert sorted(history) == sorted(train) == [1, *range(2, 13, 2)]  # step 1 always (the warm-up shows)
    for step, rec in train.items():
        row = history[step]
        for key in ("loss", "lm_loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
            assert row[f"train/{key}"] == pytest.approx(rec[key], rel=1e-12), (step, key)
    val = {r["step"]: r for r in _metrics(run["dir"]) if "val/loss" in r}
    assert sorted(val) == [6, 12]
    for step, rec in val.items():
        for key in ("val/loss", "val/loss_exit1", "val/loss_exit2", "val/divergence_l1", "val/imbalance_l1"):
            assert history[step][key] == pytest.approx(rec[key], rel=1e-12), (step, key)


@needs_wandb
def test_requeued_run_continues_the_same_wandb_run(run):
    runs = _wandb_runs(run["dir"])
    with open(run["dir"] / "wandb_run_id") as f:
        rid = f.read().strip()
    assert [r["id"] for r in runs] == [rid, rid]
    assert sorted(runs[0]["history"]) == [1, 2, 4, 6]  # step 1 always; stopped at step 6 ...
    assert sorted(runs[1]["history"]) == [8, 10, 12]  # ... resumed from its checkpoint into the same run


def test_wandb_asked_for_but_missing_is_a_config_error(monkeypatch):
    from loopmoe.config import ConfigError, load_config
    from loopmoe.train.callbacks import wandb_sink

    real = importlib.util.find_spec
    monkeypatch.setattr(wandb_sink.importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    cfg = load_config("configs/tiny_loopmoe.yaml", ["logging.wandb_project=p"])
    with pytest.raises(ConfigError, match=r"logging.wandb_project='p' but wandb is not installed: pip install"):
        wandb_sink.check_wandb(cfg)
    wandb_sink.check_wandb(load_config("configs/tiny_loopmoe.yaml"))  # not asked for: fine without wandb


# ---------------------------------------------------------------------------------------------------
# The run as a picture


def test_plot_writes_the_pngs(run, tmp_path):
    out_dir = tmp_path / "plots"
    res = subprocess.run([sys.executable, "-m", "loopmoe.plot", str(run["dir"]), "--out", str(out_dir)], cwd=ROOT,
                         capture_output=True, text=True, timeout=800, env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    names = sorted(os.listdir(out_dir))
    assert names == ["grad_norm.png", "loss.png", "lr.png", "routing.png", "throughput.png"]
    for n in names:
        with open(out_dir / n, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", n
        width, height = struct.unpack(">II", head[16:24])
        assert width > 300 and height > 200, (n, width, height)
    assert str(out_dir) in res.stdout
