"""Grouped-GEMM experts (moe.grouped_swiglu / Experts.forward) against a naive per-expert loop written
here: outputs and every gradient (input, w1, w2, router), with empty experts, uneven counts, the
group padding Hopper needs (exercised on the CPU through ``Experts.align``) and expert parallelism.

Run as a script under torchrun it is the EP worker: ``torchrun --nproc_per_node 2 tests/test_grouped_experts.py``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from loopmoe.config import ModelConfig
from loopmoe.model.layers import Linears
from loopmoe.model.moe import MoE, grouped_swiglu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def loop_swiglu(x, counts, w1, w2):
    """The reference: one expert after the other on its slice of rows, weights indexed per expert."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start:start + n]
        g, u = (xe @ w1[e]).chunk(2, dim=-1)
        outs.append((F.silu(g) * u) @ w2[e])
        start += n
    return torch.cat(outs)


def grads(fn, x, w1, w2, gy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w1, w2)]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, leaves, gy))


COUNTS = {
    "uneven": [5, 1, 3, 9, 2, 7],
    "empty experts": [0, 6, 0, 0, 11, 0],
    "all in the last": [0, 0, 0, 0, 0, 13],
    "all in the first": [13, 0, 0, 0, 0, 0],
    "no rows": [0, 0, 0, 0, 0, 0],
}


@pytest.mark.parametrize("align", [1, 4, 8])
@pytest.mark.parametrize("case", list(COUNTS))
def test_grouped_swiglu_equals_per_expert_loop(case, align):
    counts = COUNTS[case]
    torch.manual_seed(0)
    E, d, h, N = len(counts), 16, 8, sum(counts)
    x, w1, w2 = torch.randn(N, d), torch.randn(E, d, 2 * h) * 0.3, torch.randn(E, h, d) * 0.3
    gy = torch.randn(N, d)
    ct = torch.tensor(counts)
    got = grads(lambda a, b, c: grouped_swiglu(a, ct, b, c, align), x, w1, w2, gy)
    ref = grads(lambda a, b, c: loop_swiglu(a, counts, b, c), x, w1, w2, gy)
    for name, g, r in zip(("output", "d input", "d w1", "d w2"), got, ref):
        assert g.shape == r.shape, name
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=name)
    for e, n in enumerate(counts):  # an expert without rows gets an exact zero gradient
        if n == 0:
            assert got[2][e].abs().max() == 0 and got[3][e].abs().max() == 0


def cfg_(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=6, top_k=2,
                expert_hidden=8, n_shared_experts=0, linear_backend="torch")
    return ModelConfig(**{**base, **kw})


def make_moe(seed=0, ep_size=1, **kw) -> MoE:
    torch.manual_seed(seed)
    cfg = cfg_(**kw)
    return MoE(cfg, Linears(cfg), out_std=0.1, ep_size=ep_size)


def naive_moe(x, topk, router_w, w1, w2):
    """Per-token, per-slot reference of the routed experts (gates: softmax over the selected logits)."""
    gates = F.linear(x, router_w).gather(1, topk).softmax(-1)  # [T, k]
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(topk.shape[1]):
            e = int(topk[t, j])
            g, u = (x[t] @ w1[e]).chunk(2)
            acc = acc + gates[t, j] * ((F.silu(g) * u) @ w2[e])
        rows.append(acc)
    return torch.stack(rows)


# Forced routing: experts 1 and 4 get nothing, expert 0 most slots (T = 9 tokens, top-2).
FORCED = torch.tensor([[0, 2], [0, 3], [0, 5], [2, 0], [3, 0], [5, 2], [0, 3], [2, 3], [0, 5]])


@pytest.mark.parametrize("align", [None, 4])
def test_moe_layer_all_gradients_equal_naive(align):
    moe = make_moe()
    moe.experts.align = align
    x = torch.randn(1, 9, 16, requires_grad=True)
    y, r = moe(x, forced_topk=FORCED)
    assert r.load.tolist() == [7, 0, 4, 4, 0, 3]
    gy = torch.randn_like(y)
    params = [moe.router.weight, moe.experts.w1, moe.experts.w2]
    got = torch.autograd.grad(y, [x, *params], gy)
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    ref_y = naive_moe(leaves[0][0], FORCED, *leaves[1:])
    ref = torch.autograd.grad(ref_y, leaves, gy[0])
    torch.testing.assert_close(y[0], ref_y, atol=1e-6, rtol=1e-5)
    for name, g, rg in zip(("input", "router", "w1", "w2"), got, ref):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-5, msg=name)
    assert moe.experts.w1.shape == (6, 16, 16)  # stacked storage (checkpoints, export) unchanged


def test_unaligned_widths_are_a_clear_config_error():
    with pytest.raises(ValueError, match=r"model.d_model=16 and model.expert_hidden=12 must be multiples of 8.*"
                                         r"expert_hidden=16"):
        make_moe(expert_hidden=12)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def test_no_per_expert_indexing_of_the_stacked_weights():
    """Forward and backward touch w1 [E, d, 2h] / w2 only whole: no select/unbind per expert (their
    backward would write a zero gradient of the whole stack per expert: E^2 memory traffic)."""
    moe = make_moe()
    x = torch.randn(1, 9, 16, requires_grad=True)
    with _Ops() as rec:
        y, _ = moe(x)
        y.square().sum().backward()
    stacked = {tuple(moe.experts.w1.shape), tuple(moe.experts.w2.shape)}
    bad = [f for f, shapes in rec.ops if f.__name__.split(".")[0] in ("select", "unbind", "select_backward")
           and shapes and shapes[0] in stacked]
    assert not bad, bad
    assert sum("grouped_mm" in f.__name__ for f, _ in rec.ops) >= 4  # 2 forward + their backward


@pytest.mark.gpu
def test_grouped_experts_bf16_on_cuda_equal_loop():
    """Hopper's bf16 grouped GEMM (groups padded to 8 rows) against the fp32 loop, with empty experts."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (bf16 grouped GEMM)")
    counts = [0, 37, 5, 0, 64, 1, 0, 19]
    torch.manual_seed(0)
    E, d, h, N = len(counts), 256, 128, sum(counts)
    x, w1, w2 = torch.randn(N, d), torch.randn(E, d, 2 * h) * 0.05, torch.randn(E, h, d) * 0.05
    gy = torch.randn(N, d)
    ct = torch.tensor(counts, device="cuda")
    bf = [t.cuda().bfloat16() for t in (x, w1, w2, gy)]
    got = grads(lambda a, b, c: grouped_swiglu(a, ct, b, c, 16 // a.element_size()), *bf)
    ref = grads(lambda a, b, c: loop_swiglu(a, counts, b, c), x, w1, w2, gy)
    for name, g, r in zip(("output", "d input", "d w1", "d w2"), got, ref):
        torch.testing.assert_close(g.float().cpu(), r, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
def test_te_grouped_linear_experts_equal_stacked(single_process_group):
    """linear_backend='te': the routed experts are TE GroupedLinear, equal to the stacked grouped GEMM
    (bf16, then under FP8 finite), with the stacked w1/w2 state dict."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU with Transformer Engine")
    te = pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine (CUDA)")
    cfg = cfg_(linear_backend="te", d_model=128, expert_hidden=64, n_experts=8)
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe_te = MoE(cfg, Linears(cfg), out_std=0.1)
    torch.manual_seed(0)
    ref = make_moe(d_model=128, expert_hidden=64, n_experts=8).cuda()
    assert type(moe_te.experts).__name__ == "TEExperts"
    sd = moe_te.state_dict()
    torch.testing.assert_close(sd["experts.w1"], ref.experts.w1)
    torch.testing.assert_close(sd["experts.w2"], ref.experts.w2)
    counts = torch.tensor([0, 37, 5, 0, 64, 1, 0, 19], device="cuda")
    x = torch.randn(int(counts.sum()), 128, device="cuda")
    y_te = moe_te.experts(x, counts)
    y_ref = ref.experts(x, counts)
    torch.testing.assert_close(y_te, y_ref, atol=1e-4, rtol=1e-3)
    moe_te.load_state_dict(sd)  # stacked keys load back
    with te.fp8_autocast(enabled=True):
        y8 = moe_te.experts(x.bfloat16().float(), counts)
    y8.square().sum().backward()
    assert torch.isfinite(y8).all()


# ---------------------------------------------------------------------------------------------------
# Expert parallelism: 2 processes (gloo), each rank's experts and gradients against the naive loop.


def test_ep2_grouped_experts_equal_naive():
    from conftest import run_torchrun

    res = run_torchrun(__file__)
    assert res.stdout.count("GROUPED EP2 OK") == 2


def _ep_worker():
    from conftest import ep_worker

    ep_worker(_ep_checks)


def _ep_checks(rank: int):
    import torch.distributed as dist

    ep = make_moe(seed=0, ep_size=2)
    full = make_moe(seed=0)  # same seed: the full weights, of which rank r holds experts [3r, 3r+3)
    # Rank 0 routes to experts 0, 2, 3, 5 (expert 1 and 4 empty; rank 1 gets fewer rows than rank 0);
    # rank 1 routes only to rank 0's experts: rank 1's experts see tokens from rank 0 alone.
    topk = FORCED if rank == 0 else torch.tensor([[0, 2], [2, 0], [0, 1], [1, 2]])
    torch.manual_seed(100 + rank)
    x = torch.randn(1, topk.shape[0], 16, requires_grad=True)
    y, _ = ep(x, forced_topk=topk)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, ep.router.weight, ep.experts.w1, ep.experts.w2], gy)
    leaves = [t.detach().clone().requires_grad_()
              for t in (x, full.router.weight, full.experts.w1, full.experts.w2)]
    ref_y = naive_moe(leaves[0][0], topk, *leaves[1:])
    ref = list(torch.autograd.grad(ref_y, leaves, gy[0]))
    torch.testing.assert_close(y[0], ref_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)  # input: this rank's tokens
    torch.testing.assert_close(got[1], ref[1], atol=1e-6, rtol=1e-5)  # router: this rank's tokens
    for g, rg in zip(got[2:], ref[2:]):  # experts: summed over the ranks' tokens, this rank's slice
        dist.all_reduce(rg)
        torch.testing.assert_close(g, rg[3 * rank:3 * rank + 3], atol=1e-6, rtol=1e-5)
    if rank == 1:
        assert got[2][1].abs().max() == 0  # expert 4 (rank 1's second): no rows from either rank
    print(f"rank {rank}: GROUPED EP2 OK", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _ep_worker()
