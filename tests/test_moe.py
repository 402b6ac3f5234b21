"""Router maths, dispatch equivalences, expert-parameter marking and (2 processes) expert parallelism.

Run as a script under torchrun it is the EP worker: ``torchrun --nproc_per_node 2 tests/test_moe.py``.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from loopmoe.config import ModelConfig
from loopmoe.model.layers import Linears
from loopmoe.model.moe import MoE, Router

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg_(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=4, top_k=2,
                expert_hidden=8, n_shared_experts=0, linear_backend="torch")
    base.update(kw)
    return ModelConfig(**base)


def make_moe(seed=0, ep_size=1, **kw) -> MoE:
    torch.manual_seed(seed)
    cfg = cfg_(**kw)
    return MoE(cfg, Linears(cfg), out_std=0.02, ep_size=ep_size)


def expert(moe, e, x):  # one routed expert applied to tokens x [n, d]
    g, u = (x @ moe.experts.w1[e]).chunk(2, dim=-1)
    return (F.silu(g) * u) @ moe.experts.w2[e]


def naive(moe, x, topk, gates, capacity=None):
    """Per-token loop; with a capacity, keep each expert's first slots in (token, slot) order."""
    out, seen = torch.zeros_like(x), [0] * moe.n_experts
    for t in range(x.shape[0]):
        for j in range(topk.shape[1]):
            e = int(topk[t, j])
            seen[e] += 1
            if capacity is None or seen[e] <= capacity:
                out[t] += gates[t, j] * expert(moe, e, x[t:t + 1])[0]
    return out


# ---------------------------------------------------------------------------------------------------
# Router


def test_router_maths_by_hand():
    torch.manual_seed(0)
    r = Router(cfg_(n_experts=4, top_k=2))
    x = torch.randn(5, 16)
    out = r(x)
    logits = x @ r.weight.T
    torch.testing.assert_close(out.logits, logits)
    top = logits.topk(2, dim=-1).indices
    assert torch.equal(out.topk, top)
    sel = logits.gather(1, top)
    torch.testing.assert_close(out.gates, sel.exp() / sel.exp().sum(-1, keepdim=True))  # softmax over k
    f = torch.tensor([(top == i).sum().item() / (5 * 2) for i in range(4)])
    p = logits.softmax(-1).mean(0)
    torch.testing.assert_close(out.lb, 4 * (f * p).sum())
    torch.testing.assert_close(out.z, (logits.exp().sum(-1).log() ** 2).mean())
    assert out.load.tolist() == [(top == i).sum().item() for i in range(4)] and out.load.sum() == 10


def test_router_balanced_lb_is_one_and_softmax_then_topk_not_renormalised():
    r = Router(cfg_(n_experts=4, top_k=1, router_score="softmax_then_topk"))
    with torch.no_grad():
        r.weight.copy_(torch.eye(4, 16) * 0.0)  # uniform router: p_i = 1/4
    x = torch.randn(8, 16)
    out = r(x, forced_topk=torch.arange(8).remainder(4).unsqueeze(1))  # perfectly balanced selection
    torch.testing.assert_close(out.lb, torch.tensor(1.0))
    torch.testing.assert_close(out.gates, torch.full((8, 1), 0.25))  # softmax over all, not renormalised


def test_aux_free_bias_changes_selection_not_weights_and_updates():
    torch.manual_seed(0)
    r = Router(cfg_(n_experts=4, top_k=2, aux_free_bias=True, aux_free_rate=0.1)).eval()
    x = torch.randn(6, 16)
    plain = r(x)
    r.bias[3] = 100.0  # expert 3 now always selected ...
    biased = r(x)
    assert (biased.topk == 3).any(dim=1).all()
    sel = biased.logits.gather(1, biased.topk)
    torch.testing.assert_close(biased.gates, sel.softmax(-1))  # ... but weighted by unbiased logits
    torch.testing.assert_close(biased.logits, plain.logits)
    # update: loads accumulated over training passes only, then b_i += rate * sign(mean - load_i)
    r.bias.zero_()
    r.train()
    a, b = r(x), r(x)
    r.eval()
    r(x)  # eval passes do not count
    load = (a.load + b.load).float()
    torch.testing.assert_close(r.load_acc, load)
    r.update_bias(0.1)
    torch.testing.assert_close(r.bias, 0.1 * torch.sign(load.mean() - load))
    assert r.load_acc.sum() == 0


# ---------------------------------------------------------------------------------------------------
# Dispatch


@pytest.mark.parametrize("cf", [0.0, 0.75])
def test_index_dispatch_equals_naive_loop(cf):
    moe = make_moe(capacity_factor=cf)
    x = torch.randn(2, 7, 16)
    y, r = moe(x)
    cap = moe.capacity(14) if cf else None
    if cf:
        assert cap == math.ceil(0.75 * 14 * 2 / 4) and int(r.load.max()) > cap  # something is dropped
    ref = naive(moe, x.reshape(14, 16), r.topk, r.gates, cap)
    torch.testing.assert_close(y.reshape(14, 16), ref, atol=1e-6, rtol=1e-5)


def test_shared_experts_are_added():
    moe = make_moe(n_shared_experts=2)
    assert moe.shared.w1.weight.shape == (16, 16)  # two experts of width 8 == one of width 16
    x = torch.randn(1, 5, 16)
    y, r = moe(x)
    routed = naive(moe, x[0], r.topk, r.gates)
    torch.testing.assert_close(y[0], routed + moe.shared(x)[0], atol=1e-6, rtol=1e-5)


def test_einsum_dispatch_equals_index_when_dropless():
    """DeepSpeed's one-hot gate on our logits == our index dispatch (outputs and gradients)."""
    idx, ein = make_moe(), make_moe(dispatch="einsum")
    x = torch.randn(2, 9, 16, requires_grad=True)
    y1, _ = idx(x)
    y2, _ = ein(x)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    g1 = torch.autograd.grad(y1.square().sum(), [x, idx.experts.w1, idx.router.weight])
    g2 = torch.autograd.grad(y2.square().sum(), [x, ein.experts.w1, ein.router.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_einsum_with_capacity_keeps_the_same_slots_but_renormalises():
    """Both keep each expert's first slots by position; DeepSpeed then renormalises the gates over a
    token's kept slots, ours leaves a dropped slot's weight out (documented in moe.py)."""
    ein = make_moe(capacity_factor=0.75, dispatch="einsum")
    x = torch.randn(1, 14, 16)
    y, r = ein(x)
    cap, seen, gates = ein.capacity(14), [0] * 4, r.gates.clone()
    for t in range(14):  # naive capacity mask in (token, slot) order, then renormalise kept gates
        for j in range(2):
            seen[int(r.topk[t, j])] += 1
            gates[t, j] *= seen[int(r.topk[t, j])] <= cap
    assert (gates == 0).any()
    gates = gates / gates.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(y[0], naive(ein, x[0], r.topk, gates), atol=1e-6, rtol=1e-5)


def test_our_lb_loss_matches_deepspeed_topkgating():
    from deepspeed.moe.sharded_moe import topkgating

    torch.manual_seed(1)
    logits = torch.randn(12, 4)
    r = Router(cfg_(n_experts=4, top_k=2))
    with torch.no_grad():  # make x @ W^T == logits
        r.weight.copy_(torch.eye(4, 16))
    ours = r(F.pad(logits, (0, 12)))
    l_aux, *_ = topkgating(logits.clone(), 2, 1.0, 0, drop_tokens=False)
    torch.testing.assert_close(ours.lb, l_aux)


def test_einsum_rejects_unsupported_router_options():
    with pytest.raises(ValueError, match="einsum"):
        make_moe(dispatch="einsum", aux_free_bias=True)


# ---------------------------------------------------------------------------------------------------
# Expert parameters for DeepSpeed


def expert_marks_ok(moe, ep: int) -> bool:
    """Exactly the routed-expert weights are DeepSpeed expert params, in the "ep_size_{ep}" group."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    names = {p: n for n, p in moe.named_parameters()}
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(moe.parameters()), "name": "dense"})
    moe_groups = [g for g in groups if g.get("moe")]
    return ({n for p, n in names.items() if is_moe_param(p)} == {"experts.w1", "experts.w2"}
            and len(moe_groups) == 1 and moe_groups[0]["name"] == f"ep_size_{ep}"
            and {names[p] for p in moe_groups[0]["params"]} == {"experts.w1", "experts.w2"})


def test_expert_params_stacked_and_unmarked_at_ep1():
    from deepspeed.moe.utils import is_moe_param

    moe = make_moe(n_shared_experts=1)
    assert moe.experts.w1.shape == (4, 16, 16) and moe.experts.w2.shape == (4, 8, 16)
    assert not any(is_moe_param(p) for p in moe.parameters())  # see Experts' docstring


# ---------------------------------------------------------------------------------------------------
# Expert parallelism: 2 processes (gloo) against the single-process layer with the same seed.


def test_ep2_equals_single_process():  # ~11 s on 2 CPU cores
    from conftest import run_torchrun

    res = run_torchrun(__file__)
    assert res.stdout.count("EP2 OK") == 2


def _ep_worker():
    from conftest import ep_worker

    ep_worker(_ep_checks)


def _ep_checks(rank: int):
    import torch.distributed as dist

    for dispatch in ("index", "einsum"):
        kw = dict(n_experts=4, n_shared_experts=1, dispatch=dispatch)
        ref, ep = make_moe(seed=0, **kw), make_moe(seed=0, ep_size=2, **kw)
        assert expert_marks_ok(ep, 2) and ep.experts.w1.shape[0] == 2
        torch.manual_seed(100 + rank)
        x = torch.randn(1, 6 + 4 * rank, 16)  # different token counts per rank: uneven splits
        xr, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, _ = ref(xr)
        ye, _ = ep(xe)
        torch.testing.assert_close(ye, yr, atol=1e-6, rtol=1e-5)
        yr.square().sum().backward()
        ye.square().sum().backward()
        torch.testing.assert_close(xe.grad, xr.grad, atol=1e-6, rtol=1e-5)
        for name in ("w1", "w2"):  # local expert grads == reference grads summed over ranks, sliced
            full = getattr(ref.experts, name).grad.clone()
            dist.all_reduce(full)
            torch.testing.assert_close(getattr(ep.experts, name).grad, full[2 * rank:2 * rank + 2],
                                       atol=1e-6, rtol=1e-5)
    print(f"rank {rank}: EP2 OK", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _ep_worker()
