"""Parallel layouts on the CPU (gloo): start-up validation, the megatron CPU adapter, and equivalence of
every layout with one process (same seed, same global batch, fp32): the loss of each of 5 steps and the
gradients of the router and IterAdaLN parameters after step 1 (after the data-parallel reduction).
Also: the gradient reduction of the shared loop weights happens once per step, not once per iteration.

Run as a script it is the worker:
    python tests/test_parallel.py reference OUT.json                       (one process)
    torchrun --nproc_per_node 2 tests/test_parallel.py layouts2 OUT.json     (TP2, TP2+SP, PP2, EP2, DP2 ZeRO 0/1/2, counts)
    torchrun --nproc_per_node 4 tests/test_parallel.py layouts4 OUT.json     (TP2 x EP2 (+SP), PP2 x EP2, TP2 x PP2)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loopmoe.config import Config, ConfigError, ModelConfig, load_config
from loopmoe.parallel import layout as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------
# Start-up validation (no processes)


def _cfg(**par) -> Config:
    cfg = load_config("configs/tiny_loopmoe.yaml" if os.path.exists("configs/tiny_loopmoe.yaml")
                      else os.path.join(ROOT, "configs/tiny_loopmoe.yaml"))
    for k, v in par.items():
        setattr(cfg.parallel, k, v)
    return cfg


def test_layout_accepts_valid_layouts():
    lay = L.validate_layout(_cfg(tp=2, pp=1, ep=2), 4)
    assert (lay.tp, lay.pp, lay.dp, lay.ep, lay.edp) == (2, 1, 2, 2, 1)
    lay = L.validate_layout(_cfg(pp=2), 2)
    assert lay.pp_split and sum(lay.pp_split) == 4
    preset = load_config(os.path.join(ROOT, "configs/loopmoe_3b.yaml"))
    assert L.validate_layout(preset, 8).ep == 8  # the preset's own layout on one 8-GPU node


def test_layout_errors_name_the_numbers_and_suggest_a_layout():
    with pytest.raises(L.LayoutError, match=r"world size 3 is not divisible by TP x PP = 2 x 1.*Suggestion: .*parallel\.tp=1"):
        L.validate_layout(_cfg(tp=2), 3)
    with pytest.raises(L.LayoutError, match=r"n_kv_heads=3 \(n_heads=9\) is not divisible by TP=2.*parallel\.tp=1"):
        L.validate_layout(load_config(os.path.join(ROOT, "configs/loopmoe_3b.yaml"), ["parallel.tp=2"]), 8)
    with pytest.raises(L.LayoutError, match=r"n_experts=14 is not divisible by EP=3"):
        L.validate_layout(_cfg(ep=3), 3)
    with pytest.raises(L.LayoutError, match=r"EP=4 does not divide the data-parallel size DP=2.*parallel\.ep=2"):
        L.validate_layout(_cfg(tp=2, ep=4), 4)
    with pytest.raises(L.LayoutError, match=r"sequence_parallel=true needs TP > 1"):
        L.validate_layout(_cfg(sequence_parallel=True), 1)
    with pytest.raises(L.LayoutError, match=r"ZeRO stage 2"):
        L.validate_layout(load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                                      ["parallel.pp=2", "train.zero_stage=2"]), 2)
    with pytest.raises(L.LayoutError, match=r"PP=5 exceeds the 3 pipeline units"):
        L.validate_layout(_cfg(pp=5), 5)
    # the error message is a ConfigError: pretrain_loopmoe.py prints it and exits with 2
    assert issubclass(L.LayoutError, ConfigError)


def test_pp_split_keeps_the_loop_block_in_one_stage():
    m = ModelConfig(n_prelude=6, n_loop=10, n_coda=6, loop_iters=2)
    for pp in (2, 3, 4):
        split = L.default_pp_split(m, pp)
        assert sum(split) == 22 and len(split) == pp and L._split_error(m, split) is None
    assert L.default_pp_split(m, 2) == [6, 16] or L.default_pp_split(m, 2) == [16, 6]  # 6 | 10x2 + 6: costs 6, 26
    assert L.default_pp_split(m, 3) == [6, 10, 6]  # the loop block (20 executed layers) alone
    cfg = _cfg(pp=2, pp_split=[2, 2])  # prelude + first loop layer | second loop layer + coda
    with pytest.raises(L.LayoutError, match=r"cuts the loop block \(layers 1\.\.2"):
        L.validate_layout(cfg, 2)
    with pytest.raises(L.LayoutError, match=r"has 3 stages but PP=2"):
        L.validate_layout(_cfg(pp=2, pp_split=[1, 2, 1]), 2)
    assert L.validate_layout(_cfg(pp=2, pp_split=[3, 1]), 2).pp_split == (3, 1)


def test_world_size_from_env(monkeypatch):
    for k in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS",
              "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert L.world_size_from_env() == 1
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert L.world_size_from_env() == 1  # the batch shell (PROCID 0 of 8 but no job step): one process
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert L.world_size_from_env() == 8  # a task of an srun step
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert L.world_size_from_env() == 4


def test_pretrain_rejects_a_bad_layout_before_any_work():
    env = {**os.environ, "WORLD_SIZE": "4", "RANK": "0"}
    out = subprocess.run([sys.executable, "pretrain_loopmoe.py", "--config", "configs/loopmoe_3b.yaml",
                          "parallel.tp=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "n_kv_heads=3" in out.stderr and "Suggestion" in out.stderr and "torch.distributed" not in out.stderr


# ---------------------------------------------------------------------------------------------------
# The megatron CPU adapter


def test_cpu_adapter_replaces_what_megatron_needs_from_cuda(monkeypatch):
    """loopmoe/parallel/megatron_cpu_adapter.py: each line of its table, and nothing when CUDA is present."""
    from loopmoe.parallel import megatron_cpu_adapter as A

    monkeypatch.setattr(torch.cuda, "current_device", torch.cuda.current_device)
    monkeypatch.setattr(torch.cuda, "synchronize", torch.cuda.synchronize)
    monkeypatch.setattr(A, "_installed", False)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the adapter is a no-op (checked below with is_available patched)")
    with pytest.raises((RuntimeError, AssertionError)):  # what megatron's schedules do without it
        torch.zeros([], dtype=torch.int, device="cuda")
    with A.cuda_to_cpu():
        assert torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"  # schedules.py
        assert torch.empty(3, device=0).device.type == "cpu"  # an ordinal
        assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"  # p2p_communication.py
        torch.cuda.synchronize()  # p2p_communication.py, dist_checkpointing: a no-op
    assert torch.cuda.current_device() == "cpu"  # install() is process-wide (SP collectives, checkpoints)
    # with CUDA present nothing is patched
    monkeypatch.setattr(A, "_installed", False)
    sentinel = object()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: sentinel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert A.install() is False and torch.cuda.current_device() is sentinel
    with A.cuda_to_cpu():
        assert torch.zeros(1, device="cpu").device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# Equivalence with one process (workers below)

# name -> (tp, pp, ep, sequence_parallel, zero stage, processes)
LAYOUTS = {
    "TP2": (2, 1, 1, False, 1, 2),
    "TP2+SP": (2, 1, 1, True, 1, 2),
    "PP2": (1, 2, 1, False, 1, 2),
    "PP2-ZeRO0": (1, 2, 1, False, 0, 2),
    "EP2": (1, 1, 2, False, 1, 2),
    "EP2-ZeRO0": (1, 1, 2, False, 0, 2),
    "EP2-ZeRO2": (1, 1, 2, False, 2, 2),
    "DP2-ZeRO0": (1, 1, 1, False, 0, 2),
    "DP2-ZeRO1": (1, 1, 1, False, 1, 2),
    "DP2-ZeRO2": (1, 1, 1, False, 2, 2),
    "TP2xEP2": (2, 1, 2, False, 1, 4),
    "TP2xEP2+SP": (2, 1, 2, True, 2, 4),
    "PP2xEP2": (1, 2, 2, False, 1, 4),
    "TP2xPP2+SP": (2, 2, 1, True, 0, 4),
}


def _launch(mode: str, nproc: int, out: str) -> None:
    from tests.test_parallel_harness import launch

    launch(os.path.abspath(__file__), [mode, out], nproc)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    _launch("reference", 1, str(d / "ref.json"))
    _launch("layouts2", 2, str(d / "two.json"))
    out = {}
    for f in ("ref.json", "two.json"):
        out.update(json.loads((d / f).read_text()))
    return out, d


@pytest.fixture(scope="module")
def results4(results):
    out, d = results
    _launch("layouts4", 4, str(d / "four.json"))
    return {**out, **json.loads((d / "four.json").read_text())}


def _compare(res: dict, name: str) -> None:
    sp = LAYOUTS[name][3]
    ref = res["reference-nolb" if sp else "reference"]
    got = res[name]
    for step, (a, b) in enumerate(zip(got["loss"], ref["loss"]), start=1):
        assert abs(a - b) <= 1e-5 * abs(b), f"{name}: step {step} loss {a!r} != {b!r} (single process)"
    assert ref["grad_norm"][0] > 1.0, "gradient clipping (optim.grad_clip=1) must be active at step 1"
    for step, (a, b) in enumerate(zip(got["grad_norm"], ref["grad_norm"]), start=1):  # the clipping norm
        assert abs(a - b) <= 1e-4 * abs(b), f"{name}: step {step} gradient norm {a!r} != {b!r}"
    assert len(got["loss"]) == 5 and set(got["grads"]) == set(ref["grads"]) and ref["grads"]
    for k, g in got["grads"].items():
        g, r = torch.tensor(g), torch.tensor(ref["grads"][k])
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * float(r.abs().max()) + 1e-12,
                                   msg=lambda m: f"{name}: gradient of {k} after step 1: {m}")


@pytest.mark.parametrize("name", [n for n, v in LAYOUTS.items() if v[5] == 2])
def test_layout_equals_single_process(results, name):  # the whole 2-process launch: ~40 s on 2 CPU cores
    _compare(results[0], name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, v in LAYOUTS.items() if v[5] == 4])
def test_4_process_layout_equals_single_process(results4, name):  # 4 processes on 2 cores: ~60 s
    _compare(results4, name)


def test_loop_gradient_reduction_once_per_step_not_per_iteration(results):
    """Collectives of one training step with R=2 and R=3 loop iterations (the same parameters): the
    gradient reductions (all-reduce / reduce / reduce-scatter, calls and elements per process group)
    are identical, so the shared loop weights are reduced once per step whatever R is. Under sequence
    parallelism the SP gradient all-reduces over TP are counted the same way (activation collectives,
    which do scale with R, are all-gathers / reduce-scatters / all-to-alls and excluded there)."""
    counts = results[0]["counts"]
    for name in ("DP2-ZeRO0", "DP2-ZeRO1", "DP2-ZeRO2", "EP2-ZeRO2", "TP2+SP"):
        r2, r3 = counts[name]["R2"], counts[name]["R3"]
        assert r2 == r3, f"{name}: reductions differ between R=2 and R=3: {r2} vs {r3}"
        assert sum(c for c, _ in r2.values()) > 0, name
    dp = counts["DP2-ZeRO1"]["R2"]
    assert sum(n for _, n in dp.values()) >= counts["n_params"], "every gradient element is reduced"


# ---------------------------------------------------------------------------------------------------
# The worker (python tests/test_parallel.py MODE OUT.json, alone or under torchrun)


def _worker(mode: str, out_path: str) -> None:
    import torch.distributed as dist

    from tests.test_parallel_harness import init_worker, run_layout

    init_worker()
    res = {}
    if mode == "reference":
        res["reference"] = run_layout("reference", 1, 1, 1, False, 1)
        res["reference-nolb"] = run_layout("reference-nolb", 1, 1, 1, False, 1, lb=False)
    else:
        n = 2 if mode == "layouts2" else 4
        for name, (tp, pp, ep, sp, zero, nproc) in LAYOUTS.items():
            if nproc == n:
                res[name] = run_layout(name, tp, pp, ep, sp, zero, lb=not sp)
        if n == 2:
            counts = {}
            for name in ("DP2-ZeRO0", "DP2-ZeRO1", "DP2-ZeRO2", "EP2-ZeRO2", "TP2+SP"):
                tp, pp, ep, sp, zero, _ = LAYOUTS[name]
                counts[name] = {}
                for R in (2, 3):
                    r = run_layout(f"{name} R={R}", tp, pp, ep, sp, zero, R=R, lb=not sp, steps=2, count_step=2)
                    seen = r["counts"]
                    if sp:  # only the TP-group all-reduces: the SP gradient hooks
                        seen = {k: v for k, v in seen.items() if k.startswith("all_reduce@(")
                                and len(k.split("@")[1].split(",")) == 2}
                    counts[name][f"R{R}"] = seen
                    if name == "DP2-ZeRO1":
                        counts["n_params"] = r["n_params"]
            res["counts"] = counts
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    from loopmoe.parallel.distributed import shutdown

    shutdown()  # barrier, every group registry cleared, groups destroyed while the interpreter is alive


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
