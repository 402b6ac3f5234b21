"""The Sparse-Layers comparison (arXiv 2605.09165) as a suite: Base, MoE, Looped, Looped-MoE at a toy width.

    python -m loopmoe.experiments.compare --suite sparse_layers                  # 300 steps x 4 models x 1 seed
    python -m loopmoe.experiments.compare --suite sparse_layers --steps 600 --seeds 2 --jobs 2

The four models (configs/sparse_layers_base.yaml + the overrides below): 16 dense layers; 16 MoE layers
(top-2 of 8 experts of width F/k, no shared expert); 8 dense layers looped twice over the whole stack (no
prelude / coda, no IterAdaLN, no input re-injection); the same with MoE layers. Base = MoE and Looped =
Looped-MoE in per-token FLOPs; each looped model has half the unique layers.

What the page reports, set beside the paper's two findings and its routing classes:
1. held-out loss of each model, and the looping penalty (Looped - Base vs Looped-MoE - MoE): the paper finds
   that Looped-MoE scales better than Looped (one toy scale can only show the penalty at that scale);
2. exit quality at 0 / 5 / 10 / 20 / 30% FLOPs saved (its Table 7) with per-token entropy exits: looped
   models exit at the loop boundary, the unlooped ones at the layer with the same FLOP fraction;
3. routing divergence classes (identical / partial / disjoint top-2 sets between the two passes) per loop
   layer of Looped-MoE, with chance for top-2 of 8 (3.6% identical, 53.6% disjoint).
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

from loopmoe.experiments.runs import (ROOT, Model, Run, curves, heldout, log, mean_spread, train_all)

MOE = ("model.ffn=moe", "model.n_experts=8", "model.top_k=2", "model.expert_hidden=176", "model.n_shared_experts=0")
LOOP = ("model.n_prelude=0", "model.n_loop=8", "model.n_coda=0", "model.loop_iters=2", "model.adaln=none",
        "model.input_reinjection=false")
BASE = "configs/sparse_layers_base.yaml"
SUITE = [
    Model("sl_base", BASE, (), "Base (16 dense layers)"),
    Model("sl_moe", BASE, MOE, "MoE (16 layers, top-2 of 8)"),
    Model("sl_looped", BASE, LOOP, "Looped (8 dense x 2)"),
    Model("sl_looped_moe", BASE, LOOP + MOE, "Looped-MoE (8 MoE x 2)"),
]
SAVED = (0.0, 0.05, 0.10, 0.20, 0.30)  # FLOPs saved, the columns of the paper's Table 7
DEFAULT_STEPS = 300


def ppl_at_saved(rows: list[dict], saved: float) -> float:
    """Perplexity at ``saved`` net FLOPs saved, linear in loss between the measured thresholds (NaN
    outside the range the sweep covered)."""
    pts = sorted((r["net_saved"], r["loss"]) for r in rows)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= saved <= x1:
            y = y0 if x1 == x0 else y0 + (y1 - y0) * (saved - x0) / (x1 - x0)
            return math.exp(y)
    return float("nan")


def run_suite(args, prefix: str, tok: str, vocab: int, command: str) -> int:
    import torch

    from loopmoe.analysis import early_exit, routing
    from loopmoe.analysis.data import heldout_batches
    from loopmoe.analysis.exit_plan import loop_fractions
    from loopmoe.balance import budget
    from loopmoe.train.checkpoint import load_trained_model

    t0 = time.perf_counter()
    base = os.path.join(args.runs, f"sparse_layers_s{args.steps}")
    runs = [Run(m, s, os.path.join(base, f"{m.name}_seed{s}")) for m in SUITE for s in args.seed_list]
    runs.sort(key=lambda r: r.seed)
    train_all(args, runs, t0, prefix, tok, vocab)
    train_s = time.perf_counter() - t0
    if args.train_only:
        return 0
    torch.set_num_threads(args.threads)
    batches, res = None, {"runs": {}, "exits": {}, "routing": {}, "budgets": {}}
    looped_cfg = None
    for r in runs:
        model, cfg = load_trained_model(r.ckpt)
        bd = budget(cfg.model, cfg.data.seq_len)
        res["budgets"][r.model.name] = {"total_params": bd.total_params, "active_params": bd.active_params,
                                        "flops_per_token": bd.flops_per_token}
        if batches is None:
            batches = heldout_batches(cfg, args.eval_batches, prefix=prefix, tokenizer=tok, split="test",
                                      cache_dir=os.path.join(args.runs, "data_cache"))
        r.heldout = {**heldout(model, batches), "curves": curves(r)}
        if cfg.model.is_looped and looped_cfg is None:
            looped_cfg = cfg.model
        log(f"{r.model.name} seed {r.seed}: held-out loss {r.heldout['loss']:.4f}")
    ana_b = batches[:args.analysis_batches]
    seq_len = ana_b[0]["tokens"].shape[1]
    match_fr = loop_fractions(looped_cfg, seq_len)
    for r in (x for x in runs if x.seed == args.seed_list[0]):
        model, cfg = load_trained_model(r.ckpt)
        ee = early_exit.analyse(model, cfg, ana_b, modes=("token",), repeats=args.repeats,
                                match_fractions=None if cfg.model.is_looped else match_fr)
        rows = ee["sweeps"][0]["rows"]
        res["exits"][r.model.name] = {"boundaries": ee["plan"]["boundaries"], "exec_fraction": ee["plan"]["exec_fraction"],
                                      "rows": rows, "ppl_at_saved": {str(s): ppl_at_saved(rows, s) for s in SAVED}}
        if cfg.model.ffn == "moe" and cfg.model.is_looped:
            res["routing"][r.model.name] = routing.analyse(model, ana_b, forced=False)
        log(f"{r.model.name}: exits and routing done")
    timing = {"total_s": time.perf_counter() - t0, "train_s": train_s, "micro_batch": batches[0]["tokens"].shape[0],
              "seq_len": seq_len}
    os.makedirs(args.out, exist_ok=True)
    md = markdown(args, runs, res, timing, command)
    with open(os.path.join(args.out, "sparse_layers.md"), "w") as f:
        f.write(md)
    from loopmoe.analysis.reports import jsonable

    with open(os.path.join(args.out, "sparse_layers.json"), "w") as f:
        json.dump(jsonable({"command": command, "timing": timing, **res,
                            "heldout": {f"{r.model.name}_seed{r.seed}": {k: v for k, v in r.heldout.items()
                                                                          if k != "curves"} for r in runs}}),
                  f, indent=1)
    log(f"wrote {os.path.join(args.out, 'sparse_layers.md')} ({timing['total_s'] / 60:.1f} min)")
    return 0


def markdown(args, runs: list[Run], res: dict, timing: dict, command: str) -> str:
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.model.name, []).append(r)
    mb, seq = timing["micro_batch"], timing["seq_len"]
    L = ["# The Sparse-Layers comparison at a toy width (Base, MoE, Looped, Looped-MoE)", "",
         "Generated by `python -m loopmoe.experiments.compare --suite sparse_layers` "
         "(loopmoe/experiments/sparse_layers.py); the models: configs/sparse_layers_base.yaml and the overrides "
         "in that module. Paper: arXiv 2605.09165.", "",
         "## What was run", "",
         f"- command: `{command}`",
         f"- {args.steps} steps x {mb} x {seq} = {args.steps * mb * seq:,} tokens per run, seeds "
         f"{args.seed_list}, the same data order for every model; {args.jobs} run(s) at a time, {args.threads} "
         f"thread(s) each, on {platform.machine()} with {os.cpu_count()} cores shared with other jobs; wall "
         f"{timing['total_s'] / 60:.1f} min (training {timing['train_s'] / 60:.1f} min)",
         "- losses: load balance E * sum_i f_i p_i (0.01) and router z-loss (0.001), the paper's forms with our "
         "coefficients (the abstract gives none)", "",
         "## Held-out loss", "",
         "| model | total params | active params | fwd FLOPs / token | held-out loss | per seed |",
         "|---|---|---|---|---|---|"]
    for m in SUITE:
        rs = [r for r in by.get(m.name, []) if r.heldout]
        if not rs:
            continue
        b = res["budgets"][m.name]
        ls = [r.heldout["loss"] for r in rs]
        mu, sp = mean_spread(ls)
        L.append(f"| {m.label} | {b['total_params'] / 1e6:.2f}M | {b['active_params'] / 1e6:.2f}M | "
                 f"{b['flops_per_token'] / 1e6:.2f}M | {mu:.4f}" + (f" ± {sp:.4f}" if len(ls) > 1 else "")
                 + f" | [{', '.join(f'{x:.4f}' for x in ls)}] |")

    def paired(a: str, b: str) -> list[float]:
        ra = {r.seed: r.heldout["loss"] for r in by.get(a, []) if r.heldout}
        rb = {r.seed: r.heldout["loss"] for r in by.get(b, []) if r.heldout}
        return [ra[s] - rb[s] for s in sorted(set(ra) & set(rb))]

    pen_dense, pen_moe = paired("sl_looped", "sl_base"), paired("sl_looped_moe", "sl_moe")
    L += ["", "Looping penalty (looped minus its unlooped twin at the same FLOPs, half the parameters; paired by "
          "seed):", ""]
    for name, d in (("dense: Looped - Base", pen_dense), ("MoE: Looped-MoE - MoE", pen_moe)):
        if d:
            L.append(f"- {name}: {sum(d) / len(d):+.4f} nats (per seed {', '.join(f'{x:+.4f}' for x in d)})")
    if pen_dense and pen_moe:
        diff = [a - b for a, b in zip(pen_moe, pen_dense)]
        same = len(diff) > 1 and (all(x < 0 for x in diff) or all(x > 0 for x in diff))
        L.append(f"- penalty(MoE) - penalty(dense): {sum(diff) / len(diff):+.4f} nats "
                 + ("(consistent over the seeds)" if same else "(one seed: not resolved)" if len(diff) == 1
                    else "(NOT consistent over the seeds)")
                 + ". The paper's finding is about scaling (the gap across model sizes); one toy size can only "
                 "say whether looping costs an MoE less than a dense model here.")
    L += ["", "## Exits at loop boundaries (the paper's Table 7 axis)", "",
          f"Per-token entropy exits, seed {args.seed_list[0]}, held-out perplexity at the net FLOPs saved (read-out "
          "costs included; interpolated between measured thresholds, 'n/a' outside the range the sweep reached). "
          "Looped models exit after pass 1; the unlooped ones after the layer with the same FLOP fraction.", "",
          "| model | exit point (FLOP fraction) | " + " | ".join(f"{100 * s:.0f}% saved" for s in SAVED) + " |",
          "|---|---|" + "---|" * len(SAVED)]
    for m in SUITE:
        e = res["exits"].get(m.name)
        if not e:
            continue
        cells = [f"{v:.1f}" if math.isfinite(v) else "n/a" for v in (e["ppl_at_saved"][str(s)] for s in SAVED)]
        L.append(f"| {m.label} | {e['boundaries'][0]} ({100 * e['exec_fraction'][0]:.0f}%) | " + " | ".join(cells) + " |")
    rt = res["routing"]
    if rt:
        L += ["", "## Routing divergence between the two passes (Looped-MoE)", "",
              "Per loop layer, the share of tokens whose top-2 expert sets in pass 1 and pass 2 are identical, "
              "partial (one shared) or disjoint; chance for top-2 of 8: 3.6% / 42.9% / 53.6%. The paper reports "
              "25-53% disjoint for its loop layers.", "",
              "| model | loop layer | identical | partial | disjoint | divergence (0 same, 1 random) |",
              "|---|---|---|---|---|---|"]
        for name, rep in rt.items():
            for lay in rep["layers"]:
                p = lay["pairs"][0]
                L.append(f"| `{name}` | {lay['layer']} | {100 * p['identical']:.1f}% | {100 * p['partial']:.1f}% | "
                         f"{100 * p['disjoint']:.1f}% | {p['divergence']:.3f} |")
    L += ["", "## Caveats", "",
          "- Toy models (d=128, 16 executed layers, vocabulary 4096) trained for minutes on one CPU thread each: "
          "tendencies, not evidence about the paper's scales.", ""]
    return "\n".join(L)
