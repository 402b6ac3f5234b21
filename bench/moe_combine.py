"""The MoE combine at the presets' real shapes: ``core.combine_experts`` (a custom autograd function that keeps
the expert outputs, fp32 gates and indices for the backward) against the plain expression it replaced
(``index_add_`` of ``ys.float() * w``, which keeps two fp32 [k*T, d] tensors), side by side in one process,
interleaved, forward + backward; plus the bytes each keeps for the backward.

    python bench/moe_combine.py [--tokens 4096] [--repeats 5] [--out docs/benchmarks/moe_combine.md]

Shapes: d_model and top-k of configs/loopmoe_3b.yaml and loopmoe_9b.yaml, T tokens (one micro-batch of
the presets: 1 x 4096), routing uniform at random over the preset's experts.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loopmoe.config import load_config  # noqa: E402
from loopmoe.model import core  # noqa: E402


def plain(x, token, ys, w):  # the expression of e5945ec
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, ys.float() * w.unsqueeze(1)).to(x.dtype)


def case(preset: str, T: int, dtype):
    m = load_config(os.path.join(ROOT, "configs", f"{preset}.yaml"), []).model
    g = torch.Generator().manual_seed(0)
    topk = torch.stack([torch.randperm(m.n_experts, generator=g)[: m.top_k] for _ in range(T)])  # [T, k]
    order, _ = core.sort_by_expert(topk, m.n_experts)
    token = order // m.top_k  # [N]
    N = token.numel()
    x = torch.zeros(T, m.d_model, dtype=dtype)
    ys = torch.randn(N, m.d_model, generator=g).to(dtype)
    w = torch.rand(N, generator=g)
    return m, x, token, ys, w


def saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def timed(fn, x, token, ys, w) -> float:
    ys, w = ys.detach().requires_grad_(), w.detach().requires_grad_()
    t0 = time.perf_counter()
    out = fn(x, token, ys, w)
    out.float().sum().backward()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks", "moe_combine.md"))
    args = ap.parse_args()
    rows = []
    for preset in ("loopmoe_3b", "loopmoe_9b"):
        for dtype in (torch.bfloat16, torch.float32):
            m, x, token, ys, w = case(preset, args.tokens, dtype)
            req = (ys.detach().requires_grad_(), w.detach().requires_grad_())
            b_old = saved_bytes(plain, x, token, *req)
            b_new = saved_bytes(core.combine_experts, x, token, *req)
            t_old, t_new = [], []
            timed(plain, x, token, ys, w), timed(core.combine_experts, x, token, ys, w)  # warm-up
            for _ in range(args.repeats):  # interleaved: a load change hits both
                t_old.append(timed(plain, x, token, ys, w))
                t_new.append(timed(core.combine_experts, x, token, ys, w))
            rows.append((preset, str(dtype).replace("torch.", ""), token.numel(), m.d_model, b_old, b_new,
                         statistics.median(t_old), statistics.median(t_new), min(t_new) / max(t_old),
                         max(t_new) / min(t_old)))
    load = os.getloadavg()
    lines = ["# MoE combine at the presets' shapes: custom autograd function vs the plain expression", "",
             f"`python bench/moe_combine.py --tokens {args.tokens} --repeats {args.repeats}`; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, CPU; load average after {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}. "
             "Forward + backward of the combine alone, medians of interleaved repeats; N = k x T token-slots.", "",
             "| preset | dtype | N x d | kept for backward, plain (MB) | kept, new (MB) | time plain (ms) | time new (ms) "
             "| new / plain (range) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for p, dt, N, d, bo, bn, to, tn, lo, hi in rows:
        lines.append(f"| {p} | {dt} | {N} x {d} | {bo / 1e6:.1f} | {bn / 1e6:.1f} | {1e3 * to:.1f} | {1e3 * tn:.1f} "
                     f"| {tn / to:.2f}x ({lo:.2f}-{hi:.2f}) |")
    lines += ["", "Per MoE pass; the 3B preset runs 32 of them per micro-batch (memory: docs/memory.md).", ""]
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(args.out + ".tmp", args.out)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
