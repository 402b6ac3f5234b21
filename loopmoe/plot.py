"""A run as a picture, without TensorBoard: PNG curves from ``RUN_DIR/metrics.jsonl``.

    python -m loopmoe.plot runs/demo            # -> runs/demo/plots/*.png
    python -m loopmoe.plot runs/demo --out figs

Writes loss.png (train loss and LM loss; validation loss at every loop exit), lr.png (the schedule from
config.yaml at every step from 0, the logged values on it), grad_norm.png,
throughput.png (tokens/s and MFU) and routing.png (validation expert-load imbalance per MoE layer and
routing divergence between loop iterations per loop layer). A step logged twice (a run resumed from an
earlier checkpoint re-logs the steps after it) keeps its last record: the curve of the run that went on.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from loopmoe.config import load_config  # noqa: E402
from loopmoe.train.optim import lr_at  # noqa: E402


def read_metrics(path: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train records by step, validation records by step); a bad line raises naming the file and line."""
    train, val = {}, {}
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a metrics record ({e}); expected a JSON object with 'step'") from None
            if "loss" in rec:
                train[step] = rec
            if any(k.startswith("val/") for k in rec):
                val[step] = {k: v for k, v in rec.items() if k.startswith("val/")}
    return dict(sorted(train.items())), dict(sorted(val.items()))


def _series(recs: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(s, r[key]) for s, r in recs.items() if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _keys(recs: dict[int, dict], pattern: str) -> list[tuple[int, str]]:
    """(number, key) of the keys matching ``pattern`` (one integer group), sorted by the number."""
    found = {k for r in recs.values() for k in r if re.fullmatch(pattern, k)}
    return sorted((int(re.fullmatch(pattern, k).group(1)), k) for k in found)


def _finish(fig, ax, path: str, title: str, ylabel: str) -> str:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def schedule_curve(run_dir: str) -> tuple[list[int], list[float]] | None:
    """The learning rate after each step 0..train.steps from the run's config.yaml (the schedule is a
    function of the config: loopmoe/train/optim.lr_at), the value the log records at step k; None
    without a config.yaml. The logged points (every train.log_interval steps) miss the warm-up."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    cfg = load_config(path)
    steps = list(range(cfg.train.steps + 1))
    return steps, [lr_at(k, cfg.train.steps, cfg.optim) for k in steps]


def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Write the PNGs of one run; returns their paths."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir!r} a run directory (logging.run_dir)?")
    train, val = read_metrics(path)
    if not train:
        raise ValueError(f"{path} has no training records yet (they come every train.log_interval steps)")
    out_dir = out_dir or os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(run_dir))
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*_series(train, "loss"), label="train loss (LM + aux)", lw=1.2)
    ax.plot(*_series(train, "lm_loss"), label="train LM loss", lw=1.2)
    exits = _keys(val, r"val/loss_exit(\d+)")
    for k, key in exits:
        final = " (final)" if k == exits[-1][0] else ""
        ax.plot(*_series(val, key), marker="o", ms=3, lw=1, label=f"validation, exit {k}{final}")
    if not exits:
        ax.plot(*_series(val, "val/loss"), marker="o", ms=3, lw=1, label="validation")
    written.append(_finish(fig, ax, os.path.join(out_dir, "loss.png"), f"{name}: loss", "loss (nats/token)"))

    fig, ax = plt.subplots(figsize=(7, 3.4))
    schedule = schedule_curve(run_dir)
    if schedule is not None:  # every step from 0, warm-up included, whatever train.log_interval was
        ax.plot(*schedule, lw=1.2, label="schedule (config.yaml)")
    ax.plot(*_series(train, "lr"), lw=0 if schedule else 1.2, marker="o" if schedule else None, ms=2.5,
            label="logged")
    if schedule is not None:
        ax.legend(fontsize=8)
    written.append(_finish(fig, ax, os.path.join(out_dir, "lr.png"), f"{name}: learning rate", "learning rate"))

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(*_series(train, "grad_norm"), lw=1.2)
    written.append(_finish(fig, ax, os.path.join(out_dir, "grad_norm.png"),
                           f"{name}: global gradient norm (before clipping)", "grad norm"))

    # Two panels, not twin axes: MFU is tokens/s times a constant, the two curves would lie on each other.
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.2), sharex=True)
    ax.plot(*_series(train, "tokens_per_s"), lw=1.2)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("tokens/s (all devices)")
    ax.set_title(f"{name}: throughput", fontsize=10)
    ax.grid(alpha=0.3)
    steps_mfu, mfu = _series(train, "mfu")
    peaks = {r["peak_tflops"] for r in train.values() if "peak_tflops" in r}
    if mfu:
        ax2.plot(steps_mfu, [100 * m for m in mfu], lw=1.2, color="C1")
        ax2.set_ylim(bottom=0)
        peak_txt = f", peak {max(peaks):.3g} TFLOP/s per device" if len(peaks) == 1 else ""
        mfu_title = f"model FLOPs utilisation{peak_txt}"
    else:
        ax2.text(0.5, 0.5, "no MFU: peak unknown (set logging.peak_tflops)", ha="center", transform=ax2.transAxes)
        mfu_title = "model FLOPs utilisation"
    written.append(_finish(fig, ax2, os.path.join(out_dir, "throughput.png"), mfu_title, "MFU (%)"))

    imb = _keys(val, r"val/imbalance_l(\d+)")
    div = _keys(val, r"val/divergence_l(\d+)")
    loop_layers = {k for k, _ in div}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9))
    for k, key in imb:
        axes[0].plot(*_series(val, key), marker="o", ms=3, lw=1,
                     label=f"layer {k}" + (" (loop)" if k in loop_layers else ""))
    axes[0].axhline(1.0, color="gray", lw=0.8, ls="--")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("max load / mean load")
    axes[0].set_title("expert load imbalance (validation; 1 = balanced)", fontsize=10)
    axes[0].grid(alpha=0.3)
    if imb:
        axes[0].legend(fontsize=8)
    else:
        axes[0].text(0.5, 0.5, "no MoE layers / no validation yet", ha="center", transform=axes[0].transAxes)
    for k, key in div:
        axes[1].plot(*_series(val, key), marker="o", ms=3, lw=1, label=f"loop layer {k}")
    axes[1].axhline(1.0, color="gray", lw=0.8, ls="--")
    if not div:
        axes[1].text(0.5, 0.5, "no loop layers with 2+ iterations", ha="center", transform=axes[1].transAxes)
    fig.suptitle(name, fontsize=10)
    written.append(_finish(fig, axes[1], os.path.join(out_dir, "routing.png"),
                           "routing divergence, iteration 1 vs 2 (validation)",
                           "divergence (0 = same experts, 1 = as random)"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run directory (logging.run_dir) with metrics.jsonl")
    ap.add_argument("--out", help="where the PNGs go (default: RUN_DIR/plots)")
    args = ap.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} plots to {os.path.dirname(paths[0])}: " + ", ".join(os.path.basename(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
