"""Ctrl-C is a clean stop (issue 26): the first SIGINT checkpoints at the end of the current step and stops
with "stopped at step N; rerun the same command to resume" (no traceback), a rerun resumes from step N; a
second SIGINT exits at once (exit code 130) leaving no step directory that looks valid but is not; a SIGINT
during start-up is one line. As a terminal does, the signal goes to the launcher's whole process group
(python: the trainer; torchrun: torchrun, which forwards it to its workers, each in its own session).
Every wait is on a line appearing in the process's output, never on a sleep."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, make_token_data
from tests.test_train import SMALL

pytestmark = pytest.mark.slow  # pretrain_loopmoe.py subprocesses


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> dict:
    return make_token_data(tmp_path_factory.mktemp("data"), 300, 1024)


def command(token_data, run, *extra, small=True) -> list[str]:
    return ["pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *(SMALL if small else []),
            f"data.prefixes={token_data['prefix']}", f"data.tokenizer_model={token_data['tok']}",
            "model.vocab_size=1024", f"logging.run_dir={run}", "train.steps=100000", "train.log_interval=1",
            "checkpoint.interval=100000", "train.eval_interval=100000", "logging.tensorboard=false",
            "logging.progress_bar=false", *extra]


class Run:
    """A launcher in its own process group (a terminal's foreground job), its output read line by line."""

    def __init__(self, argv: list[str]):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # SIGINT at its default, as in a terminal's foreground job (a test runner started with `&` or nohup
        # hands it down ignored, and an ignored SIGINT stays ignored: test_ignored_sigint_stays_ignored)
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []

    def wait_for(self, pattern: str) -> re.Match:
        """Read until a line matches ``pattern`` (the event); fail if the process ends first."""
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        self.proc.wait()
        raise AssertionError(f"ended (rc {self.proc.returncode}) before {pattern!r}:\n{self.log[-4000:]}")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group

    def finish(self) -> int:
        rest, _ = self.proc.communicate(timeout=600)
        self.lines.append(rest)
        return self.proc.returncode

    @property
    def log(self) -> str:
        return "".join(self.lines)


def assert_no_traceback_of_ours(log: str) -> None:
    assert "KeyboardInterrupt" not in log, log[-4000:]
    assert not re.search(r'File ".*(pretrain_loopmoe\.py|/loopmoe/)', log), log[-4000:]


def steps_on_disk(ckpt) -> list[str]:
    return sorted(d for d in os.listdir(ckpt) if d.startswith("step_")) if os.path.isdir(ckpt) else []


def test_ctrl_c_checkpoints_the_step_and_a_rerun_resumes_there(token_data, tmp_path):
    run = tmp_path / "run"
    r = Run([sys.executable, *command(token_data, run)])
    r.wait_for(r"^step\s+\d+/")  # training is under way
    r.ctrl_c()
    n = int(r.wait_for(r"stopped at step (\d+); rerun the same command to resume").group(1))
    assert r.finish() == 130, r.log[-3000:]
    assert_no_traceback_of_ours(r.log)
    assert "received SIGINT: will checkpoint at the end of the step under way" in r.log
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{n:08d}"
    # The same command again (stopped by exit_interval one step later): it continues from step n.
    again = subprocess.run([sys.executable, *command(token_data, run, f"train.exit_interval={n + 1}")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {n})" in again.stdout + again.stderr  # checkpoint: resumed from ... (step n)
    assert re.search(rf"^step\s+{n + 1}/", again.stdout, re.M), again.stdout[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{n + 1:08d}"


def test_second_ctrl_c_exits_at_once_leaving_no_false_step(token_data, tmp_path):
    from loopmoe.train.checkpoint_integrity import verify_step

    run = tmp_path / "run"
    # The preset's own widths (not SMALL): a step and a save long enough for the second Ctrl-C to land in them.
    r = Run([sys.executable, *command(token_data, run, "data.seq_len=64", small=False)])
    r.wait_for(r"^step\s+\d+/")
    r.ctrl_c()
    r.wait_for(r"received SIGINT: will checkpoint")  # the first one was handled
    r.ctrl_c()
    rc = r.finish()
    assert rc == 130, r.log[-3000:]
    assert "received a second SIGINT" in r.log and "exiting now without a checkpoint" in r.log, r.log[-3000:]
    assert "stopped at step" not in r.log
    assert_no_traceback_of_ours(r.log)
    ckpt = run / "checkpoints"
    for tag in steps_on_disk(ckpt):  # a step directory exists only complete (the save works under .tmp/)
        assert verify_step(str(ckpt / tag)) is None, tag
    if (ckpt / "latest").exists():
        assert (ckpt / "latest").read_text().strip() in steps_on_disk(ckpt)


def test_ctrl_c_during_start_up_is_one_line(token_data, tmp_path):
    run = tmp_path / "run"
    r = Run([sys.executable, *command(token_data, run)])
    r.wait_for(r"distributed: ")  # the process group exists; the model is not built yet
    r.ctrl_c()
    assert r.finish() == 130, r.log[-3000:]
    assert "interrupted during start-up" in r.log, r.log[-3000:]
    assert_no_traceback_of_ours(r.log)
    assert steps_on_disk(run / "checkpoints") == []


def test_ctrl_c_under_torchrun_world_2(token_data, tmp_path):
    run = tmp_path / "run"
    r = Run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), *command(token_data, run)])
    r.wait_for(r"^(\[\S+\]:)?step\s+\d+/")
    r.ctrl_c()  # reaches torchrun only (its workers have their own sessions); torchrun forwards SIGINT
    n = int(r.wait_for(r"stopped at step (\d+); rerun the same command to resume").group(1))
    r.finish()  # torchrun's own exit code and its SignalException report are torchrun's (docs: README)
    assert_no_traceback_of_ours(r.log)
    assert r.log.count("received SIGINT: will checkpoint") >= 1
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{n:08d}"


@pytest.mark.parametrize("start", [signal.SIG_IGN, signal.default_int_handler])
def test_ignored_sigint_stays_ignored(start):
    """Under nohup or `&` SIGINT arrives ignored: the trainer keeps it so (no stop, no exit); otherwise ours."""
    from loopmoe.train.callbacks import signals

    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    try:
        signal.signal(signal.SIGINT, start)
        signals.catch_early_signals()
        now = signal.getsignal(signal.SIGINT)
        assert (now is signal.SIG_IGN) if start is signal.SIG_IGN else (now is signals._early_handler)
        assert signal.getsignal(signal.SIGTERM) is signals._early_handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)
