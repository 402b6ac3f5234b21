"""The controlled toy comparison: LoopMoE vs its Vanilla MoE twin vs dense looped vs dense, same tokens and seeds.

    python -m loopmoe.experiments.compare                       # full size: 800 steps x 7 models x 2 seeds (~1 h CPU)
    python -m loopmoe.experiments.compare --steps 200           # shorter
    python -m loopmoe.experiments.compare --quick               # smoke run: 2 steps, LoopMoE + Vanilla, 1 seed
    python -m loopmoe.experiments.compare --models loopmoe,vanilla --seeds 3 --out /tmp/res
    python -m loopmoe.experiments.compare --suite sparse_layers  # Base / MoE / Looped / Looped-MoE (sparse_layers.py)

The run behind docs/results/toy_comparison.md (10x the tokens of the first page, 3 seeds, about 2 h on 2 cores):
    python -m loopmoe.experiments.compare --steps 1000 --set train.micro_batch=16 --jobs 2 --seeds 3 \
        --ablation-seeds 1 --models loopmoe,vanilla,adaln_none,adaln_small,adaln_zero_gate,adaln_rank4,adaln_lr03 \
        --analysis-batches 6 --repeats 2

What it does, in order (every step is skipped when its output exists, so a rerun only redoes what is missing):
1. demo data: data/demo/tokenizer.model and data/demo/python_docs_text_document.{bin,idx} from the demo corpus
   (data_tools, as scripts/demo.sh does), unless --data/--tokenizer are given;
2. the measured matching table of the pairs (loopmoe.balance.compare: counted parameters, active parameters,
   FLOPs per token, attention:FFN ratio);
3. training, one subprocess per (model, seed): ``pretrain_loopmoe.py --config configs/tiny_*.yaml`` with the same
   steps, micro-batch, sequence length (so the same tokens), data order (data.seed fixed) and train.seed = seed,
   single-threaded (--threads) so runs on a shared CPU do not fight over cores; runs go to
   ``<runs>/s<steps>/<model>_seed<seed>``;
4. held-out loss of every final checkpoint on the same ``--eval-batches`` batches of the test split (never seen in
   training), and each looped model's loss at its early exit;
5. routing divergence (+ forced-routing causal test) of every looped MoE run, early exit + logit lens of the first
   seed of LoopMoE, Vanilla, dense looped and dense (non-looped models exit at the layer matching LoopMoE's
   loop-boundary FLOP fraction);
6. ``<out>/toy_comparison.md`` (+ .json) and PNGs: loss curves, routing histograms, early-exit curves.

Models: loopmoe (configs/tiny_loopmoe.yaml), vanilla (tiny_vanilla.yaml, its balance-solver twin),
dense_loop (tiny_dense_loop.yaml), dense (tiny_dense.yaml), and the IterAdaLN ablations of the LoopMoE
adaln_none / adaln_iter / adaln_token (model.adaln=...). ``--max-minutes`` skips the ablations when the
time spent plus their projected time would exceed it.

Files: runs.py (models, data, training, held-out evaluation), report.py (the Markdown report), this
file (the command line and the order of the stages).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time

from loopmoe.experiments.report import report
from loopmoe.experiments.sparse_layers import DEFAULT_STEPS as SL_STEPS
from loopmoe.experiments.runs import (BY_NAME, FULL_STEPS, MODELS, ROOT, Run, complete, curves,  # noqa: F401
                                      ensure_demo_data, heldout, load_model_config, log, matching, tokenizer_vocab,
                                      train, train_all)

# ---------------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("main", "sparse_layers"), default="main",
                    help="main: LoopMoE vs its twins and the IterAdaLN ablations (docs/results/toy_comparison.md); "
                         "sparse_layers: Base / MoE / Looped / Looped-MoE as in arXiv 2605.09165 "
                         "(docs/results/sparse_layers.md; loopmoe/experiments/sparse_layers.py)")
    ap.add_argument("--steps", type=int, help=f"training steps per run (default: {FULL_STEPS}; --quick: 2)")
    ap.add_argument("--seeds", type=int, help="seeds per model, train.seed = 1..N (default: 2; --quick: 1)")
    ap.add_argument("--ablation-seeds", type=int, help="seeds per ablation model (default: as --seeds)")
    ap.add_argument("--models", help="comma-separated subset of: " + ", ".join(m.name for m in MODELS)
                    + " (default: all; --quick: loopmoe,vanilla)")
    ap.add_argument("--no-ablations", action="store_true", help="skip the IterAdaLN ablations")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="skip ablation runs that would end past this many minutes (0 = no limit)")
    ap.add_argument("--out", help="report directory (default: docs/results; --quick: <runs>/quick_results)")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "compare"), help="run directories (default: %(default)s)")
    ap.add_argument("--data", help="a .bin/.idx prefix (default: the demo data, made if missing)")
    ap.add_argument("--tokenizer", help="sentencepiece .model of --data")
    ap.add_argument("--set", action="append", default=[], metavar="section.key=value",
                    help="an override for every model (repeatable)")
    ap.add_argument("--eval-batches", type=int, help="held-out batches for the loss table (default: 16; --quick: 2)")
    ap.add_argument("--analysis-batches", type=int, help="held-out batches for routing / early exit (default: 8; "
                                                          "--quick: 1)")
    ap.add_argument("--repeats", type=int, help="early-exit timing repeats (default: 3; --quick: 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training runs at a time, each with --threads threads (default: %(default)s; use the "
                         "core count divided by --threads)")
    ap.add_argument("--train-only", action="store_true",
                    help="stop after training (a later run without it reuses the finished runs and reports)")
    ap.add_argument("--fresh", action="store_true", help="retrain runs that are already complete")
    ap.add_argument("--quick", action="store_true", help="smoke run (see the defaults above)")
    args = ap.parse_args(argv)
    q, suite = args.quick, args.suite == "sparse_layers"
    args.steps = args.steps or (2 if q else SL_STEPS if suite else FULL_STEPS)
    args.seed_list = list(range(1, (args.seeds or (1 if q or suite else 2)) + 1))
    args.eval_batches = args.eval_batches or (2 if q else 16)
    args.analysis_batches = min(args.analysis_batches or (1 if q else 8), args.eval_batches)
    args.repeats = args.repeats or (1 if q else 3)
    if suite:
        args.model_list = []
        args.out = args.out or (os.path.join(args.runs, "quick_results") if q else os.path.join(ROOT, "docs", "results"))
        return args
    names = args.models.split(",") if args.models else (["loopmoe", "vanilla"] if q else [m.name for m in MODELS])
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {[m.name for m in MODELS]}")
    args.model_list = [BY_NAME[n] for n in names if not (args.no_ablations and BY_NAME[n].ablation)]
    args.out = args.out or (os.path.join(args.runs, "quick_results") if q else os.path.join(ROOT, "docs", "results"))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = "python -m loopmoe.experiments.compare" + ("" if not argv else " " + shlex.join(argv))
    t_start = time.perf_counter()
    prefix, tok = (args.data, args.tokenizer) if args.data else ensure_demo_data()
    if not tok:
        raise SystemExit("error: --data needs --tokenizer (the sentencepiece model that made it)")
    prefix, tok = os.path.abspath(prefix), os.path.abspath(tok)
    vocab = tokenizer_vocab(tok)
    if args.suite == "sparse_layers":
        from loopmoe.experiments.sparse_layers import run_suite

        return run_suite(args, prefix, tok, vocab, command)
    extra = [f"model.vocab_size={vocab}", *args.set]
    match = matching(extra)
    base = os.path.join(args.runs, f"s{args.steps}")
    n_abl = args.ablation_seeds or len(args.seed_list)
    runs = [Run(m, s, os.path.join(base, f"{m.name}_seed{s}")) for m in args.model_list
            for s in (args.seed_list[:n_abl] if m.ablation else args.seed_list)]
    runs.sort(key=lambda r: (r.model.ablation, r.seed, args.model_list.index(r.model)))  # main models first
    t_train = time.perf_counter()
    train_all(args, runs, t_start, prefix, tok, vocab)
    train_s = time.perf_counter() - t_train
    if args.train_only:
        log(f"--train-only: {len(runs)} run(s) trained or found in {base} ({train_s / 60:.1f} min)")
        return 0

    # 4-5. evaluation and analysis, in this process, single-threaded
    import torch

    torch.set_num_threads(args.threads)
    from loopmoe.analysis import early_exit, routing
    from loopmoe.analysis.data import heldout_batches
    from loopmoe.analysis.plots import loss_curves
    from loopmoe.analysis.reports import jsonable
    from loopmoe.train.checkpoint import load_trained_model

    t_an = time.perf_counter()
    done = [r for r in runs if not r.skipped]
    batches = None
    for r in done:
        model, cfg = load_trained_model(r.ckpt)
        if batches is None:
            batches = heldout_batches(cfg, args.eval_batches, prefix=prefix, tokenizer=tok, split="test",
                                      cache_dir=os.path.join(args.runs, "data_cache"))
        r.heldout = {**heldout(model, batches), "curves": curves(r)}
        log(f"{r.model.name} seed {r.seed}: held-out loss {r.heldout['loss']:.4f}")
    ana_b = batches[:args.analysis_batches]
    os.makedirs(args.out, exist_ok=True)
    an_dir = os.path.join(base, "analysis")
    analyses: dict = {"routing": {}, "early_exit": {}, "adaln": {}}
    from loopmoe.analysis.adaln_stats import adaln_stats

    for r in done:
        model, cfg = load_trained_model(r.ckpt)
        if cfg.model.adaln != "none" and cfg.model.is_looped and r.seed == args.seed_list[0]:
            analyses["adaln"][r.model.name] = adaln_stats(model, ana_b)
        if cfg.model.ffn == "moe" and cfg.model.is_looped:
            rep = routing.analyse(model, ana_b)
            analyses["routing"][(r.model.name, r.seed)] = rep
            if r.model.name == "loopmoe" and r.seed == args.seed_list[0]:
                for p in routing.write(rep, an_dir, "loopmoe_", "LoopMoE"):
                    shutil.copy(p, args.out)
            log(f"{r.model.name} seed {r.seed}: routing divergence "
                + ", ".join(f"L{l['layer']} {l['pairs'][0]['divergence']:.3f}" for l in rep["layers"]))
    loop_cfg = load_model_config(BY_NAME["loopmoe"], extra).model
    seq_len = ana_b[0]["tokens"].shape[1]
    match_fr = early_exit.loop_fractions(loop_cfg, seq_len)
    from loopmoe.config import load_config

    proj = load_config(os.path.join(ROOT, "configs", "loopmoe_3b.yaml")).model
    for name in ("loopmoe", "vanilla", "dense_loop", "dense"):
        r = next((x for x in done if x.model.name == name and x.seed == args.seed_list[0]), None)
        if r is None:
            continue
        model, cfg = load_trained_model(r.ckpt)
        modes = ("token", "sequence") if name == "loopmoe" else ("token",)
        res = early_exit.analyse(model, cfg, ana_b, modes=modes, repeats=args.repeats,
                                 match_fractions=None if cfg.model.is_looped else match_fr,
                                 project_cfg=proj if name == "loopmoe" else None, project_name="loopmoe_3b")
        analyses["early_exit"][name] = res
        for p in early_exit.write(res, an_dir, f"{name}_", name):
            shutil.copy(p, args.out)
        log(f"{name}: early exit done")
    curve_data = {}
    for m in args.model_list:
        rs = [r for r in done if r.model is m and r.heldout]
        if not rs:
            continue
        c = {}
        for key in ("train", "val"):
            steps = sorted(set.intersection(*[set(r.heldout["curves"][key]) for r in rs]))
            c[key] = [(s, [r.heldout["curves"][key][s] for r in rs]) for s in steps]
        curve_data[m.label] = c
    loss_curves(curve_data, os.path.join(args.out, "loss_curves.png"),
                f"{args.steps} steps, seeds {args.seed_list}")
    t_end = time.perf_counter()
    timing = {"total_s": t_end - t_start, "train_s": train_s, "analysis_s": t_end - t_an,
              "micro_batch": batches[0]["tokens"].shape[0], "seq_len": seq_len,
              "eval_tokens": sum(b["tokens"].numel() for b in batches), "prefix": prefix, "tokenizer": tok}
    md = report(args, runs, match, analyses, timing, command)
    with open(os.path.join(args.out, "toy_comparison.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "toy_comparison.json"), "w") as f:
        json.dump(jsonable({"command": command, "timing": timing, "matching": match,
                             "runs": [{"model": r.model.name, "seed": r.seed, "wall_s": r.wall_s, "skipped": r.skipped,
                                       "heldout": {k: v for k, v in r.heldout.items() if k != "curves"}}
                                      for r in runs],
                             "routing": {f"{k[0]}_seed{k[1]}": v for k, v in analyses["routing"].items()},
                             "adaln_stats": analyses["adaln"],
                             "early_exit": {k: {kk: vv for kk, vv in v.items() if kk != "logit_lens"}
                                            | {"logit_lens": v["logit_lens"]["boundaries"]}
                                            for k, v in analyses["early_exit"].items()}}), f, indent=1)
    log(f"wrote {os.path.join(args.out, 'toy_comparison.md')} ({(t_end - t_start) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
