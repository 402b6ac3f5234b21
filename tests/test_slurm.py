"""slurm/loopmoe_*.sbatch on a real (one-node, CPU) Slurm cluster: the same template as on the H100 nodes, with
the tiny preset, 2 tasks and gloo. Trains and checkpoints; a USR1 (time limit / preemption) checkpoints, requeues
and resumes with the same loss at every step; a rank killed with -9 fails the job fast and the next launch
resumes. The dry run (layout + srun command for 1, 4, 16 nodes, refusals) needs no cluster.

The cluster tests are marked `slurm` and skipped without one: `bash scripts/slurm_up.sh` starts it."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import ROOT

TEMPLATES = ["slurm/loopmoe_3b.sbatch", "slurm/loopmoe_9b.sbatch"]
SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16", "model.n_experts=8",
         "model.expert_hidden=32", "model.top_k=2", "model.adaln_rank=8", "data.seq_len=64", "train.micro_batch=4",
         "train.eval_iters=2", "logging.progress_bar=false", "logging.tensorboard=false", "optim.warmup_steps=5",
         "model.vocab_size=1024", "train.log_interval=1", "train.eval_interval=1000"]
STEPS = 40  # long enough that a signal after step 3 lands well before the end
# What a GPU-less cluster needs on the command line (they override the #SBATCH lines of the template).
CPU_OPTS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=15"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


def _slurm_idle() -> bool:
    if not all(shutil.which(c) for c in ("sinfo", "sbatch", "scontrol", "scancel")):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s.strip().rstrip("*~#") in ("idle", "mixed") for s in out.stdout.split())


def on_slurm(fn):
    """Marks `slurm` and `slow`; skipped where no Slurm node is idle."""
    skip = pytest.mark.skipif(not _slurm_idle(), reason="needs a running Slurm cluster (scripts/slurm_up.sh)")
    return pytest.mark.slurm(pytest.mark.slow(skip(fn)))


def base_env(**extra) -> dict[str, str]:
    """The submitting shell: no Slurm or launcher variables from outside (CI may run inside a job)."""
    drop = ("SLURM_", "SBATCH_", "SRUN_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_", "PMI")
    inputs = {"MODEL", "CONFIG", "TP", "PP", "EP", "GLOBAL_BATCH", "NODES", "NTASKS_PER_NODE", "GPUS_PER_NODE",
              "DATA_PREFIX", "DATA_WEIGHTS", "TOKENIZER", "RUN_DIR", "CKPT_DIR", "EXTRA_ARGS", "DRY_RUN", "SRUN_ARGS",
              "LOOPMOE_ROOT", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in inputs}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------------------
# (d) no cluster needed: syntax, header, dry run


@pytest.mark.parametrize("path", TEMPLATES + ["slurm/common.sh", "slurm/site.sh"])
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", path], cwd=ROOT, check=True)


@pytest.mark.parametrize("path", TEMPLATES)
def test_template_header(path):
    with open(os.path.join(ROOT, path)) as f:
        header = [line.strip() for line in f if line.startswith("#SBATCH")]
    for want in ("--output=logs/%x-%j.out", "--open-mode=append", "--signal=B:USR1@300", "--requeue",
                 "--dependency=singleton", "--ntasks-per-node=8", "--gpus-per-node=8"):
        assert f"#SBATCH {want}" in header, want


def dry_run(template, nodes="1,4,16", **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(ROOT, template)], cwd="/", capture_output=True, text=True, timeout=600,
                          env=base_env(DRY_RUN="1", NODES=nodes, **env))


@pytest.mark.parametrize("template,model", [
    ("slurm/loopmoe_3b.sbatch", "loopmoe_3b"), ("slurm/loopmoe_3b.sbatch", "vanilla_3b"),
    ("slurm/loopmoe_9b.sbatch", "loopmoe_9b"), ("slurm/loopmoe_9b.sbatch", "vanilla_9b"),
])
def test_dry_run_layout_for_1_4_16_nodes(template, model):
    from loopmoe.config import load_config

    micro = load_config(os.path.join(ROOT, "configs", f"{model}.yaml")).train.micro_batch  # the preset's (memory.md)
    accum = {n: 256 // (micro * 8 * n) for n in (1, 4, 16)}  # micro x accum x DP = 256 samples at every size
    assert all(a >= 1 and a * micro * 8 * n == 256 for n, a in accum.items()), (micro, accum)
    out = dry_run(template, MODEL=model)  # run from /: the template finds the repository itself
    assert out.returncode == 0, out.stdout + out.stderr
    blocks = out.stdout.split("-- NODES=")[1:]
    assert [b.split()[0] for b in blocks] == ["1", "4", "16"]
    for n, b in zip((1, 4, 16), blocks):
        world = 8 * n
        assert f"{n} node(s) x 8 tasks (8 GPUs/node, NCCL) = world {world} | TP 1 x PP 1 x DP {world}" in b, b
        assert "| EP 8 (" in b
        assert re.search(rf"global batch 256 = micro {micro} x accum {accum[n]} x DP {world} \(1048576 tokens/step\)", b), b
        cmd = b.split("command: ", 1)[1].splitlines()[0]
        assert cmd.startswith(f"srun --nodes={n} --ntasks-per-node=8 --ntasks={world} --kill-on-bad-exit=1 ")
        assert f"pretrain_loopmoe.py --config configs/{model}.yaml " in cmd
        assert f"logging.run_dir=runs/{model}" in cmd and f"train.grad_accum={accum[n]}" in cmd
        assert " --cpu-bind=cores " in cmd  # the site block's default: each task on its own cores
        assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in b  # the site line of the dry run


def test_dry_run_overrides_and_extra_args():
    out = dry_run("slurm/loopmoe_9b.sbatch", nodes="2", MODEL="vanilla_9b", TP="2", GLOBAL_BATCH="",
                  DATA_PREFIX="/data/a_text_document,/data/b_text_document", DATA_WEIGHTS="0.7,0.3",
                  TOKENIZER="/data/spm.model", RUN_DIR="/runs/v9", CKPT_DIR="/ckpt/v9",
                  EXTRA_ARGS="train.steps=123 optim.lr=1e-4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "world 16 | TP 2 x PP 1 x DP 8" in out.stdout
    assert "global batch 256 = micro 1 x accum 32 x DP 8" in out.stdout  # the preset's grad_accum
    cmd = out.stdout.split("command: ", 1)[1].splitlines()[0]
    for want in ("data.prefixes=/data/a_text_document\\,/data/b_text_document", "data.weights=0.7\\,0.3",
                 "data.tokenizer_model=/data/spm.model", "logging.run_dir=/runs/v9", "checkpoint.dir=/ckpt/v9",
                 "train.steps=123", "optim.lr=1e-4", "parallel.tp=2"):
        assert want in cmd, (want, cmd)
    assert "train.grad_accum" not in cmd


@pytest.mark.parametrize("env,pattern", [
    (dict(NTASKS_PER_NODE="6", TP="4", MODEL="vanilla_3b"), r"not divisible by TP x PP = 4 x 1 = 4"),
    (dict(TP="2"), r"n_kv_heads=3 .*not divisible by TP=2"),  # loopmoe_9b: 3 KV heads
    (dict(NTASKS_PER_NODE="4"), r"EP=8 does not divide .*DP=4"),
    (dict(GLOBAL_BATCH="100"), r"GLOBAL_BATCH=100 is not a multiple of micro_batch x DP = 1 x 8 = 8"),
    (dict(EP="5"), r"model.n_experts=88 is not divisible by EP=5"),
    (dict(EXTRA_ARGS="train.stepz=3"), r"did you mean 'steps'"),
])
def test_dry_run_refuses_layouts_that_do_not_divide(env, pattern):
    out = dry_run("slurm/loopmoe_9b.sbatch", nodes="1", **env)
    assert out.returncode != 0
    assert re.search(pattern, out.stdout + out.stderr), out.stdout + out.stderr
    assert "error: " in out.stdout and "command:" not in out.stdout


# ---------------------------------------------------------------------------------------------------------
# The site block (slurm/site.sh) and the rendezvous port


def site_env(script: str, **env) -> dict[str, str]:
    """The environment the job's tasks get after ``script`` (run after slurm/site.sh) and lm_site_env."""
    out = subprocess.run(["bash", "-c", f"source slurm/site.sh; source slurm/common.sh; {script}; lm_site_env; env -0"],
                         cwd=ROOT, env=base_env(**env), capture_output=True, text=True, timeout=600, check=True)
    return dict(kv.split("=", 1) for kv in out.stdout.split("\0") if "=" in kv)


def test_templates_leave_network_settings_to_the_site_block():
    for path in TEMPLATES + ["slurm/common.sh"]:
        with open(os.path.join(ROOT, path)) as f:
            text = f.read()
        assert not re.search(r"^\s*(export\s+)?(NCCL|GLOO)_\w+=", text, re.M), path  # no second place to edit
        assert "slurm/site.sh" in text, path  # each points to it


def test_site_defaults_let_nccl_and_gloo_pick_and_expand_segments():
    env = site_env(":")
    assert not [k for k in env if k.startswith(("NCCL_", "GLOO_"))], env  # single NIC, CI: the libraries pick
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_site_block_reaches_the_tasks_and_the_submitting_shell_wins():
    env = site_env("SITE_SOCKET_IFNAME=lo,ib0 SITE_IB_HCA=mlx5_0,mlx5_1 SITE_IB_GID_INDEX=3 SITE_NCCL_DEBUG=INFO",
                   NCCL_DEBUG="WARN", PYTORCH_ALLOC_CONF="backend:native")
    assert env["NCCL_SOCKET_IFNAME"] == "lo,ib0" and env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert env["NCCL_IB_GID_INDEX"] == "3"
    assert env["GLOO_SOCKET_IFNAME"] == "lo"  # gloo takes one name: the first, an interface of this node
    assert env["NCCL_DEBUG"] == "WARN"  # set in the submitting shell: kept
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env and env["PYTORCH_ALLOC_CONF"] == "backend:native"
    env = site_env("SITE_SOCKET_IFNAME=^docker,lo")  # NCCL's exclusion syntax means nothing to gloo
    assert env["NCCL_SOCKET_IFNAME"] == "^docker,lo" and "GLOO_SOCKET_IFNAME" not in env
    env = site_env("SITE_SOCKET_IFNAME=no-such-nic0")  # not an interface here: gloo is left to pick
    assert env["NCCL_SOCKET_IFNAME"] == "no-such-nic0" and "GLOO_SOCKET_IFNAME" not in env


def master_ports(jobs: range, restarts: int = 0, port_range: str = "") -> list[int]:
    """lm_master_port for every job id in ``jobs`` (port_range "low high"; empty: this machine's)."""
    loop = (f"for j in $(seq {jobs.start} {jobs.step} {jobs.stop - 1}); do "
            f"SLURM_JOB_ID=$j SLURM_RESTART_COUNT={restarts} lm_master_port '{port_range}'; done")
    out = subprocess.run(["bash", "-c", f"source slurm/common.sh; {loop}"], cwd=ROOT, env=base_env(),
                         capture_output=True, text=True, timeout=600, check=True)
    ports = [int(p) for p in out.stdout.split()]
    assert len(ports) == len(jobs)
    return ports


def test_master_port_is_outside_the_ephemeral_range():
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        lo, hi = map(int, f.read().split())
    jobs = range(1, 40000, 7)
    for ports, (first, last) in ((master_ports(jobs), (10000, lo - 1)),  # this machine's range
                                 (master_ports(jobs, port_range="32768 60999"), (10000, 32767)),  # Linux default
                                 (master_ports(jobs, port_range="5000 60999"), (61000, 65535))):  # a low range
        assert first <= min(ports) and max(ports) <= last, (min(ports), max(ports), first, last)
    assert len(set(master_ports(range(1000, 1200)))) == 200  # neighbouring jobs on a node do not collide
    assert master_ports(range(1234, 1235), restarts=1) != master_ports(range(1234, 1235))  # nor a requeued run


def test_refuses_to_run_outside_a_job():
    out = subprocess.run(["bash", "slurm/loopmoe_3b.sbatch"], cwd=ROOT, capture_output=True, text=True,
                         env=base_env(), timeout=600)
    assert out.returncode != 0 and "not inside a Slurm job" in out.stderr


# ---------------------------------------------------------------------------------------------------------
# On the cluster


@pytest.fixture(scope="module")
def token_data(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("slurm_data")
    subprocess.run(["bash", "scripts/make_test_data.sh", str(d)], cwd=ROOT, check=True, capture_output=True,
                   env=base_env())
    return str(d / "docs_text_document"), str(d / "tok.model")


class Job:
    """One submission of slurm/loopmoe_3b.sbatch with the tiny preset on 2 CPU tasks."""

    def __init__(self, tmp, data, run_dir, *overrides, name=None):
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.name = name or f"lmtest-{uuid.uuid4().hex[:8]}"
        self.run_dir = run_dir
        prefix, tok = data
        self.env = base_env(CONFIG="configs/tiny_loopmoe.yaml", GLOBAL_BATCH="", DATA_PREFIX=prefix, TOKENIZER=tok,
                            RUN_DIR=str(run_dir), EXTRA_ARGS=" ".join([*SMALL, *overrides]))
        self.id = None

    def cmd(self, *extra) -> list[str]:
        return ["sbatch", *extra, f"--job-name={self.name}", *CPU_OPTS, f"--output={self.logs}/%x-%j.out",
                "slurm/loopmoe_3b.sbatch"]

    def submit(self) -> str:
        out = subprocess.run(self.cmd("--parsable"), cwd=ROOT, env=self.env, capture_output=True, text=True,
                             check=True)
        self.id = out.stdout.strip().split(";")[0]
        return self.id

    def submit_wait(self, timeout=800) -> int:
        out = subprocess.run(self.cmd("--wait"), cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        m = re.search(r"Submitted batch job (\d+)", out.stdout)
        assert m, f"sbatch failed ({out.returncode}): {out.stdout}{out.stderr}"
        self.id = m.group(1)
        return out.returncode

    @property
    def log(self) -> str:
        path = self.logs / f"{self.name}-{self.id}.out"
        return path.read_text() if path.exists() else ""

    def info(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True)
        if out.returncode != 0:
            return {}  # purged (MinJobAge after the end)
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def wait_state(self, states, timeout) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if not info or info.get("JobState") in states:
                return info
            time.sleep(0.2)
        self.cancel()
        raise AssertionError(f"job {self.id} not in {states} after {timeout} s: {self.info()}\n{self.log[-3000:]}")

    def cancel(self):
        if self.id:
            subprocess.run(["scancel", self.id], capture_output=True)

    def on_node(self) -> bool:
        """Whether processes of the job still run on this node (the test cluster is this one node)."""
        return subprocess.run(["scontrol", "listpids", self.id], capture_output=True).returncode == 0

    @staticmethod
    def environ(pid: int) -> dict[str, str]:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.decode().split("=", 1) for kv in f.read().split(b"\0") if b"=" in kv)

    def pid_of_rank(self, rank: int) -> int | None:
        """The pid of task `rank` of this job's training step (found by its environment)."""
        want = {f"SLURM_JOB_ID={self.id}".encode(), f"SLURM_PROCID={rank}".encode()}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"pretrain_loopmoe.py" not in f.read():
                        continue
                with open(f"/proc/{p}/environ", "rb") as f:
                    if want <= set(f.read().split(b"\0")):
                        return int(p)
            except OSError:
                continue
        return None


def records(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written while we poll
                pass
    return out


def latest(run_dir) -> str:
    return (run_dir / "checkpoints" / "latest").read_text().strip()


def wait_for(cond, timeout, what, job=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if job is not None and job.info().get("JobState") in TERMINAL:
            raise AssertionError(f"job ended while waiting for {what}:\n{job.log[-3000:]}")
        time.sleep(0.1)
    if job is not None:
        job.cancel()
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{job.log[-3000:]}" if job else ""))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, token_data):
    """(a) The template, start to finish under `sbatch --wait`: the uninterrupted reference run."""
    tmp = tmp_path_factory.mktemp("slurm_straight")
    job = Job(tmp, token_data, tmp / "run", f"train.steps={STEPS}", "checkpoint.interval=1000")
    t0 = time.time()
    rc = job.submit_wait()
    return job, rc, time.time() - t0


@on_slurm
def test_sbatch_trains_and_checkpoints(straight):
    job, rc, seconds = straight
    assert rc == 0, job.log[-4000:]
    log = job.log
    assert "no GPUs, gloo) = world 2 | TP 1 x PP 1 x DP 2" in log
    assert "SLURM_RESTART_COUNT=0" in log and "fresh start" in log
    assert f"== loopmoe job end: rc=0 action=done step={STEPS}/{STEPS}" in log
    assert latest(job.run_dir) == f"step_{STEPS:08d}"
    assert [r["step"] for r in records(job.run_dir) if "loss" in r] == list(range(1, STEPS + 1))
    assert (job.run_dir / "config.yaml").exists()
    # The site block and the port, as the job used them.
    port = int(re.search(r"MASTER_PORT=(\d+)", log).group(1))
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        assert 10000 <= port < int(f.read().split()[0]), port  # below the ephemeral range
    site = [ln for ln in log.splitlines() if "[loopmoe-slurm] site:" in ln]
    assert site and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in site[0] and "cpu-bind=cores" in site[0]
    command = [ln for ln in log.splitlines() if "[loopmoe-slurm] command:" in ln]
    assert command and " --cpu-bind=cores " in command[0], command


@on_slurm
def test_usr1_checkpoints_requeues_and_resumes_with_identical_losses(tmp_path, token_data, straight):
    ref_job, ref_rc, _ = straight
    assert ref_rc == 0, ref_job.log[-3000:]
    reference = {r["step"]: r["loss"] for r in records(ref_job.run_dir) if "loss" in r}
    job = Job(tmp_path, token_data, tmp_path / "run", f"train.steps={STEPS}", "checkpoint.interval=1000")
    job.submit()
    try:
        wait_for(lambda: len(records(job.run_dir)) >= 3, 600, "3 logged steps", job)  # caps: 600 s under load
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
        t_signal = time.time()
        # The batch shell forwards USR1 to the step, which checkpoints at the end of the step and exits; the shell
        # then requeues the job. A requeued job waits ~150 s (BeginTime) unless told to start now.
        info = job.wait_state({"PENDING"} | TERMINAL, 600)
        assert info.get("JobState") == "PENDING", (info, job.log[-3000:])
        t_requeued = time.time()
        # Start it now only once the first run has left the node, and a second later: a requeued job started
        # within the second its previous run ended is killed by slurmd ("Job credential revoked") and FAILS.
        wait_for(lambda: "action=requeue" in job.log and not job.on_node(), 600, "the first run to leave the node")
        # slurmd's rule is about wall-clock seconds, not machine speed: start only once the clock has moved
        # past the second after the one in which the first run was seen gone.
        left = int(time.time())
        wait_for(lambda: int(time.time()) >= left + 2, 5, "the clock to pass the first run's end second")
        subprocess.run(["scontrol", "update", f"JobId={job.id}", "StartTime=now"], check=True)
        wait_for(lambda: "action=done" in job.log, 600, "the resumed run to finish", job)
        job.wait_state(TERMINAL, 600)
    finally:
        job.cancel()
    log = job.log
    first, second = log.split("SLURM_RESTART_COUNT=1", 1)
    stopped = int(re.search(r"action=requeue step=(\d+)/", first).group(1))
    assert 3 <= stopped < STEPS, first[-2000:]
    assert "received SIGUSR1: will checkpoint at the end of the step under way" in first
    assert f"resuming from step {stopped}" in second and "resumed from" in second
    assert f"== loopmoe job end: rc=0 action=done step={STEPS}/{STEPS}" in second
    assert latest(job.run_dir) == f"step_{STEPS:08d}"
    recs = [r for r in records(job.run_dir) if "loss" in r]  # appended by both runs
    steps = [r["step"] for r in recs]
    assert steps == list(range(1, STEPS + 1)), steps  # each step once: the stop saved the step it logged last
    assert {r["step"]: r["loss"] for r in recs} == reference  # bitwise, at every step
    print(f"requeue seen {t_requeued - t_signal:.1f} s after the signal; stopped at step {stopped}")


@on_slurm
def test_kill_9_of_one_rank_fails_fast_and_next_launch_resumes(tmp_path, token_data):
    run_dir = tmp_path / "run"
    common = ["checkpoint.interval=5", "parallel.timeout_minutes=1"]
    job = Job(tmp_path, token_data, run_dir, "train.steps=1000", *common)
    job.submit()
    try:
        def mid_interval():
            recs = records(run_dir)
            return (run_dir / "checkpoints" / "latest").exists() and recs and recs[-1]["step"] % 5 in (2, 3)
        wait_for(mid_interval, 600, "a step between two checkpoints", job)
        pid = job.pid_of_rank(1)
        assert pid, "rank 1 not found"
        env = job.environ(pid)  # what srun handed the task: the site block's allocator setting, the job's port
        assert env.get("PYTORCH_CUDA_ALLOC_CONF") == "expandable_segments:True", env
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            assert 10000 <= int(env["MASTER_PORT"]) < int(f.read().split()[0]) and env["SLURM_PROCID"] == "1"
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        info = job.wait_state(TERMINAL, 60)
        took = time.time() - t_kill
    finally:
        job.cancel()
    assert took < 30, f"the job took {took:.0f} s to fail after a rank died"
    assert info.get("JobState", "FAILED") == "FAILED", info
    m = re.search(r"== loopmoe job end: rc=(\d+) action=(\w+) step=(\d+)/", job.log)
    assert m and m.group(1) != "0" and m.group(2) == "exit", job.log[-3000:]  # failed, and no requeue
    tag = latest(run_dir)
    step = int(tag.split("_")[1])
    assert step % 5 == 0 and step > 0
    assert (run_dir / "checkpoints" / tag / "rng_rank0.pt").exists() and (run_dir / "checkpoints" / tag / "rng_rank1.pt").exists()
    # The next launch (same run directory, same schedule: a changed train.steps is refused at resume) resumes
    # from that checkpoint and runs two more steps, to a planned stop (train.exit_interval: checkpoint, exit 0).
    again = Job(tmp_path, token_data, run_dir, "train.steps=1000", *common, f"train.exit_interval={step + 2}")
    rc = again.submit_wait()
    assert rc == 0, again.log[-4000:]
    assert f"resuming from step {step}" in again.log and "resumed from" in again.log
    assert f"== loopmoe job end: rc=0 action=exit step={step + 2}/1000" in again.log  # planned: no requeue
    assert latest(run_dir) == f"step_{step + 2:08d}"
    print(f"job failed {took:.1f} s after kill -9 of rank 1; resumed from step {step}")
