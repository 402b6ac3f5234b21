"""Routing divergence between loop iterations, and the causal test by forced routing (spec section 5).

    python -m loopmoe.analysis.routing --checkpoint runs/demo/checkpoints --out runs/demo/routing
    python -m loopmoe.analysis.routing --checkpoint ... --data data/demo/python_docs_text_document \\
        --tokenizer data/demo/tokenizer.model --batches 16 --out DIR

For every loop layer and every pair of iterations (i, j) (1 vs 2; all pairs when R > 2), over the
held-out tokens: the histogram of the overlap o = |S_i n S_j| of the routed top-k sets against the exact
chance distribution (hypergeometric, mean k^2/E), the identical / partial / disjoint fractions, mean
Jaccard, the normalised divergence (k - E[o]) / (k - k^2/E) and the same normalised against the
load-aware chance (a random token pairing, ``routing_metrics.permutation_overlap``); distinct experts
per token over all R iterations against chance; load imbalance per pass.

Causal test: the held-out loss when the later iterations are FORCED to reuse iteration 1's routing of
the same token (``model(force_routing={(layer, it): topk})``; the gates still come from the current
router logits at the forced experts), for all loop layers together and one layer at a time; controls:
iteration 1's routing of a random other token (same loads, wrong token) and uniformly random experts.
Writes routing.json, routing.md, routing.png (histograms) and routing_forced.png to --out.
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import os
import sys
from collections import defaultdict

import torch

from loopmoe.model import routing_metrics as rm


@torch.no_grad()
def collect(model, batches) -> tuple[dict, list[dict]]:
    """Run the held-out batches once. Returns ({layer: {iteration: topk [T_all, k]}}, per-batch records
    {"loss": lm loss, "mask": tokens, "topk": {(layer, it): [T, k]}}) for the loop layers."""
    cfg = model.cfg
    loop_layers = set(range(cfg.n_prelude, cfg.n_prelude + cfg.n_loop))
    sets: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    loads: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    per_batch = []
    for bt in batches:
        out = model(bt["tokens"], labels=bt["labels"], loss_mask=bt["loss_mask"], return_routing=True)
        rec = {}
        for r in out.routing:
            if r.layer in loop_layers:
                sets[r.layer][r.iteration].append(r.topk)
                loads[r.layer][r.iteration] = loads[r.layer].get(r.iteration, 0) + r.load.float()
                rec[(r.layer, r.iteration)] = r.topk
        per_batch.append({"loss": out.lm_loss.item(), "weight": bt["loss_mask"].sum().item(), "topk": rec})
    cat = {l: {it: torch.cat(v) for it, v in its.items()} for l, its in sets.items()}
    return {"sets": cat, "loads": loads}, per_batch


def layer_report(sets: dict[int, torch.Tensor], loads: dict[int, torch.Tensor], n_experts: int,
                 n_perm: int = 4) -> dict:
    its = sorted(sets)
    k = sets[its[0]].shape[1]
    prs = []
    for i, j in rm.pairs(len(its)):
        st = rm.divergence_stats(sets[i], sets[j], n_experts)
        perm = rm.permutation_overlap(sets[i], sets[j], n_perm)
        st.update(i=i, j=j, perm_overlap=perm, divergence_perm=rm.normalised_divergence(st["mean_overlap"], k,
                                                                                         n_experts, perm))
        prs.append(st)
    u = rm.unique_counts([sets[i] for i in its])
    top = min(n_experts, len(its) * k)
    hist = (torch.bincount(u, minlength=top + 1).float() / u.numel()).tolist()
    return {
        "pairs": prs,
        "unique": {"mean": u.float().mean().item(), "hist": hist,
                   "chance_mean": rm.chance_unique_experts(k, n_experts, len(its)),
                   "chance_hist": rm.chance_unique_pmf(k, n_experts, len(its))},
        "imbalance": [rm.load_imbalance(loads[i]) for i in its],
    }


@torch.no_grad()
def forced_test(model, batches, per_batch: list[dict], seed: int = 0) -> dict:
    """Held-out loss with later iterations forced to iteration 1's routing (and controls)."""
    cfg = model.cfg
    R, E, k = cfg.loop_iters, cfg.n_experts, cfg.top_k
    loop_layers = list(range(cfg.n_prelude, cfg.n_prelude + cfg.n_loop))
    g = torch.Generator().manual_seed(seed)

    def weighted(losses):
        w = [b["weight"] for b in per_batch]
        return sum(l * x for l, x in zip(losses, w)) / max(sum(w), 1.0)

    base = weighted([b["loss"] for b in per_batch])
    variants: list[tuple[str, callable]] = [
        ("reuse iter 1: all loop layers", lambda rec, T: {(l, it): rec[(l, 0)] for l in loop_layers
                                                           for it in range(1, R)}),
    ]
    if len(loop_layers) > 1:
        for l0 in loop_layers:
            variants.append((f"reuse iter 1: layer {l0} only",
                             lambda rec, T, l0=l0: {(l0, it): rec[(l0, 0)] for it in range(1, R)}))
    variants += [
        ("control: iter 1 of another token", lambda rec, T: {
            (l, it): rec[(l, 0)][torch.randperm(T, generator=g)] for l in loop_layers for it in range(1, R)}),
        ("control: random experts", lambda rec, T: {
            (l, it): torch.rand(T, E, generator=g).topk(k, dim=1).indices for l in loop_layers for it in range(1, R)}),
    ]
    rows = []
    for name, make in variants:
        losses = []
        for bt, rec in zip(batches, per_batch):
            T = bt["tokens"].numel()
            out = model(bt["tokens"], labels=bt["labels"], loss_mask=bt["loss_mask"],
                        force_routing=make(rec["topk"], T))
            losses.append(out.lm_loss.item())
        loss = weighted(losses)
        rows.append({"name": name, "loss": loss, "delta": loss - base})
    return {"base_loss": base, "rows": rows}


def analyse(model, batches, forced: bool = True, n_perm: int = 4) -> dict:
    cfg = model.cfg
    if not (cfg.ffn == "moe" and cfg.n_loop > 0 and cfg.loop_iters > 1):
        raise SystemExit("error: routing divergence needs a looped MoE model (ffn=moe, n_loop > 0, loop_iters > 1); "
                         f"this checkpoint has ffn={cfg.ffn}, n_loop={cfg.n_loop}, loop_iters={cfg.loop_iters}")
    data, per_batch = collect(model, batches)
    report = {"n_experts": cfg.n_experts, "top_k": cfg.top_k, "iterations": cfg.loop_iters,
              "tokens": sum(bt["tokens"].numel() for bt in batches), "layers": []}
    for layer in sorted(data["sets"]):
        lr = layer_report(data["sets"][layer], data["loads"][layer], cfg.n_experts, n_perm)
        report["layers"].append({"layer": layer, **lr})
    if forced:
        report["forced"] = forced_test(model, batches, per_batch)
    return report


def markdown(report: dict) -> str:
    k, E = report["top_k"], report["n_experts"]
    lines = [f"Top-{k} of {E} routed experts, {report['iterations']} iterations, {report['tokens']:,} held-out "
             f"tokens. Chance (independent uniform routing): mean overlap k²/E = {k * k / E:.3f}; "
             f"'perm' = load-aware chance (a random token pairing).", "",
             "| loop layer | iterations | mean overlap | chance k²/E | chance perm | identical | partial | disjoint "
             "| Jaccard | divergence | divergence vs perm |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for lay in report["layers"]:
        for p in lay["pairs"]:
            lines.append(f"| {lay['layer']} | {p['i'] + 1} vs {p['j'] + 1} | {p['mean_overlap']:.3f} | "
                         f"{p['chance_overlap']:.3f} | {p['perm_overlap']:.3f} | {100 * p['identical']:.1f}% | "
                         f"{100 * p['partial']:.1f}% | {100 * p['disjoint']:.1f}% | {p['jaccard']:.3f} | "
                         f"{p['divergence']:.3f} | {p['divergence_perm']:.3f} |")
    lines += ["", "| loop layer | overlap histogram o = 0..k (observed) | chance (hypergeometric) | distinct experts "
                  "/ token (chance) | load imbalance max/mean per iteration |", "|---|---|---|---|---|"]
    for lay in report["layers"]:
        p = lay["pairs"][0]
        obs = " / ".join(f"{100 * p[f'overlap_{x}']:.1f}%" for x in range(k + 1))
        ch = " / ".join(f"{100 * p[f'chance_{x}']:.1f}%" for x in range(k + 1))
        u = lay["unique"]
        imb = ", ".join(f"{v:.2f}" for v in lay["imbalance"])
        lines.append(f"| {lay['layer']} | {obs} | {ch} | {u['mean']:.3f} ({u['chance_mean']:.3f}) | {imb} |")
    f = report.get("forced")
    if f:
        lines += ["", f"Causal test: held-out loss {f['base_loss']:.4f} with the model's own routing; forcing the "
                      "later iterations' routing:", "", "| forced routing | loss | change |", "|---|---|---|"]
        for r in f["rows"]:
            lines.append(f"| {r['name']} | {r['loss']:.4f} | {r['delta']:+.4f} |")
    return "\n".join(lines)


def write(report: dict, out: str, prefix: str = "", title: str = "") -> list[str]:
    from loopmoe.analysis import plots
    from loopmoe.analysis.reports import write_report

    write_report(out, prefix + "routing", report, f"Routing divergence: {title}", markdown(report))
    pngs = [os.path.join(out, prefix + "routing.png"), os.path.join(out, prefix + "routing_forced.png")]
    plots.routing_figure(report, pngs[0], title)
    plots.forced_figure(report, pngs[1])
    return pngs


def main(argv: list[str] | None = None) -> int:
    from loopmoe.analysis.data import add_data_args, batches_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    add_data_args(ap)
    ap.add_argument("--no-forced", action="store_true", help="skip the forced-routing causal test")
    ap.add_argument("--out", required=True, help="output directory (routing.json/.md, PNGs)")
    ap.add_argument("--name", default="", help="prefix of the output file names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from loopmoe.train.checkpoint import load_trained_model

    model, cfg = load_trained_model(args.checkpoint)
    rep = analyse(model, batches_from_args(args, cfg), forced=not args.no_forced)
    write(rep, args.out, f"{args.name}_" if args.name else "", title=args.checkpoint)
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
