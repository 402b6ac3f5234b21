"""Early exit at loop boundaries by an output-entropy threshold, with MEASURED throughput; logit lens.

    python -m loopmoe.analysis.early_exit --checkpoint runs/demo/checkpoints --out runs/demo/early_exit
    python -m loopmoe.analysis.early_exit --checkpoint ... --data data/demo/python_docs_text_document \\
        --tokenizer data/demo/tokenizer.model --thresholds 1,2,3,4 --mode both
    python -m loopmoe.analysis.early_exit --checkpoint runs/vanilla/checkpoints --match-config configs/tiny_loopmoe.yaml

Boundaries (``ExitPlan``):
* looped model (n_loop > 0, R = loop_iters > 1): after every loop iteration k = 1..R. The read-out at
  boundary k is what ``model(exit_after=k)`` computes: coda + final norm + LM head on the state after k
  iterations (spec section 5). Boundary R is the normal output.
* non-looped model (Vanilla MoE, dense): after layer L_k, read out by the final norm + LM head alone
  (there is no coda to run). L_k is the layer count whose executed-FLOP fraction (flops.py convention,
  head included) is closest to the fraction a looped model executes when it exits at its boundary k:
  ``--match-config`` names that looped model (compare.py passes tiny_loopmoe's), else the spec's layout
  is assumed (middle third looped twice: exiting after iteration 1 runs 3/4 of the layers).

Decision: at boundary k < last, a token exits when the entropy (nats) of its read-out distribution is
<= the threshold; its read-out is then its output. Two executions, both real code that skips work:
* ``token`` mode (default), state propagation: an exited token's hidden state is frozen. Later layers
  still need its keys/values (causal attention of the tokens still running reads every earlier
  position), so for exited tokens a later layer computes ONLY its K/V projection (plus the IterAdaLN
  modulation feeding it) from the frozen state; queries, attention output, FFN / MoE and the residual
  update run for the running tokens only, gathered into a compact batch. In the coda, an exited token
  keeps the coda states of its own read-out (as a KV cache would). This changes what running tokens
  attend to (frozen instead of updated states of exited tokens), so the perplexity is that of this
  approximation; with no early exit, or everyone exiting at the first boundary, the outputs equal the
  model's exactly (tested).
* ``sequence`` mode: a whole sequence exits when the MEAN entropy of its tokens is <= the threshold,
  and later iterations run on the remaining sequences only (exact: an exited sequence's outputs are
  ``model(exit_after=k)``'s).
tokens/s = scored tokens / wall time of the exit-enabled forward (read-outs, entropies, gathers and
all) over the held-out batches, min over ``--repeats`` runs per batch, measured interleaved with the
plain forward ``model(tokens)`` (the no-exit baseline) in the same process and threads. Every exit
read-out costs coda + head FLOPs for the tokens still running: at small scale the head is a large
share of the model, so the NET FLOP saving (read-outs and propagated K/V included) is reported beside
the IDEAL one (skipped layers only, the usual paper number). See docs/analysis.md.

Files: exit_plan.py (boundaries and FLOP costs), exit_runner.py (the exit-enabled forward), this file
(sweep, logit lens, report, command line).
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import math
import os
import sys
import time

import torch

from loopmoe.analysis.exit_plan import (Costs, ExitPlan, PlanStep, flops_for_fractions,  # noqa: F401
                                       loop_fractions, make_plan, step_costs)
from loopmoe.analysis.exit_runner import ExitResult, ExitRunner, exit_decision  # noqa: F401
from loopmoe.analysis.logit_lens import LensAccumulator
from loopmoe.analysis.reports import jsonable, threshold_label, write_report  # noqa: F401  (jsonable: its old home)
from loopmoe.model.core import entropy, token_ce

# ---------------------------------------------------------------------------------------------------
# Sweep, logit lens, timing


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def auto_thresholds(runner: ExitRunner, batches, mode: str,
                    quantiles=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)) -> list[float]:
    """Entropy thresholds at quantiles of the first boundary's read-out entropy (per token, or per
    sequence mean in sequence mode), so the sweep spans few to most tokens exiting."""
    vals = []
    for bt in batches:
        lg = runner.run(bt["tokens"], collect=True).readouts[0]
        ent = entropy(lg)  # [b, s]
        vals.append(ent.flatten() if mode == "token" else ent.mean(1))
    v = torch.cat(vals)
    return [round(float(v.quantile(q)), 4) for q in quantiles]


@torch.no_grad()
def logit_lens(runner: ExitRunner, batches, converged_jsd: float = 0.5) -> dict:
    acc = LensAccumulator(runner.plan.names, converged_jsd)
    for bt in batches:
        acc.add(runner.run(bt["tokens"], collect=True).readouts, bt["labels"], bt["loss_mask"])
    return {"boundaries": acc.result(), "converged_jsd": converged_jsd,
            "jsd_values": {n: torch.cat(v).tolist() for n, v in acc.jsd_values.items()}}


@torch.no_grad()
def sweep(runner: ExitRunner, batches, thresholds: list[float | None], mode: str = "token",
          repeats: int = 3) -> dict:
    """Per threshold: exit fractions per boundary, perplexity, ideal/net FLOPs saved, measured tokens/s.
    The plain forward (no exit) is timed interleaved with every threshold's run."""
    model, plan = runner.model, runner.plan
    n_tok = sum(bt["tokens"].numel() for bt in batches)
    rows = []
    base_times = []
    for thr in thresholds:
        counts = torch.zeros(plan.n)
        ce_sum, m_sum, fl, t_exit, t_base = 0.0, 0.0, 0.0, 0.0, 0.0
        for bt in batches:
            tok = bt["tokens"]
            tb, te = [], []
            for _ in range(repeats):
                tb.append(_time(lambda: model(tok)))
                res = None

                def go():
                    nonlocal res
                    res = runner.run(tok, thr, mode)

                te.append(_time(go))
            t_base += min(tb)
            t_exit += min(te)
            mask = bt["loss_mask"].float()
            ce_sum += (token_ce(res.logits, bt["labels"]) * mask).sum().item()
            m_sum += mask.sum().item()
            counts += torch.bincount(res.exit_at.flatten(), minlength=plan.n).float()
            fl += res.flops
        frac = (counts / counts.sum()).tolist()
        base_times.append(t_base)
        rows.append({
            "threshold": thr, "exit_frac": frac,
            "ppl": math.exp(ce_sum / max(m_sum, 1.0)), "loss": ce_sum / max(m_sum, 1.0),
            **{k: v for k, v in flops_for_fractions(plan, runner.costs, frac, mode).items() if k == "ideal_saved"},
            "net_saved": 1.0 - fl / (n_tok * runner.costs.total),
            "tokens_per_s": n_tok / t_exit, "base_tokens_per_s": n_tok / t_base,
            "speedup": t_base / t_exit,
        })
    base_tps = n_tok / sorted(base_times)[len(base_times) // 2]
    return {"mode": mode, "boundaries": plan.names, "exec_fraction": plan.exec_fraction, "rows": rows,
            "base_tokens_per_s": base_tps, "tokens": n_tok, "repeats": repeats}


def project(plan_cfg, seq_len: int, rows: list[dict], mode: str) -> list[dict]:
    """The FLOP savings of the measured exit fractions on another (larger) config's cost shares."""
    plan, costs = make_plan(plan_cfg, seq_len), step_costs(plan_cfg, seq_len)
    out = []
    for r in rows:
        if len(r["exit_frac"]) != plan.n:
            return []
        out.append({"threshold": r["threshold"], **flops_for_fractions(plan, costs, r["exit_frac"], mode)})
    return out


# ---------------------------------------------------------------------------------------------------
# Report


def markdown(result: dict) -> str:
    lines = []
    lens = result.get("logit_lens")
    if lens:
        lines += [f"Logit lens (read-out at each boundary vs the final output; converged = normalised JSD < "
                  f"{lens['converged_jsd']}):", "",
                  "| boundary | FLOP fraction | loss | ppl | mean JSD / ln2 | converged | top-1 = final | entropy |",
                  "|---|---|---|---|---|---|---|---|"]
        for b, f in zip(lens["boundaries"], result["plan"]["exec_fraction"]):
            lines.append(f"| {b['boundary']} | {f:.3f} | {b['loss']:.4f} | {b['ppl']:.2f} | {b['jsd']:.4f} | "
                         f"{100 * b['converged']:.1f}% | {100 * b['top1_agree']:.1f}% | {b['entropy']:.3f} |")
        lines.append("")
    for sw in result["sweeps"]:
        names = sw["boundaries"]
        lines += [f"Entropy-threshold sweep, {sw['mode']} mode ({sw['tokens']:,} held-out tokens; plain forward "
                  f"{sw['base_tokens_per_s']:,.0f} tokens/s; min of {sw['repeats']} runs per batch):", "",
                  "| threshold (nats) | " + " | ".join(f"exit @ {n}" for n in names)
                  + " | ppl | FLOPs saved ideal | FLOPs saved net | tokens/s | vs plain forward |",
                  "|---" * (len(names) + 6) + "|"]
        for r in sw["rows"]:
            lines.append(f"| {threshold_label(r['threshold'])} | " + " | ".join(f"{100 * f:.1f}%" for f in r["exit_frac"])
                         + f" | {r['ppl']:.2f} | {100 * r['ideal_saved']:.1f}% | {100 * r['net_saved']:.1f}% | "
                         f"{r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x |")
        if sw.get("projected"):
            lines += ["", f"Same exit fractions on {sw['projected_name']}'s FLOP shares: "
                      + ", ".join(f"thr {threshold_label(p['threshold'])}: ideal {100 * p['ideal_saved']:.1f}% / net "
                                  f"{100 * p['net_saved']:.1f}%" for p in sw["projected"] if p["threshold"]
                                  not in (None,))]
        lines.append("")
    return "\n".join(lines)


def analyse(model, cfg, batches, thresholds=None, modes=("token",), repeats=3, converged_jsd=0.5,
            match_fractions=None, project_cfg=None, project_name="") -> dict:
    seq_len = batches[0]["tokens"].shape[1]
    runner = ExitRunner(model, seq_len=seq_len, match_fractions=match_fractions)
    plan = runner.plan
    if plan.n < 2:
        raise SystemExit("error: this model has a single boundary (no loop iterations to exit between and one "
                         "layer); nothing to sweep")
    result = {"plan": {"boundaries": plan.names, "exec_fraction": plan.exec_fraction, "looped": plan.looped,
                       "segments": [[f"{s.kind}.{s.index}@{s.iteration}" for s in seg] for seg in plan.segments]},
              "logit_lens": logit_lens(runner, batches, converged_jsd), "sweeps": []}
    for mode in modes:
        thr = list(thresholds) if thresholds else auto_thresholds(runner, batches, mode)
        thr = [None] + sorted(set(thr)) + [math.inf]
        sw = sweep(runner, batches, thr, mode, repeats)
        if project_cfg is not None:
            sw["projected"] = project(project_cfg, seq_len, sw["rows"], mode)
            sw["projected_name"] = project_name
        result["sweeps"].append(sw)
    return result


def main(argv: list[str] | None = None) -> int:
    from loopmoe.analysis.data import add_data_args, batches_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    add_data_args(ap)
    ap.add_argument("--thresholds", help="comma-separated entropy thresholds in nats (default: quantiles of the "
                                         "first boundary's entropy); 'none' and 'inf' are always added")
    ap.add_argument("--mode", default="token", choices=["token", "sequence", "both"],
                    help="token: per-token exit with state propagation; sequence: whole sequences (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per batch, min taken (default: %(default)s)")
    ap.add_argument("--converged-jsd", type=float, default=0.5, help="normalised-JSD threshold of 'converged'")
    ap.add_argument("--match-config", help="non-looped model: a looped config (YAML) whose loop-boundary FLOP "
                                           "fractions pick the exit layers (default: the spec's 3/4)")
    ap.add_argument("--project-config", help="also report the FLOP savings of the measured exit fractions on this "
                                             "config's cost shares (e.g. configs/loopmoe_3b.yaml)")
    ap.add_argument("--out", required=True, help="output directory (early_exit.json/.md, PNGs)")
    ap.add_argument("--name", default="", help="prefix of the output file names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from loopmoe.config import load_config
    from loopmoe.train.checkpoint import load_trained_model

    model, cfg = load_trained_model(args.checkpoint)
    batches = batches_from_args(args, cfg)
    seq_len = batches[0]["tokens"].shape[1]
    match = loop_fractions(load_config(args.match_config).model, seq_len) if args.match_config else None
    proj = load_config(args.project_config).model if args.project_config else None
    thresholds = None
    if args.thresholds:
        thresholds = [float(x) for x in args.thresholds.split(",") if x.strip() not in ("", "none", "inf")]
    modes = ("token", "sequence") if args.mode == "both" else (args.mode,)
    res = analyse(model, cfg, batches, thresholds, modes, args.repeats, args.converged_jsd, match, proj,
                  os.path.basename(args.project_config or ""))
    os.makedirs(args.out, exist_ok=True)
    pre = f"{args.name}_" if args.name else ""
    write(res, args.out, pre, title=args.checkpoint)
    print(markdown(res))
    print(f"wrote {os.path.join(args.out, pre + 'early_exit.md')} and PNGs", file=sys.stderr)
    return 0


def write(res: dict, out: str, prefix: str = "", title: str = "") -> list[str]:
    from loopmoe.analysis import plots

    slim = {k: v for k, v in res.items() if k != "logit_lens"}
    slim["logit_lens"] = {k: v for k, v in res["logit_lens"].items() if k != "jsd_values"}
    write_report(out, prefix + "early_exit", slim, f"Early exit: {title}", markdown(res))
    pngs = [os.path.join(out, prefix + "early_exit.png"), os.path.join(out, prefix + "logit_lens.png")]
    plots.early_exit_figure(res, pngs[0], title)
    plots.logit_lens_figure(res, pngs[1], title)
    return pngs


if __name__ == "__main__":
    sys.exit(main())
