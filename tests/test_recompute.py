"""Activation recompute (train.recompute): same loss, gradients and router biases as without it; every
executed layer (each loop iteration) recomputed; less memory held for backward, as measured.

Run as a script under torchrun it is the TP=2 worker: ``torchrun --nproc_per_node 2 tests/test_recompute.py``.
"""
from __future__ import annotations

import pytest
import torch

import loopmoe.model.moe as moe_mod
import loopmoe.model.recompute as recompute_mod
from loopmoe.config import ConfigError, ModelConfig, load_config
from loopmoe.model import LoopMoEModel
from loopmoe.model.recompute import is_recomputing

V = 97
MODES = ("full", "selective")
_ROUTER_FORWARD, _SDPA = moe_mod.Router.forward, torch.nn.functional.scaled_dot_product_attention


def cfg_(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, n_prelude=1, n_loop=1,
                n_coda=1, loop_iters=2, max_seq_len=64, n_experts=4, top_k=2, expert_hidden=16,
                n_shared_experts=1, adaln_rank=8, linear_backend="torch", aux_free_bias=True,
                aux_free_rate=0.01, input_reinjection=True)
    base.update(kw)
    return ModelConfig(**base)


def build(recompute: str, seed=0, **kw) -> LoopMoEModel:
    torch.manual_seed(seed)
    m = LoopMoEModel(cfg_(**kw), recompute=recompute)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero IterAdaLN modulation: iterations really differ
        for blk in m.loop:
            for p in blk.adaln.mod.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def batch(b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, s), generator=g), torch.randint(0, V, (b, s), generator=g)


def step(m, x, y):
    """Forward, backward, aux-free bias update; returns (loss, {name: grad}, [bias per unique layer])."""
    out = m(x, labels=y)
    out.loss.backward()
    loads = [blk.ffn.router.load_acc.clone() for blk in m.layers]
    m.update_router_biases()
    return out.loss.detach(), {n: p.grad for n, p in m.named_parameters()}, loads, [
        blk.ffn.router.bias.clone() for blk in m.layers]


@pytest.mark.parametrize("n_loop,loop_iters", [(1, 2), (1, 3), (2, 2), (2, 3)])
@pytest.mark.parametrize("mode", MODES)
def test_recompute_same_loss_gradients_and_bias(mode, n_loop, loop_iters, one_thread):
    kw = dict(n_loop=n_loop, loop_iters=loop_iters, exit_loss_weights=[0.1] * (loop_iters - 1))
    x, y = batch()
    loss0, grads0, loads0, bias0 = step(build("none", **kw), x, y)
    loss1, grads1, loads1, bias1 = step(build(mode, **kw), x, y)
    assert torch.equal(loss1, loss0)  # the forward is the same computation
    assert set(grads1) == set(grads0)
    for n, g in grads1.items():  # the backward runs the same kernels on recomputed, identical inputs
        assert g is not None and grads0[n] is not None, n
        torch.testing.assert_close(g, grads0[n], rtol=0, atol=1e-7, msg=n)
    for a, b in zip(loads1, loads0):  # a recompute does not count its tokens a second time
        assert torch.equal(a, b)
    assert int(loads1[1].sum()) == loop_iters * 2 * 16 * 2  # loop layer 0: every iteration once
    for a, b in zip(bias1, bias0):
        assert torch.equal(a, b)


def count_recomputes(m, monkeypatch):
    """{unique layer: router passes re-run in backward} and the number of SDPA calls re-run in backward."""
    counts = {id(blk.ffn.router): 0 for blk in m.layers}
    sdpa = {"n": 0}
    router_fwd, real_sdpa = _ROUTER_FORWARD, _SDPA

    def router(self, *a, **k):
        counts[id(self)] += is_recomputing()
        return router_fwd(self, *a, **k)

    def attn(*a, **k):
        sdpa["n"] += is_recomputing()
        return real_sdpa(*a, **k)

    monkeypatch.setattr(moe_mod.Router, "forward", router)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attn)
    x, y = batch()
    m(x, labels=y).loss.backward()
    return [counts[id(blk.ffn.router)] for blk in m.layers], sdpa["n"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_loop", [1, 2])
def test_every_executed_layer_recomputed_per_iteration(mode, n_loop, monkeypatch, one_thread):
    """The published pitfall: wrapping modules of a looped stack wraps a one-layer loop once or not at
    all. Here each loop layer is recomputed once per iteration, prelude and coda once."""
    R = 3
    m = build(mode, n_loop=n_loop, loop_iters=R)
    per_layer, sdpa = count_recomputes(m, monkeypatch)
    assert per_layer == [1] + [R] * n_loop + [1]
    assert sdpa == 2 + R * n_loop  # the attention core of every executed layer, too
    none = build("none", n_loop=n_loop, loop_iters=R)
    assert count_recomputes(none, monkeypatch) == ([0] * (2 + n_loop), 0)


def test_no_recompute_without_grad_or_with_kv_cache(monkeypatch):
    from loopmoe.model.attention import KVCache

    m = build("full").eval()
    x, _ = batch(b=1, s=8)
    calls = []
    monkeypatch.setattr(recompute_mod, "checkpoint", lambda fn, *a, **k: (calls.append(1), fn(*a))[1])
    with torch.no_grad():
        ref = m(x).logits
    out = m(x, cache=KVCache()).logits  # decoding with grad on: the cache fills once, no checkpoint
    assert not calls
    torch.testing.assert_close(out, ref)
    m(x)  # grad on, no cache: the executed layers are checkpointed (P + R*K + C calls)
    assert len(calls) == 4


def test_recompute_holds_less_memory_for_backward(one_thread):
    """Measured with torch's allocation records (conftest.cpu_peak_bytes): the peak of forward + backward
    above the parameters, for a model whose activations dominate (512 tokens, a loop of 1 layer x 3)."""
    from conftest import cpu_peak_bytes

    kw = dict(d_model=64, head_dim=16, expert_hidden=64, n_experts=8, max_seq_len=512, loop_iters=3,
              exit_loss_weights=[])
    x, y = batch(b=2, s=512)
    peak = {}
    for mode in ("none", "full", "selective"):
        m = build(mode, **kw)
        peak[mode], _, _ = cpu_peak_bytes(lambda: m(x, labels=y).loss.backward())
    print({k: f"{v / 2**20:.1f} MiB" for k, v in peak.items()})
    assert peak["full"] < 0.6 * peak["none"]
    assert peak["selective"] < 0.85 * peak["none"]
    assert peak["full"] < peak["selective"]


def test_config_field_and_fp8_refused():
    assert load_config(None, ["train.recompute=full"]).train.recompute == "full"
    with pytest.raises(ConfigError, match=r"train.recompute.*not one of"):
        load_config(None, ["train.recompute=some"])
    with pytest.raises(ConfigError, match=r"model.linear_backend=te"):  # fp8 needs an FP8 route, not recompute=none
        load_config(None, ["train.recompute=selective", "train.precision=fp8"])
    assert load_config(None, ["train.recompute=selective", "train.precision=fp8",
                              "model.linear_backend=te"]).train.recompute == "selective"  # TE's own checkpoint
    with pytest.raises(ValueError, match="train.recompute"):
        LoopMoEModel(cfg_(), recompute="partial")


# ---------------------------------------------------------------------------------------------------
# Tensor + sequence parallelism (megatron linears, gloo collectives inside the recomputed layers)


@pytest.mark.slow
def test_tp2_sequence_parallel_with_recompute_equals_one_process():  # ~30 s on 2 CPU cores
    from conftest import run_torchrun

    res = run_torchrun(__file__)
    assert res.stdout.count("TP2 recompute OK") == 2


# Through the trainer (build_model -> parallelize -> DeepSpeed engine -> train_step; the pipeline stage
# calls the blocks itself) against one process without recompute: name -> (tp, pp, ep, sp, zero, mode)
LAYOUTS = {"PP2 full": (1, 2, 1, False, 1, "full"), "EP2 selective": (1, 1, 2, False, 1, "selective"),
           "TP2+SP full": (2, 1, 1, True, 0, "full"), "DP2-ZeRO2 full": (1, 1, 1, False, 2, "full")}


@pytest.mark.slow
def test_trainer_layouts_with_recompute_equal_one_process(tmp_path):  # ~80 s on 2 CPU cores
    import json
    import os

    from tests.test_parallel_harness import launch

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_parallel.py")
    launch(script, ["reference", str(tmp_path / "ref.json")], 1)
    launch(os.path.abspath(__file__), ["layouts", str(tmp_path / "got.json")], 2)
    refs, got = json.loads((tmp_path / "ref.json").read_text()), json.loads((tmp_path / "got.json").read_text())
    for name, (*_, sp, _zero, _mode) in LAYOUTS.items():
        ref = refs["reference-nolb" if sp else "reference"]  # (lb off under SP: aux losses are per shard)
        for a, b in zip(got[name]["loss"], ref["loss"], strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), f"{name}: loss {a!r} != {b!r} (one process, no recompute)"
        for a, b in zip(got[name]["grad_norm"], ref["grad_norm"], strict=True):
            assert abs(a - b) <= 1e-4 * abs(b), f"{name}: gradient norm {a!r} != {b!r}"
        assert set(got[name]["grads"]) == set(ref["grads"]) and ref["grads"]
        for k, g in got[name]["grads"].items():
            r = torch.tensor(ref["grads"][k])
            torch.testing.assert_close(torch.tensor(g), r, rtol=1e-5, atol=1e-5 * float(r.abs().max()) + 1e-12,
                                       msg=lambda m: f"{name}: gradient of {k} after step 1: {m}")


def _layouts_worker(out_path: str) -> None:
    import json

    import torch.distributed as dist

    from tests.test_parallel_harness import init_worker, run_layout

    init_worker()
    res = {name: run_layout(name, tp, pp, ep, sp, zero, lb=not sp, recompute=mode)
           for name, (tp, pp, ep, sp, zero, mode) in LAYOUTS.items()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.destroy_process_group()


def _tp_worker():
    import torch.distributed as dist
    from conftest import assert_grads_match_one_process
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if not torch.cuda.is_available():  # megatron's sequence-parallel collectives allocate on
        torch.cuda.current_device = lambda: "cpu"  # torch.cuda.current_device(): the known CPU stub
    kw = dict(linear_backend="megatron", vocab_size=96, lb_loss_coef=0.0, z_loss_coef=0.0, n_loop=1,
              loop_iters=3)
    x, y = batch()
    x, y = x % 96, y % 96

    def run(mode, sp=False):
        torch.manual_seed(0)
        m = LoopMoEModel(cfg_(**kw), sequence_parallel=sp, recompute=mode)
        out = m(x, labels=y)
        out.loss.backward()
        m.update_router_biases()
        return m, out

    ps.initialize_model_parallel(1)
    ref, ref_out = run("none")
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(2)
    for mode in MODES:
        m, out = run(mode, sp=True)
        torch.testing.assert_close(out.lm_loss, ref_out.lm_loss)
        assert_grads_match_one_process(m, ref_grads, rank, tp=2, msg=f"{mode}")
        for blk, ref_blk in zip(m.layers, ref.layers):
            torch.testing.assert_close(blk.ffn.router.bias, ref_blk.ffn.router.bias)
    print(f"rank {rank}: TP2 recompute OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "layouts":
        _layouts_worker(sys.argv[2])
    else:
        _tp_worker()
