"""PNG figures of the analysis commands (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from loopmoe.analysis.reports import threshold_label  # noqa: E402


def _save(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing_figure(report: dict, path: str, title: str = "") -> None:
    """Row 1: per loop layer, the overlap histogram of iterations (i, j) against the hypergeometric
    chance pmf. Row 2: distinct experts per token over all iterations against chance."""
    layers = report["layers"]
    n = len(layers)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False)
    k = report["top_k"]
    for c, lay in enumerate(layers):
        ax = axes[0][c]
        pairs = lay["pairs"]
        width = 0.8 / (len(pairs) + 1)
        xs = list(range(k + 1))
        for i, p in enumerate(pairs):
            ax.bar([x + i * width for x in xs], [p[f"overlap_{x}"] for x in xs], width,
                   label=f"iter {p['i'] + 1} vs {p['j'] + 1} (div {p['divergence']:.2f})")
        ax.bar([x + len(pairs) * width for x in xs], [pairs[0][f"chance_{x}"] for x in xs], width,
               color="lightgray", edgecolor="k", label=f"chance (hypergeom.), mean k²/E={k * k / report['n_experts']:.2f}")
        ax.set_xticks([x + len(pairs) * width / 2 for x in xs], [str(x) for x in xs])
        ax.set_xlabel(f"overlap |S_i ∩ S_j| of top-{k} sets")
        ax.set_ylabel("fraction of tokens")
        ax.set_title(f"loop layer {lay['layer']}")
        ax.legend(fontsize=7)
        ax = axes[1][c]
        u = lay["unique"]
        xs = list(range(len(u["hist"])))
        ax.bar([x - 0.2 for x in xs], u["hist"], 0.4, label=f"observed (mean {u['mean']:.2f})")
        ax.bar([x + 0.2 for x in xs], u["chance_hist"], 0.4, color="lightgray", edgecolor="k",
               label=f"chance (mean {u['chance_mean']:.2f})")
        ax.set_xlabel(f"distinct experts per token over {report['iterations']} iterations")
        ax.set_ylabel("fraction of tokens")
        ax.set_xlim(k - 0.7, len(xs) - 0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "routing divergence between loop iterations", fontsize=10)
    _save(fig, path)


def forced_figure(report: dict, path: str, title: str = "") -> None:
    f = report.get("forced")
    if not f:
        return
    names = [r["name"] for r in f["rows"]]
    vals = [r["delta"] for r in f["rows"]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.6))
    ax.bar(range(len(names)), vals, color=["C0" if "reuse" in n else "C7" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("held-out loss change (nats)")
    ax.set_title(title or f"forced routing (base loss {f['base_loss']:.4f})", fontsize=9)
    _save(fig, path)


def early_exit_figure(res: dict, path: str, title: str = "") -> None:
    sweeps = res["sweeps"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for sw in sweeps:
        rows = sw["rows"]
        m = sw["mode"]
        axes[0].plot([100 * r["ideal_saved"] for r in rows], [r["ppl"] for r in rows], "o-", label=f"{m}: ideal")
        axes[0].plot([100 * r["net_saved"] for r in rows], [r["ppl"] for r in rows], "s--", label=f"{m}: net")
        axes[1].plot([100 * r["ideal_saved"] for r in rows], [r["speedup"] for r in rows], "o-",
                     label=f"{m}: exit-enabled / plain forward")
        for r in rows:
            axes[1].annotate(threshold_label(r["threshold"], ".2g"), (100 * r["ideal_saved"], r["speedup"]), fontsize=6,
                             textcoords="offset points", xytext=(2, 3))
        early = [100 * (1 - r["exit_frac"][-1]) for r in rows]
        axes[2].plot(early, [r["loss"] for r in rows], "o-", label=f"{m}: entropy threshold")
        if len(sw["boundaries"]) == 2:  # exiting a RANDOM share f: loss = (1-f) L(none) + f L(inf), exact in expectation
            lo, hi = rows[0]["loss"], rows[-1]["loss"]
            axes[2].plot([0, 100], [lo, hi], ":", color=axes[2].lines[-1].get_color(), label=f"{m}: random tokens")
    axes[0].set_xlabel("FLOPs saved (%)")
    axes[0].set_ylabel("held-out perplexity")
    axes[0].set_title("quality vs compute")
    axes[1].axhline(1.0, color="k", ls=":", lw=1)
    axes[1].set_xlabel("FLOPs saved, ideal (%)  [labels: entropy threshold, nats]")
    axes[1].set_ylabel("measured tokens/s ratio (1 = no-exit forward)")
    axes[1].set_title("measured scoring throughput vs plain forward")
    axes[2].set_xlabel("tokens exiting before the last boundary (%)")
    axes[2].set_ylabel("held-out loss (nats)")
    axes[2].set_title("entropy vs random choice of exits (below dotted = better)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def logit_lens_figure(res: dict, path: str, title: str = "") -> None:
    lens = res["logit_lens"]
    b = lens["boundaries"]
    names = [x["boundary"] for x in b]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ax = axes[0]
    vals = lens.get("jsd_values") or {}
    data = [vals.get(n, [0.0]) or [0.0] for n in names[:-1]]
    top = max([max(d) for d in data] + [1e-3]) if data else 1.0
    if data:
        ax.hist(data, bins=50, range=(0, top), label=names[:-1], histtype="step", density=True)
    if lens["converged_jsd"] <= top:
        ax.axvline(lens["converged_jsd"], color="k", ls=":", label="converged threshold")
    else:
        ax.set_title(f"all values below the 'converged' threshold {lens['converged_jsd']}", fontsize=8)
    ax.set_xlabel("normalised JSD (JSD / ln 2) to the final output")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax = axes[1]
    xs = range(len(names))
    ax.plot(xs, [x["jsd"] for x in b], "o-", label="mean JSD / ln 2")
    ax.plot(xs, [x["converged"] for x in b], "s-", label="fraction converged")
    ax.plot(xs, [x["top1_agree"] for x in b], "^-", label="top-1 = final")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("boundary")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(title or "logit lens at the exit boundaries", fontsize=9)
    _save(fig, path)


def loss_curves(curves: dict[str, dict], path: str, title: str = "") -> None:
    """curves[name] = {"train": [(step, [loss per seed])...], "val": [(step, [loss per seed])...]}."""
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    # the models see the same batches in the same order: subtracting the all-model mean at each step removes the
    # batch-to-batch noise they share and shows the ordering
    common = sorted(set.intersection(*[{p[0] for p in c.get("train") or []} for c in curves.values()])) if curves else []
    ref = {s: sum(sum(v) / len(v) for c in curves.values() for st, v in c["train"] if st == s) / len(curves)
           for s in common}
    for i, (name, c) in enumerate(curves.items()):
        rel = [(st, sum(v) / len(v) - ref[st]) for st, v in (c.get("train") or []) if st in ref]
        if rel:
            sm, out = None, []
            for st, d in rel:  # exponential moving average, 10-point time constant
                sm = d if sm is None else 0.9 * sm + 0.1 * d
                out.append((st, sm))
            axes[2].plot([p[0] for p in out], [p[1] for p in out], color=f"C{i % 10}", label=name, lw=1.2)
    for i, (name, c) in enumerate(curves.items()):
        col = f"C{i % 10}"
        for ax, key in ((axes[0], "train"), (axes[1], "val")):
            pts = c.get(key) or []
            if not pts:
                continue
            steps = [p[0] for p in pts]
            mean = [sum(p[1]) / len(p[1]) for p in pts]
            ax.plot(steps, mean, "-" if key == "train" else "o-", color=col, label=name, lw=1.2, ms=3)
            if all(len(p[1]) > 1 for p in pts):
                ax.fill_between(steps, [min(p[1]) for p in pts], [max(p[1]) for p in pts], color=col, alpha=0.15)
    axes[0].set_title("training loss (mean over seeds; band = min..max)")
    axes[1].set_title("validation loss (trainer's valid split)")
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set_title("training loss minus the mean of all models (EMA)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("LM loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    lo = [min(min(p[1]) for p in c["val"]) for c in curves.values() if c.get("val")]
    if lo:
        axes[1].set_ylim(min(lo) - 0.1, None)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
