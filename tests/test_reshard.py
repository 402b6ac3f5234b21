"""Checkpoints across layouts: save under one TP/PP/EP/DP/ZeRO layout, load under another, continue, and get
the loss of the run that never changed layout (model weights AND optimizer state reshard). Also:
``load_trained_model`` returns the same full model from every layout's checkpoint.

Layouts (fp32, tiny LoopMoE, same global batch; see tests/test_parallel_harness.py):
    W1   one process, ZeRO 1                  TP2  2 processes, tensor parallel, ZeRO 0
    PP2  2 processes, pipeline, ZeRO 1         EP2  2 processes, experts split (DP 2), ZeRO 2
Each saves after step 3 of 5. Resumed: TP2, PP2, EP2 from W1's checkpoint (TP1->TP2, PP1->PP2, EP1->EP2)
and W1 from each of theirs (TP2->TP1, PP2->PP1, EP2->EP1), plus EP2 from its own (same layout: bitwise).

Run as a script it is the worker: python tests/test_reshard.py MODE DIR (alone or under torchrun).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.test_train import token_prefix  # noqa: F401  (fixture: the tiny tokenised corpus)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (tp, pp, ep, sequence_parallel, zero stage)
LAYOUTS = {"W1": (1, 1, 1, False, 1), "TP2": (2, 1, 1, False, 0), "PP2": (1, 2, 1, False, 1),
           "EP2": (1, 1, 2, False, 2)}
SAVE_AT = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # 3 launches (1, 2, 1 processes): ~30 s on 2 idle CPU cores, ~90 s on busy ones
    from tests.test_parallel_harness import launch

    d = tmp_path_factory.mktemp("reshard")
    me = os.path.abspath(__file__)
    launch(me, ["w1", str(d)], 1)
    launch(me, ["two", str(d)], 2)
    launch(me, ["w1-resume", str(d)], 1)
    res = {}
    for f in ("w1.json", "two.json", "w1-resume.json"):
        res.update(json.loads((d / f).read_text()))
    return res, d


@pytest.mark.parametrize("src,dst", [("W1", "TP2"), ("TP2", "W1"), ("W1", "PP2"), ("PP2", "W1"),
                                     ("W1", "EP2"), ("EP2", "W1")])
def test_resume_under_another_layout_continues_the_run(runs, src, dst):
    res, _ = runs
    resumed = res[f"{dst}<-{src}"]["loss"]
    straight = res[dst]["loss"][SAVE_AT:]  # the run that never changed layout
    assert len(resumed) == len(straight) == 2
    for step, (a, b) in enumerate(zip(resumed, straight), start=SAVE_AT + 1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{src} -> {dst}: step {step} loss {a!r}, never-changed run {b!r}"


def test_resume_under_the_same_layout_is_bitwise(runs):
    res, _ = runs
    assert res["EP2<-EP2"]["loss"] == res["EP2"]["loss"][SAVE_AT:]


def test_load_trained_model_reads_every_layout(runs):
    from loopmoe.model import LoopMoEModel
    from loopmoe.train.checkpoint import load_trained_model

    _, d = runs
    ref, cfg = load_trained_model(str(d / "W1"))
    assert isinstance(ref, LoopMoEModel) and not ref.training and cfg.model.linear_backend == "torch"
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    want = ref(x).logits
    for name in ("TP2", "PP2", "EP2"):
        m, _ = load_trained_model(str(d / name), tag=f"step_{SAVE_AT:08d}")
        sd, rsd = m.state_dict(), ref.state_dict()
        assert set(sd) == set(rsd), name
        for k in rsd:  # the full, unsharded tensors (TP / EP / PP shards put together)
            assert sd[k].shape == rsd[k].shape, (name, k)
            # 3 Adam steps turn ~1e-7 gradient differences of near-zero gradients into ~1e-5 weight
            # differences; a misplaced shard would be off by the weights' own size (~0.05)
            torch.testing.assert_close(sd[k], rsd[k], rtol=1e-3, atol=1e-4, msg=lambda s: f"{name} {k}: {s}")
        torch.testing.assert_close(m(x).logits, want, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# End to end through pretrain_loopmoe.py (real data, sampler, callbacks): PP2 -> TP2+SP


def _pretrain(run_dir, prefix, tok, nproc, *extra):
    import subprocess

    from tests.conftest import free_port
    from tests.test_train import SMALL

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", *SMALL,
           f"data.prefixes={prefix}", f"data.tokenizer_model={tok}", "model.vocab_size=1024",
           f"logging.run_dir={run_dir}", "logging.tensorboard=false", *extra]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}, out.stdout


def test_pretrain_resumes_a_pipeline_checkpoint_under_tensor_parallelism(tmp_path, token_prefix):
    """A 2-stage pipeline run saves at step 2; the same run directory resumed with TP=2 (and sequence
    parallelism; the MoE load-balancing loss is off since SP routes sequence shards) continues with
    the losses of the pipeline run that never stopped (data position, optimizer, scheduler restored)."""
    import shutil

    common = ["train.steps=4", "train.log_interval=1", "train.eval_interval=100", "checkpoint.interval=2",
              "model.lb_loss_coef=0"]
    straight, pp_log = _pretrain(tmp_path / "pp", *token_prefix, 2, *common, "parallel.pp=2")
    assert "validation reports val/loss only" in pp_log  # what PP validation leaves out is said, not silent
    shutil.copytree(tmp_path / "pp" / "checkpoints", tmp_path / "tp" / "checkpoints")
    (tmp_path / "tp" / "checkpoints" / "latest").write_text("step_00000002")
    resumed, log = _pretrain(tmp_path / "tp", *token_prefix, 2, *common, "parallel.tp=2",
                             "parallel.sequence_parallel=true")
    assert "resumed from" in log and sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-5 * straight[step], (step, resumed, straight)


@pytest.mark.slow
def test_bf16_zero1_checkpoint_resumes_bitwise(tmp_path, token_prefix):
    """bf16 weights with fp32 master weights (ZeRO-1: DeepSpeed's BF16_Optimizer): the checkpoint carries the
    masters (optim.master.*), a resumed run continues bitwise (the CPU's kernels are deterministic at a fixed
    thread count; on a GPU the GPU check compares with a tolerance), load_trained_model reads it."""
    import shutil

    from loopmoe.train.checkpoint import load_trained_model

    common = ["train.steps=4", "train.log_interval=1", "train.eval_interval=100", "checkpoint.interval=2",
              "train.precision=bf16", "train.zero_stage=1"]
    straight, _ = _pretrain(tmp_path / "a", *token_prefix, 1, *common)
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_00000002")
    resumed, _ = _pretrain(tmp_path / "b", *token_prefix, 1, *common)
    assert {k: resumed[k] for k in (3, 4)} == {k: straight[k] for k in (3, 4)}
    model, cfg = load_trained_model(str(tmp_path / "a" / "checkpoints"))
    assert cfg.train.precision == "bf16" and sum(p.numel() for p in model.parameters()) > 0


# ---------------------------------------------------------------------------------------------------
# The worker


def _worker(mode: str, d: str) -> None:
    import torch.distributed as dist

    from tests.test_parallel_harness import init_worker, run_layout

    init_worker()
    res = {}

    def run(name, src=None):
        tp, pp, ep, sp, zero = LAYOUTS[name]
        if src is None:
            res[name] = run_layout(name, tp, pp, ep, sp, zero, save_at=SAVE_AT, save_dir=os.path.join(d, name))
        else:
            res[f"{name}<-{src}"] = run_layout(f"{name}<-{src}", tp, pp, ep, sp, zero,
                                               resume_from=os.path.join(d, src))

    if mode == "w1":
        run("W1")
    elif mode == "two":
        for name in ("TP2", "PP2", "EP2"):
            run(name)
        for name in ("TP2", "PP2", "EP2"):
            run(name, "W1")
        run("EP2", "EP2")
    else:
        for src in ("TP2", "PP2", "EP2"):
            run("W1", src)
    if dist.get_rank() == 0:
        with open(os.path.join(d, f"{mode}.json"), "w") as f:
            json.dump({k: {"loss": v["loss"]} for k, v in res.items()}, f)
    from loopmoe.parallel.distributed import shutdown

    shutdown()  # barrier, every group registry cleared, groups destroyed while the interpreter is alive


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
