"""README.md's commands cannot drift (issue 26): every command in its ```bash blocks is either run by
`make demo` (scripts/demo.sh runs the same entry point with the same flags) or by a named test that runs
that entry point; every Python entry point's --help runs; a config error under torchrun is printed once and
named by torchrun's failure summary."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# entry point (as the README writes it, "python" = the venv's python) -> where it is run
COVERED = {
    "make demo": "Makefile", "make test": "Makefile",
    "source .venv/bin/activate": ".venv/bin/activate",
    "python -m loopmoe.balance": "tests/test_balance.py",
    "python data_tools/train_tokenizer.py": "scripts/demo.sh",
    "python data_tools/preprocess.py": "scripts/demo.sh",
    "python pretrain_loopmoe.py": "scripts/demo.sh",
    "python pretrain_loopmoe.py --help": "tests/test_readme.py",
    "torchrun": "tests/test_ctrl_c.py",  # torch.distributed.run of pretrain_loopmoe.py, world 2
    "sbatch slurm/loopmoe_9b.sbatch": "tests/test_slurm.py",  # DRY_RUN=1, the srun line
    "python -m loopmoe.generate": "scripts/demo.sh",
    "python -m loopmoe.export.hf": "scripts/demo.sh",
    "python -m loopmoe.eval --tasks loopmoe_tiny_mc": "scripts/demo.sh",
    "python -m loopmoe.eval --data-dir": "tests/test_eval.py",
    "python -m loopmoe.plot": "scripts/demo.sh",
}
# what a covering file must contain to run the entry point (beyond the entry point's own name)
RUN_AS = {"torchrun": "torch.distributed.run", "make demo": "demo:", "make test": "test:",
          "sbatch slurm/loopmoe_9b.sbatch": "slurm/loopmoe_9b.sbatch", "source .venv/bin/activate": ""}
ENTRY_POINTS = ["pretrain_loopmoe.py", "data_tools/train_tokenizer.py", "data_tools/preprocess.py",
                "data_tools/merge.py", "-m loopmoe.balance", "-m loopmoe.generate", "-m loopmoe.export.hf",
                "-m loopmoe.eval", "-m loopmoe.plot", "-m loopmoe.memory"]


def readme_commands() -> list[str]:
    """Every command of README.md's ```bash blocks: continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md")).read()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in re.sub(r"\\\n\s*", " ", block).splitlines():
            cmd = re.sub(r"(^|\s)#.*$", "", cmd).strip()
            if cmd:
                out.append(cmd)
    return out


def entry_point(cmd: str) -> str:
    """The COVERED key a README command falls under."""
    words = shlex.split(cmd)
    if words[0] in ("make", "source", "sbatch"):
        return " ".join(words[:2])
    if words[0] == "torchrun":
        return "torchrun"
    assert words[0] == "python", f"README command {cmd!r} does not start with python, torchrun, make or sbatch"
    base = " ".join(words[:3] if words[1] == "-m" else words[:2])
    for key in sorted(COVERED, key=len, reverse=True):  # the most specific key whose words all appear
        if key.startswith(base) and all(w in words for w in key[len(base):].split()):
            return key
    raise AssertionError(f"README command {cmd!r}: its entry point is in no test and not in make demo; add it to "
                         f"COVERED with the test that runs it")


def flags(cmd: str) -> set[str]:
    return {w.split("=", 1)[0] for w in shlex.split(cmd) if w.startswith("--")}


def test_every_readme_command_is_run_by_the_demo_or_a_test():
    demo = open(os.path.join(ROOT, "scripts/demo.sh")).read()
    cmds = readme_commands()
    assert len(cmds) >= 15, cmds
    for cmd in cmds:
        key = entry_point(cmd)
        where = COVERED[key]
        body = open(os.path.join(ROOT, where)).read() if where != ".venv/bin/activate" else ""
        assert os.path.exists(os.path.join(ROOT, where)), (cmd, where)
        if where == "scripts/demo.sh":
            # the demo runs the same entry point ($PY = the venv's python) with every flag the README shows
            script = key.replace("python ", "$PY ", 1).split(" --")[0]
            assert script in demo, (cmd, script)
            missing = {f for f in flags(cmd) if f not in demo}
            assert not missing, f"README's {cmd!r} uses {missing}, which make demo never runs"
        else:
            need = RUN_AS.get(key, key.split()[-1] if key.startswith("python") else key)
            need = need.replace("python -m ", "")
            assert need in body, f"{where} does not run {need!r} (README: {cmd!r})"


def test_readme_first_minutes_say_what_a_new_shell_needs():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert "source .venv/bin/activate" in text and ".venv/bin/python" in text
    assert "DEMO_STEPS" in text and re.search(r"2[- ]core", text)
    assert "runs/demo-latest" in text and "runs/demo-latest" in open(os.path.join(ROOT, "scripts/demo.sh")).read()


@pytest.mark.slow  # ten interpreters, each importing torch
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_of_every_entry_point_runs(entry):
    res = subprocess.run([sys.executable, *entry.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage" in res.stdout.lower()


@pytest.mark.slow  # torchrun and two interpreters
def test_config_error_under_torchrun_once_and_in_the_summary():
    from tests.conftest import free_port

    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml",
                          "parallel.tp=3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = res.stdout + res.stderr
    assert res.returncode != 0
    printed = [ln for ln in out.splitlines() if ln.startswith("config error: parallel layout")]
    assert len(printed) == 1, out[-3000:]  # rank 0 only
    assert re.search(r"Root Cause.*?traceback\s*:\s*config error: parallel layout", out, re.S), out[-3000:]


def test_override_written_as_a_flag_gets_the_hint():
    sys.path.insert(0, ROOT)
    import pretrain_loopmoe

    with pytest.raises(SystemExit) as e:
        pretrain_loopmoe.parse_args(["--config", "configs/tiny_loopmoe.yaml", "--train.steps=30"])
    assert e.value.code == 2
    args = pretrain_loopmoe.parse_args(["train.steps=30"])
    assert args.overrides == ["train.steps=30"]


def test_override_hint_text(capsys):
    sys.path.insert(0, ROOT)
    import pretrain_loopmoe

    with pytest.raises(SystemExit):
        pretrain_loopmoe.parse_args(["--train.steps=30"])
    err = capsys.readouterr().err
    assert "overrides are section.key=value, e.g. train.steps=30" in err, err
