"""Capacity balancing, the measurement: parameter and FLOP budgets of two model configs side by side, with
the tolerance check (spec section 4; the method: loopmoe/balance/__init__.py, docs/balance.md)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from loopmoe import flops
from loopmoe.config import Config, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(ROOT, "configs")
TOLERANCE = 0.01

# (key, label, checked): the checked ones must agree within the tolerance.
QUANTITIES: list[tuple[str, str, bool]] = [
    ("total_params", "total parameters", True),
    ("active_params", "active parameters / token", True),
    ("flops_per_token", "forward FLOPs / token", True),
    ("attn_ffn_ratio", "attention : FFN active ratio", True),
    ("train_flops_per_token", "training FLOPs / token (3x)", False),
    ("kv_per_token", "KV-cache elements / token", False),
    ("adaln_params", "IterAdaLN parameters", False),
    ("distinct_active", "distinct active params (info)", False),
]


class BalanceError(ValueError):
    """The solver cannot meet a constraint; the message says which and what to change."""


# ---------------------------------------------------------------------------------------------------
# Measured budgets


@dataclass(frozen=True)
class Budget:
    """What the balance check compares, for one model (measured or by formula)."""

    total_params: int
    active_params: int
    flops_per_token: int  # forward, by the convention in loopmoe/flops.py
    train_flops_per_token: int  # 3 x forward
    attn_ffn_ratio: float  # active attention / active FFN
    kv_per_token: int
    adaln_params: int
    distinct_active: int
    seq_len: int
    source: str  # "measured" (meta model, counted) or "formula"


def budget(cfg: ModelConfig, seq_len: int | None = None, measured: bool = True) -> Budget:
    """Budget of ``cfg``: counted on a meta-device model (no memory), or from the formula."""
    seq_len = seq_len or cfg.max_seq_len
    counts = flops.count_model(flops.meta_model(cfg), cfg) if measured else flops.counts_from_config(cfg)
    fwd = flops.flops_from_counts(counts, cfg, seq_len)
    return Budget(
        total_params=counts.total, active_params=counts.active, flops_per_token=fwd,
        train_flops_per_token=3 * fwd, attn_ffn_ratio=counts.attn_ffn_ratio,
        kv_per_token=flops.kv_cache_per_token(cfg), adaln_params=counts.adaln,
        distinct_active=counts.distinct_active, seq_len=seq_len, source="measured" if measured else "formula",
    )


@dataclass
class Row:
    key: str
    label: str
    a: float
    b: float
    checked: bool
    tolerance: float

    @property
    def rel(self) -> float:
        """(b - a) / a; a is the reference."""
        if self.a == 0:
            return 0.0 if self.b == 0 else math.inf
        return (self.b - self.a) / self.a

    @property
    def ok(self) -> bool:
        return not self.checked or abs(self.rel) <= self.tolerance


@dataclass
class Comparison:
    """Side-by-side budgets of a reference (a) and a candidate (b)."""

    name_a: str
    name_b: str
    budget_a: Budget
    budget_b: Budget
    rows: list[Row]
    layout_a: str = ""
    layout_b: str = ""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    @property
    def max_checked_diff(self) -> float:
        return max(abs(r.rel) for r in self.rows if r.checked)

    def as_dict(self) -> dict[str, dict[str, float | bool]]:
        return {r.key: {"a": r.a, "b": r.b, "rel": r.rel, "checked": r.checked, "ok": r.ok} for r in self.rows}

    def table(self) -> str:
        head = ["quantity", self.name_a, self.name_b, "diff", "check"]
        lines = []
        for r in self.rows:
            check = ("ok" if r.ok else "FAIL") if r.checked else "info"
            diff = f"{100 * r.rel:+.2f}%" if math.isfinite(r.rel) else "n/a"
            lines.append([r.label, _fmt(r.key, r.a), _fmt(r.key, r.b), diff, check])
        widths = [max(len(x[i]) for x in [head] + lines) for i in range(5)]

        def fmt_line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        n = max(len(self.name_a), len(self.name_b))
        out = [f"{self.name_a:<{n}} : {self.layout_a}", f"{self.name_b:<{n}} : {self.layout_b}", ""]
        out += [fmt_line(head), "  ".join("-" * w for w in widths)] + [fmt_line(x) for x in lines]
        return "\n".join(out)


def _fmt(key: str, v: float) -> str:
    if key == "attn_ffn_ratio":
        return f"{v:.4f}"
    if key in ("flops_per_token", "train_flops_per_token"):
        return f"{v / 1e9:.4f} G" if v >= 1e8 else f"{v / 1e6:.3f} M"
    return f"{int(v):,}"


def describe_layout(cfg: ModelConfig) -> str:
    """'6+10x2+6 (22 unique / 32 executed), 9/3 heads, 72 x 384 experts (top-8, 1 shared), IterAdaLN r16'."""
    if cfg.n_loop and cfg.loop_iters > 1:
        lay = (f"{cfg.n_prelude}+{cfg.n_loop}x{cfg.loop_iters}+{cfg.n_coda} "
               f"({cfg.n_unique_layers} unique / {cfg.n_executed_layers} executed)")
    else:
        lay = f"{cfg.n_executed_layers} layers"
    ffn = (f"{cfg.n_experts} x {cfg.expert_hidden} experts (top-{cfg.top_k}, {cfg.n_shared_experts} shared)"
           if cfg.ffn == "moe" else f"dense FFN {cfg.dense_hidden}")
    adaln = f", IterAdaLN r{cfg.adaln_rank}" if cfg.n_loop and cfg.adaln != "none" else ""
    return f"{lay}, {cfg.n_heads}/{cfg.n_kv_heads} heads x {cfg.head_dim}, {ffn}{adaln}"


def compare(cfg_a: Config | ModelConfig, cfg_b: Config | ModelConfig, seq_len: int | None = None,
            tolerance: float = TOLERANCE, measured: bool = True, names: tuple[str, str] = ("a", "b")) -> Comparison:
    """Budgets of a (the reference) and b side by side; ``.ok`` is False when a checked quantity
    differs by more than ``tolerance``. ``seq_len`` defaults to a's data.seq_len (Config) or max_seq_len."""
    if seq_len is None:
        seq_len = cfg_a.data.seq_len if isinstance(cfg_a, Config) else cfg_a.max_seq_len
    ma = cfg_a.model if isinstance(cfg_a, Config) else cfg_a
    mb = cfg_b.model if isinstance(cfg_b, Config) else cfg_b
    ba, bb = budget(ma, seq_len, measured), budget(mb, seq_len, measured)
    rows = [Row(k, label, getattr(ba, k), getattr(bb, k), chk, tolerance) for k, label, chk in QUANTITIES]
    return Comparison(names[0], names[1], ba, bb, rows, describe_layout(ma), describe_layout(mb))
