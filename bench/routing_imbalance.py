"""How unevenly the routed token-slots fall on the EP ranks: the default of the memory estimator's
``--imbalance`` (loopmoe/memory.py, IMBALANCE), measured on a tiny LoopMoE trained here on the CPU.

    bash scripts/make_test_data.sh /tmp/routing_data 3000 1024
    python bench/routing_imbalance.py --data /tmp/routing_data/docs_text_document [--steps 400] [--out F.json]

The model has the 3B preset's routing shape (72 experts, top-8, one shared expert, the preset's router
settings: top-k-then-softmax gates, lb 0.01, z 0.001, no aux-free bias) and its loop structure in small
(1 prelude + 2 loop layers x 2 + 1 coda, d 128, expert width 32), trained with AdamW on the demo corpus.
Every ``--every`` steps the held-out windows (``--eval-tokens`` tokens, so that the counting noise of a
group's load is ~1%, near the ~0.4% of the 65,536 tokens an EP-8 rank of the 3B preset receives per
micro-batch) are routed and, for EP 8 (experts [r*9, (r+1)*9) on rank r, as loopmoe/model/moe.py lays
them out), the load of each rank is counted:
  per pass     max over ranks / mean, for each executed MoE pass (6 here): the busiest rank of one layer
  summed       the same on the loads summed over all passes of the micro-batch: the busiest rank's share
               of what the forward KEEPS (kept activations add up over the layers)
  expert       max / mean over the 72 experts (what val/imbalance_l* logs during training), for reference
Prints a table and writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from loopmoe.config import load_config  # noqa: E402
from loopmoe.data.indexed import open_indexed  # noqa: E402
from loopmoe.model import LoopMoEModel  # noqa: E402

MODEL = ["model.linear_backend=torch", "model.vocab_size=1024", "model.d_model=128", "model.n_heads=4",
         "model.n_kv_heads=1", "model.head_dim=32", "model.n_prelude=1", "model.n_loop=2", "model.n_coda=1",
         "model.loop_iters=2", "model.max_seq_len=256", "model.ffn=moe", "model.n_experts=72", "model.top_k=8",
         "model.expert_hidden=32", "model.n_shared_experts=1", "model.adaln=both", "model.adaln_rank=16",
         "data.seq_len=256"]


def windows(tokens: np.ndarray, n: int, seq: int, rng: np.random.Generator) -> torch.Tensor:
    """n random windows of seq + 1 tokens -> [n, seq + 1] int64."""
    starts = rng.integers(0, len(tokens) - seq - 1, size=n)
    return torch.from_numpy(np.stack([tokens[s:s + seq + 1].astype(np.int64) for s in starts]))


def rank_ratios(loads: list[torch.Tensor], ep: int) -> dict[str, float]:
    """loads: [E] token-slots per expert, one per MoE pass -> the three max/mean ratios of the docstring."""
    per_rank = [ld.float().view(ep, -1).sum(1) for ld in loads]  # [ep] per pass
    summed = torch.stack(per_rank).sum(0)
    return {"per_pass_max": max((r.max() / r.mean()).item() for r in per_rank),
            "per_pass_mean": sum((r.max() / r.mean()).item() for r in per_rank) / len(per_rank),
            "summed": (summed.max() / summed.mean()).item(),
            "expert_max": max((ld.float().max() / ld.float().mean()).item() for ld in loads)}


@torch.no_grad()
def measure(model, held_out: torch.Tensor, batch: int, ep: int) -> dict[str, float]:
    model.eval()
    total = None
    for i in range(0, held_out.shape[0], batch):
        out = model(held_out[i:i + batch, :-1], return_routing=True)
        loads = [r.load for r in out.routing]
        total = loads if total is None else [a + b for a, b in zip(total, loads)]
    model.train()
    return rank_ratios(total, ep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="token prefix (.bin/.idx), e.g. from scripts/make_test_data.sh")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    cfg = load_config(None, MODEL)
    m, seq = cfg.model, cfg.data.seq_len
    ds = open_indexed(args.data, m.vocab_size)
    tokens = np.concatenate([np.asarray(ds[i]) for i in range(len(ds))])
    split = int(0.95 * len(tokens))  # the last 5% held out
    rng = np.random.default_rng(args.seed)
    held_out = windows(tokens[split:], args.eval_tokens // seq, seq, rng)
    model = LoopMoEModel(m)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    rows = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            r = {"step": step, **measure(model, held_out, args.micro_batch, args.ep)}
            rows.append(r)
            print(f"step {step:5d}  per-pass max {r['per_pass_max']:.3f}  per-pass mean {r['per_pass_mean']:.3f}  "
                  f"summed {r['summed']:.3f}  expert max {r['expert_max']:.3f}", flush=True)
        if step == args.steps:
            break
        x = windows(tokens[:split], args.micro_batch, seq, rng)
        out = model(x[:, :-1], labels=x[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.every == 0:
            print(f"        train loss {out.lm_loss.item():.3f}", flush=True)
    worst = {k: max(r[k] for r in rows) for k in ("per_pass_max", "per_pass_mean", "summed", "expert_max")}
    print("worst over the run: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "model": MODEL, "rows": rows, "worst": worst}, f, indent=1)


if __name__ == "__main__":
    main()
