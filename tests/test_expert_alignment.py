"""What Transformer Engine's expert path needs from the shared MoE maths (issue 23), tested on the CPU:

- ``core.group_rows``: every expert group (the last included) a multiple of the FP8 alignment, in a buffer of a
  static size, under EP 1/2/4 with random routing (empty experts included); ``grouped_swiglu`` unchanged by it.
- ``core.combine_experts``: the custom autograd function gives the plain expression's values and gradients and
  keeps no fp32 [N, d] tensor for the backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loopmoe.model import core

# ---------------------------------------------------------------------------------------------------
# group_rows: alignment under expert parallelism


def received_counts(counts_by_src: torch.Tensor, ep: int, rank: int) -> torch.Tensor:
    """What ``moe.run_experts`` hands rank ``rank``'s experts: counts_by_src [ep, E] (each source rank's
    slots per global expert) -> [E/ep] slots per local expert, summed over the source ranks."""
    n_local = counts_by_src.shape[1] // ep
    return counts_by_src[:, rank * n_local:(rank + 1) * n_local].sum(0)


def random_counts(ep: int, E: int, T: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[ep, E] counts from random top-k routing on each source rank; a random half of the experts is never
    chosen (zero counts), and one source rank sends nothing to the last expert."""
    allowed = torch.randperm(E, generator=gen)[: max(k, E // 2)]
    out = torch.zeros(ep, E, dtype=torch.long)
    for src in range(ep):
        scores = torch.rand(T, len(allowed), generator=gen)
        topk = allowed[scores.topk(k, dim=-1).indices]  # [T, k] distinct experts per token
        out[src] = torch.bincount(topk.flatten(), minlength=E)
    return out


@pytest.mark.parametrize("align", [1, 8, 16])
@pytest.mark.parametrize("ep", [1, 2, 4])
def test_group_rows_aligns_every_group_under_ep(ep, align):
    gen = torch.Generator().manual_seed(ep * 100 + align)
    E, d, k = 8, 4, 2
    for trial in range(20):
        counts_by_src = random_counts(ep, E, T=int(torch.randint(0, 40, (1,), generator=gen)), k=k, gen=gen)
        for rank in range(ep):
            counts = received_counts(counts_by_src, ep, rank)  # [E_local]
            N, n_local = int(counts.sum()), counts.numel()
            x = torch.randn(N, d, generator=gen) + 10  # no zero rows: padding rows are told apart
            buf, pos, sizes = core.group_rows(x, counts, align)
            msg = f"ep={ep} rank={rank} align={align} counts={counts.tolist()} sizes={sizes.tolist()}"
            assert all(s % align == 0 for s in sizes.tolist()), msg
            assert int(sizes.sum()) == buf.shape[0], msg
            assert buf.shape[0] % align == 0 and buf.shape[0] <= N + n_local * (align - 1), msg
            # the static size: a function of N (and E, align) alone, whatever the routing
            assert buf.shape[0] == core.group_rows(x, torch.roll(counts, 1), align)[0].shape[0], msg
            # rows land where pos says, inside their own expert's group, in order; the rest is zeros
            starts = [0]
            for s in sizes.tolist()[:-1]:
                starts.append(starts[-1] + s)
            want_pos = [starts[e] + j for e, c in enumerate(counts.tolist()) for j in range(c)]
            assert pos.tolist() == want_pos, msg
            assert torch.equal(buf[pos], x), msg
            pad = torch.ones(buf.shape[0], dtype=torch.bool)
            pad[pos] = False
            assert buf[pad].abs().sum() == 0, msg


def loop_swiglu(x, counts, w1, w2):
    """Unpadded reference: one expert after the other on its slice of rows."""
    outs, start = [x.new_zeros(0, w2.shape[-1])], 0
    for e, n in enumerate(counts):
        g, u = (x[start:start + n] @ w1[e]).chunk(2, dim=-1)
        outs.append((F.silu(g) * u) @ w2[e])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("align", [8, 16])
@pytest.mark.parametrize("counts", [[5, 0, 3, 9], [0, 0, 0, 13], [0, 0, 0, 0], [16, 1, 0, 0]])
def test_grouped_swiglu_unchanged_by_the_padding(counts, align):
    torch.manual_seed(0)
    E, d, h, N = len(counts), 16, 8, sum(counts)
    x, w1, w2 = torch.randn(N, d), torch.randn(E, d, 2 * h) * 0.3, torch.randn(E, h, d) * 0.3
    gy = torch.randn(N, d)
    ct = torch.tensor(counts)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]
        y = fn(*leaves)
        return (y, *torch.autograd.grad(y, leaves, gy))

    got = run(lambda a, b, c: core.grouped_swiglu(a, ct, b, c, align))
    ref = run(lambda a, b, c: loop_swiglu(a, counts, b, c))
    for name, g, r in zip(("output", "d input", "d w1", "d w2"), got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------
# combine_experts: the custom autograd function


def combine_plain(x, token, ys, w):
    """The expression combine_experts replaced (autograd keeps ys.float() and the product)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, ys.float() * w.unsqueeze(1)).to(x.dtype)


def combine_loop(T, token, ys, w):
    """Independent fp64 reference: out[t] = sum of w_i ys_i over the slots i of token t."""
    out = torch.zeros(T, ys.shape[1], dtype=torch.float64)
    for i, t in enumerate(token.tolist()):
        out[t] += w[i].double() * ys[i].double()
    return out


def combine_case(dtype, T=7, k=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(T)])  # [T, k]
    order, _ = core.sort_by_expert(topk, 5)
    token = order // k  # [N] as dropless_moe makes it
    ys = torch.randn(T * k, d, generator=g).to(dtype)
    w = torch.rand(T * k, generator=g)  # fp32 gates
    x = torch.empty(T, d, dtype=dtype)
    gy = torch.randn(T, d, generator=g).to(dtype)
    return x, token, ys, w, gy


def value_and_grads(fn, x, token, ys, w, gy):
    ys, w = ys.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, token, ys, w)
    return (out, *torch.autograd.grad(out, (ys, w), gy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_the_plain_expression(dtype):
    """Same values and gradients as the expression it replaced: bitwise (it runs the same ops in the same
    order, in fp32 and in bf16), and the fp32 case against an fp64 loop to fp32 rounding."""
    case = combine_case(dtype)
    got = value_and_grads(core.combine_experts, *case)
    ref = value_and_grads(combine_plain, *case)
    for name, a, b in zip(("out", "d ys", "d w"), got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{dtype} {name}: max diff {(a.float() - b.float()).abs().max()}"
    x, token, ys, w, _ = case
    want = combine_loop(x.shape[0], token, ys, w)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16 output
    torch.testing.assert_close(got[0].double(), want, **tol)


def saved_by_backward(fn, *args) -> list[tuple[torch.dtype, tuple]]:
    """(dtype, shape) of every tensor autograd saves for the backward while ``fn(*args)`` runs."""
    seen = []

    def pack(t):
        seen.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return seen


def test_combine_keeps_no_fp32_copy_of_the_expert_outputs():
    x, token, ys, w, _ = combine_case(torch.bfloat16, T=64, k=2, d=32)
    ys, w = ys.requires_grad_(), w.requires_grad_()
    N, d = ys.shape
    old = saved_by_backward(combine_plain, x, token, ys, w)
    assert (torch.float32, (N, d)) in old  # the detector sees what the plain expression kept
    new = saved_by_backward(core.combine_experts, x, token, ys, w)
    assert (torch.float32, (N, d)) not in new, new
    assert sorted(new, key=str) == sorted([(torch.bfloat16, (N, d)), (torch.float32, (N,)),
                                           (token.dtype, (N,))], key=str), new
