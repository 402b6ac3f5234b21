"""Faults injected on purpose (docs/reliability.md lists them with what happens): bad inputs refused before
any heavy work, damaged checkpoints named (and the intact fallback), a disk that fills during a save, a
SIGUSR1 during start-up, and the code-review list of former silent fallbacks."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest

from tests.conftest import ROOT, make_token_data
from tests.test_train import SMALL, train


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> dict:
    return make_token_data(tmp_path_factory.mktemp("data"), 300, 1024)


def one_line_error(out: subprocess.CompletedProcess, prefix: str) -> str:
    """The run stopped with exit code 2 and one error line (no traceback); return that line."""
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1 and "\n" not in lines[0], out.stderr
    return lines[0]


def assert_nothing_built(run_dir) -> None:
    """Start-up stopped before the process group (its first log line), the model and any checkpoint."""
    assert not os.path.exists(os.path.join(run_dir, "config.yaml"))  # written right after init_distributed
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "latest"))


# ---------------------------------------------------------------------------------------------------
# Every input checked before heavy work: pretrain_loopmoe.py with one bad input each


def _bad_inputs(data: dict, tmp) -> dict[str, tuple[list[str], str, list[str]]]:
    """name -> (overrides, error prefix, words the error line must contain)."""
    d = tmp / "bad"
    d.mkdir()
    prefix = data["prefix"]
    trunc = str(d / "trunc")  # a truncated .idx beside an intact .bin
    shutil.copy(prefix + ".bin", trunc + ".bin")
    idx = open(prefix + ".idx", "rb").read()
    (d / "trunc.idx").write_bytes(idx[: len(idx) // 2])
    nobin = str(d / "nobin")
    shutil.copy(prefix + ".idx", nobin + ".idx")
    (d / "text.model").write_text("not a model\n")
    (d / "broken.json").write_text("{ not json")
    return {
        "missing prefix": ([f"data.prefixes={d / 'absent'}"], "input error", ["absent", "data.prefixes[0]"]),
        "truncated idx": ([f"data.prefixes={trunc}"], "input error", ["trunc.idx", "preprocess"]),
        "missing bin": ([f"data.prefixes={nobin}"], "input error", ["nobin.bin"]),
        "no tokenizer": (["data.tokenizer_model="], "input error", ["data.tokenizer_model"]),
        "missing tokenizer": ([f"data.tokenizer_model={d / 'absent.model'}"], "input error", ["absent.model"]),
        "not a tokenizer": ([f"data.tokenizer_model={d / 'text.model'}"], "input error", ["text.model"]),
        "vocab too small": (["model.vocab_size=512"], "input error", ["1024 tokens", "model.vocab_size=1024"]),
        "weight 0": ([f"data.prefixes=[{prefix},{prefix}]", "data.weights=[1,0]"], "config error",
                     ["data.weights[1]", "> 0"]),
        "seq_len": (["data.seq_len=8192", "model.max_seq_len=4096"], "config error", ["data.seq_len", "max_seq_len"]),
        "layout": (["parallel.tp=3"], "config error", ["parallel"]),
        "ds_config missing": ([f"train.ds_config={d / 'absent.json'}"], "config error", ["absent.json"]),
        "ds_config broken": ([f"train.ds_config={d / 'broken.json'}"], "config error", ["broken.json", "JSON"]),
        "ds_config broken, zero_stage set": ([f"train.ds_config={d / 'broken.json'}", "train.zero_stage=1"],
                                             "input error", ["broken.json", "JSON"]),
    }


@pytest.mark.slow  # pretrain_loopmoe.py subprocesses
def test_each_bad_input_is_one_line_before_any_heavy_work(tmp_path, token_data):
    cases = _bad_inputs(token_data, tmp_path)
    for name, (overrides, prefix, words) in cases.items():
        run = tmp_path / name.replace(" ", "_").replace(",", "")
        out = train(run, token_data["prefix"], token_data["tok"], *overrides, check=False)
        line = one_line_error(out, prefix)
        for w in words:
            assert w in line, (name, w, line)
        assert "distributed:" not in out.stdout, name  # logged right after the process group exists
        assert_nothing_built(run)


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints are named; checkpoint.resume=latest_intact falls back to the newest intact step


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, token_data) -> str:
    """A run directory with checkpoints at steps 1, 2, 3 (latest = 3), each with its manifest: a 5-step run
    stopped at step 3 (train.exit_interval), so the tests resume it under the same schedule (a changed
    train.steps is refused at resume)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(run, token_data["prefix"], token_data["tok"], "train.steps=5", "train.exit_interval=3",
          "checkpoint.interval=1", "checkpoint.keep_last=3")
    return str(run)


def _copy_run(saved_run, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(saved_run, run)
    return run


def _shard(step_dir: str) -> str:
    dist_dir = os.path.join(step_dir, "dist")
    shards = sorted(f for f in os.listdir(dist_dir) if f.endswith(".distcp"))
    assert shards, os.listdir(dist_dir)
    return os.path.join(dist_dir, shards[0])


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_byte(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


DAMAGE = {
    "truncated shard": (lambda step: _truncate(_shard(step)), "bytes, the manifest says"),
    "missing file": (lambda step: os.remove(os.path.join(step, "rng_rank0.pt")), "rng_rank0.pt is missing"),
    "flipped byte": (lambda step: _flip_byte(_shard(step)), "wrong blake2b digest"),
}


def test_manifest_lists_every_file_with_its_size(saved_run):
    import json

    step = os.path.join(saved_run, "checkpoints", "step_00000003")
    manifest = json.load(open(os.path.join(step, "manifest.json")))["files"]
    on_disk = {os.path.relpath(os.path.join(r, n), step) for r, _, ns in os.walk(step) for n in ns} - {"manifest.json"}
    assert set(manifest) == on_disk and any(f.endswith(".distcp") for f in on_disk)
    for rel, entry in manifest.items():
        assert entry["size"] == os.path.getsize(os.path.join(step, rel))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_named_with_the_intact_step(tmp_path, saved_run, kind, caplog):
    from loopmoe.train.checkpoint import CheckpointError, load_trained_model, resolve_resume, verify_step

    ckpt = os.path.join(_copy_run(saved_run, tmp_path), "checkpoints")
    damage, words = DAMAGE[kind]
    assert verify_step(os.path.join(ckpt, "step_00000003")) is None
    damage(os.path.join(ckpt, "step_00000003"))
    assert words in verify_step(os.path.join(ckpt, "step_00000003"))
    with pytest.raises(CheckpointError) as e:
        resolve_resume(ckpt, "latest")
    msg = str(e.value)
    assert "step 3" in msg and words in msg and "newest intact earlier step is 2" in msg
    assert "checkpoint.resume=latest_intact" in msg
    with caplog.at_level(logging.WARNING, logger="loopmoe.train.checkpoint"):
        assert resolve_resume(ckpt, "latest_intact") == "step_00000002"
    assert any("DAMAGED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert resolve_resume(ckpt, "none") is None
    with pytest.raises(CheckpointError, match="step_00000003.*damaged"):
        load_trained_model(ckpt)  # the analysis/export path: latest, verified
    load_trained_model(ckpt, "step_00000002")


def test_no_intact_step_says_start_fresh(tmp_path, saved_run):
    from loopmoe.train.checkpoint import CheckpointError, resolve_resume

    ckpt = os.path.join(_copy_run(saved_run, tmp_path), "checkpoints")
    for step in ("step_00000001", "step_00000002", "step_00000003"):
        _truncate(_shard(os.path.join(ckpt, step)))
    with pytest.raises(CheckpointError, match="no earlier step is intact.*checkpoint.resume=none"):
        resolve_resume(ckpt, "latest_intact")


@pytest.mark.slow  # pretrain_loopmoe.py subprocesses
def test_pretrain_refuses_a_damaged_checkpoint_then_falls_back_when_asked(tmp_path, saved_run, token_data):
    run = _copy_run(saved_run, tmp_path)
    _truncate(_shard(os.path.join(run, "checkpoints", "step_00000003")))
    out = train(run, token_data["prefix"], token_data["tok"], "train.steps=5", "train.exit_interval=4", check=False)
    line = one_line_error(out, "input error")
    assert "step 3" in line and ".distcp" in line and "step is 2" in line
    assert "run directory" not in out.stdout  # refused after the process group, before config.yaml and the model
    assert (open(os.path.join(run, "checkpoints", "latest")).read().strip()) == "step_00000003"  # untouched
    out = train(run, token_data["prefix"], token_data["tok"], "train.steps=5", "train.exit_interval=4",
                "checkpoint.resume=latest_intact")
    warning = [ln for ln in out.stdout.splitlines() if "DAMAGED" in ln]
    assert warning and "WARNING" in warning[0] and "step 2" in warning[0]
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    assert open(os.path.join(run, "checkpoints", "latest")).read().strip() == "step_00000004"
    assert "no output" not in out.stdout


# ---------------------------------------------------------------------------------------------------
# Disk full during a save (files capped by RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk)


@pytest.mark.slow  # pretrain_loopmoe.py subprocesses
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, saved_run, token_data):
    import resource

    run = _copy_run(saved_run, tmp_path)
    ckpt = os.path.join(run, "checkpoints")
    limit = os.path.getsize(_shard(os.path.join(ckpt, "step_00000003"))) // 2  # a shard cannot be written

    def cap_file_size():  # Python ignores SIGXFSZ, so an oversized write raises OSError (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL,
           f"data.prefixes={token_data['prefix']}", f"data.tokenizer_model={token_data['tok']}",
           "model.vocab_size=1024", f"logging.run_dir={run}", "train.steps=5", "checkpoint.interval=1",
           "logging.tensorboard=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, preexec_fn=cap_file_size)
    assert out.returncode == 4, (out.returncode, out.stdout[-3000:], out.stderr[-3000:])
    err = [ln for ln in out.stdout.splitlines() if "saving step 4 failed" in ln]
    assert err and "GiB free" in err[0] and "step_00000003 is intact" in err[0], out.stdout[-3000:]
    assert "Traceback" not in out.stdout + out.stderr
    assert open(os.path.join(ckpt, "latest")).read().strip() == "step_00000003"
    assert not os.path.exists(os.path.join(ckpt, "step_00000004"))
    from loopmoe.train.checkpoint import resolve_resume

    assert resolve_resume(ckpt, "latest") == "step_00000003"  # the previous checkpoint verifies


# ---------------------------------------------------------------------------------------------------
# SIGUSR1 (Slurm's time-limit warning) during start-up


@pytest.mark.slow  # pretrain_loopmoe.py subprocesses
def test_sigusr1_during_startup_checkpoints_after_the_first_step(tmp_path, token_data):
    run = tmp_path / "run"
    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL,
           f"data.prefixes={token_data['prefix']}", f"data.tokenizer_model={token_data['tok']}",
           "model.vocab_size=1024", f"logging.run_dir={run}", "train.steps=1000", "logging.tensorboard=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:  # the event: the process group exists; the model is not built yet
        lines.append(line)
        if "distributed:" in line:
            break
    assert proc.poll() is None, "".join(lines)
    proc.send_signal(signal.SIGUSR1)
    rest, _ = proc.communicate(timeout=600)
    log = "".join(lines) + rest
    assert proc.returncode == 0, log[-3000:]
    assert "received SIGUSR1 during start-up" in log
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"


# ---------------------------------------------------------------------------------------------------
# Former silent fallbacks (the code-review list of issue 13)


def test_nodelist_expansion_matches_scontrol():
    from loopmoe.parallel.distributed import expand_nodelist

    cases = {"gpu[01-04]": ["gpu01", "gpu02", "gpu03", "gpu04"], "a,b": ["a", "b"], "node7": ["node7"],
             "gpu[01-02,10],cpu-a[8-9]-ib": ["gpu01", "gpu02", "gpu10", "cpu-a8-ib", "cpu-a9-ib"],
             "gpu[01-02,10],cpu[8-9]": ["gpu01", "gpu02", "gpu10", "cpu8", "cpu9"],
             "n[1-2]x[08-09]": ["n1x08", "n1x09", "n2x08", "n2x09"], "g[098-101]": ["g098", "g099", "g100", "g101"]}
    for nodes, want in cases.items():
        assert expand_nodelist(nodes) == want, nodes
    if shutil.which("scontrol"):  # Slurm's own expansion as the reference, where it is installed
        for nodes in cases:
            ref = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True)
            if ref.stdout.split():  # (Slurm calls a suffix after a bracket invalid: empty output, rc 0)
                assert expand_nodelist(nodes) == ref.stdout.split(), nodes
    with pytest.raises(ValueError, match="unbalanced"):
        expand_nodelist("gpu[01-04")


def test_master_addr_without_scontrol_is_the_first_host(monkeypatch, tmp_path):
    from loopmoe.parallel import distributed

    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol on the PATH
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.setenv("SLURM_NODELIST", "gpu[01-04],gpu10")
    assert distributed._slurm_master_addr() == "gpu01"  # was "gpu[01-04]"


def test_unreadable_ds_config_is_an_error_not_zero_0(tmp_path):
    from loopmoe.config import ConfigError, load_config
    from loopmoe.parallel.layout import validate_layout, zero_stage_of

    (tmp_path / "bad.json").write_text("{ not json")
    for path, words in ((tmp_path / "absent.json", "cannot read"), (tmp_path / "bad.json", "not valid JSON")):
        cfg = load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"), [f"train.ds_config={path}"])
        with pytest.raises(ConfigError, match=words):
            zero_stage_of(cfg)
        with pytest.raises(ConfigError, match=str(path.name)):
            validate_layout(cfg, 1)
    (tmp_path / "z2.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert zero_stage_of(load_config(None, [f"train.ds_config={tmp_path / 'z2.json'}"])) == 2


def test_data_weight_zero_is_refused():
    from loopmoe.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data.weights\[1\]=0.0 for b: every weight must be > 0"):
        load_config(None, ["data.prefixes=[a,b]", "data.weights=[1,0]"])


def test_checkpoint_resume_modes_accept_old_booleans():
    from loopmoe.config import ConfigError, load_config

    assert load_config(None, ["checkpoint.resume=true"]).checkpoint.resume == "latest"
    assert load_config(None, ["checkpoint.resume=false"]).checkpoint.resume == "none"
    assert load_config(None, ["checkpoint.resume=latest_intact"]).checkpoint.resume == "latest_intact"
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        load_config(None, ["checkpoint.resume=sometimes"])


def test_moe_without_expert_groups_is_an_error():
    """No silent DeepSpeed-laid-out groups: without the prepared expert groups the EP model refuses."""
    from loopmoe.config import ModelConfig
    from loopmoe.model.layers import Linears
    from loopmoe.model.moe import MoE

    cfg = ModelConfig(d_model=16, n_experts=4, expert_hidden=8, top_k=2, linear_backend="torch")
    with pytest.raises(RuntimeError, match=r"ep_size=2: no expert-parallel groups.*init_distributed\(ep=2\)"):
        MoE(cfg, Linears(cfg), out_std=0.02, ep_size=2)


def test_pipeline_validation_says_what_it_does_not_report(caplog):
    from loopmoe.config import ModelConfig
    from loopmoe.parallel.pipeline import PipelineEvalModel

    with caplog.at_level(logging.WARNING, logger="loopmoe.parallel.pipeline"):
        PipelineEvalModel(types.SimpleNamespace(cfg=ModelConfig(n_loop=1, loop_iters=2, ffn="moe")))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "val/loss only" in msg and "loss_exit" in msg and "imbalance" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loopmoe.parallel.pipeline"):
        PipelineEvalModel(types.SimpleNamespace(cfg=ModelConfig(n_loop=0, ffn="dense")))
    assert not caplog.records  # nothing is missing for a dense, unlooped model


# ---------------------------------------------------------------------------------------------------
# A hung peer (SIGSTOP of one rank): the others fail at parallel.timeout_minutes, not never


@pytest.mark.slow
def test_hung_peer_fails_the_job_at_the_collective_timeout(tmp_path, token_data):
    import time

    import psutil

    from tests.conftest import free_port

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL,
           f"data.prefixes={token_data['prefix']}", f"data.tokenizer_model={token_data['tok']}",
           "model.vocab_size=1024", f"logging.run_dir={run}", "train.steps=100000", "train.log_interval=1",
           "checkpoint.interval=100000", "logging.tensorboard=false", "parallel.timeout_minutes=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = []
    try:
        deadline = time.monotonic() + 600
        while True:  # the event: training is under way (two steps logged)
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            try:
                lines = (run / "metrics.jsonl").read_text().splitlines()
            except FileNotFoundError:
                continue
            if sum('"loss"' in ln for ln in lines) >= 2:
                break
        ranks = [p for p in psutil.Process(proc.pid).children() if "pretrain_loopmoe.py" in " ".join(p.cmdline())]
        peer = next(p for p in ranks if p.environ().get("RANK") == "1")
        peer.suspend()  # SIGSTOP: alive, holds its sockets, answers nothing
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=600)
        took = time.monotonic() - t0
    finally:
        for p in ranks:
            try:
                p.resume()
            except psutil.NoSuchProcess:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out[-3000:]
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]
    assert 50 <= took <= 400, took  # parallel.timeout_minutes=1, plus torchrun stopping the group
    _, alive = psutil.wait_procs(ranks, timeout=600)
    assert not alive
    print(f"hung peer: the job failed {took:.0f} s after SIGSTOP of rank 1 (timeout 60 s)")
