"""Capacity balancing (spec section 4): derive a LoopMoE from a Vanilla MoE, and MEASURE that they match.

    python -m loopmoe.balance loopmoe_3b                     # vs vanilla_3b (from the name); exit 1 on a >1% gap
    python -m loopmoe.balance loopmoe_3b --set model.n_experts=64    # an override on the preset's side
    python -m loopmoe.balance loopmoe_3b --solve             # derive loopmoe_3b's model from vanilla_3b
    python -m loopmoe.balance loopmoe_3b --solve --search    # every R=2/3 layout that balances within 1%

The three constraints, for a reference with L layers of active attention A and active FFN F (all
layers alike), and a target with `unique` and `executed` layers:
  FLOPs: executed x (A' + F') = L x (A + F)
  ratio: F' / A' = F / A
  total: unique x (A' + all-expert FFN') + IterAdaLN = L x (A + all-expert FFN)
The first two give A' = s A and F' = s F with s = L / executed: attention heads (query and KV, so the
KV cache per token is kept too) and expert width are scaled by s; the third then fixes the expert
count. Integer constraints (heads, widths, experts divisible by the parallel sizes) leave small gaps,
which the solver minimises over the neighbouring integer choices and the check measures.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction

import yaml

from loopmoe import flops
from loopmoe.config import Config, ConfigError, ModelConfig, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


# ---------------------------------------------------------------------------------------------------
# The solver


@dataclass(frozen=True)
class Layout:
    n_prelude: int
    n_loop: int
    n_coda: int
    loop_iters: int

    @property
    def unique(self) -> int:
        return self.n_prelude + self.n_loop + self.n_coda

    @property
    def executed(self) -> int:
        return self.n_prelude + self.loop_iters * self.n_loop + self.n_coda

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Layout":
        return cls(cfg.n_prelude, cfg.n_loop, cfg.n_coda, cfg.loop_iters)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """'8+8x2+8' (prelude + loop x iterations + coda) or '24' (no loop)."""
        m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*x\s*(\d+)\s*\+\s*(\d+)\s*", text)
        if m:
            p, k, r, c = map(int, m.groups())
            return cls(p, k, c, r)
        if text.strip().isdigit():
            return cls(int(text), 0, 0, 1)
        raise BalanceError(f"layout {text!r}: write PRELUDE+LOOPxITERS+CODA (e.g. 8+8x2+8) or a layer count (24)")

    def __str__(self) -> str:
        return f"{self.n_prelude}+{self.n_loop}x{self.loop_iters}+{self.n_coda}" if self.n_loop else str(self.unique)


@dataclass(frozen=True)
class Constraints:
    """Integer constraints of the derived model."""

    expert_multiple: int = 8  # routed experts divisible by the expert-parallel sizes 1, 2, 4, 8
    tp_sizes: tuple[int, ...] = (1,)  # query and KV heads divisible by each TP size we will use
    width_multiple: int = 64  # expert / dense hidden width (GEMM tiles)
    tolerance: float = TOLERANCE


@dataclass
class Solution:
    cfg: ModelConfig
    scale: Fraction  # s = reference executed layers / target executed layers
    ideal: dict[str, float]  # the real-valued solution before rounding
    predicted: Comparison  # by formula (the CLI's check mode measures it on the model)
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.predicted.ok


def _scaled_int(value: int, s: Fraction, what: str, source: ModelConfig, layout: Layout) -> int:
    v = value * s
    if v.denominator != 1:
        good = [x for x in range(source.n_executed_layers, 3 * source.n_executed_layers + 1)
                if (Fraction(source.n_heads * source.n_executed_layers, x).denominator == 1
                    and Fraction(source.n_kv_heads * source.n_executed_layers, x).denominator == 1)]
        raise BalanceError(
            f"layout {layout} executes {layout.executed} layers: {what} {value} x {s} = {float(v):.3f} is not an "
            f"integer; choose a layout executing one of {good} layers (or change the reference's heads)")
    return int(v)


def _multiples_near(x: float, m: int, lo: int) -> list[int]:
    base = math.floor(x / m) * m
    return sorted({max(lo, v) for v in (base - m, base, base + m, base + 2 * m)})


def solve(source: ModelConfig, layout: Layout, constraints: Constraints = Constraints(),
          template: ModelConfig | None = None, seq_len: int | None = None) -> Solution:
    """Derive the model with ``layout`` that balances ``source`` (usually Vanilla -> LoopMoE; any direction).

    ``template`` supplies the loop-only options (adaln, adaln_rank, adaln_gate, input_reinjection) of
    the target; the rest (vocab, d_model, head_dim, top_k, shared experts, ...) comes from ``source``.
    IterAdaLN's per-token matmuls (7 x d x rank per loop pass) are FLOPs the reference does not have:
    when no integer choice fits the tolerance at the template's rank, the rank is halved (down to 8)
    until one does, and a note says so.
    """
    s = Fraction(source.n_executed_layers, layout.executed)
    heads = _scaled_int(source.n_heads, s, "query heads", source, layout)
    kv = _scaled_int(source.n_kv_heads, s, "KV heads", source, layout)
    if heads % kv:
        raise BalanceError(f"scaled heads {heads}/{kv}: query heads must be a multiple of KV heads")
    bad_tp = [t for t in constraints.tp_sizes if heads % t or kv % t]
    if bad_tp:
        raise BalanceError(f"scaled heads {heads}/{kv} are not divisible by TP size(s) {bad_tp}; the attention "
                           "splits whole KV groups across TP ranks. Use TP sizes dividing the KV heads or another layout")
    t = template or source
    base = dataclasses.replace(
        source, n_prelude=layout.n_prelude, n_loop=layout.n_loop, n_coda=layout.n_coda,
        loop_iters=layout.loop_iters, n_heads=heads, n_kv_heads=kv,
        adaln=t.adaln, adaln_rank=t.adaln_rank, adaln_gate=t.adaln_gate, input_reinjection=t.input_reinjection,
        exit_loss_weights=list(t.exit_loss_weights) if len(t.exit_loss_weights) == layout.loop_iters - 1 else [],
    )
    seq_len = seq_len or source.max_seq_len
    notes = [f"scale s = {source.n_executed_layers}/{layout.executed} = {s}: heads {source.n_heads}/"
             f"{source.n_kv_heads} -> {heads}/{kv}"]
    ranks = [base.adaln_rank]
    if layout.n_loop and base.adaln != "none":
        while ranks[-1] // 2 >= 8:
            ranks.append(ranks[-1] // 2)
    for rank in ranks:
        cfg, ideal, predicted = _solve_widths(source, dataclasses.replace(base, adaln_rank=rank), constraints, seq_len)
        if predicted.ok:
            break
    if cfg.adaln_rank != base.adaln_rank and predicted.ok:
        notes.append(f"IterAdaLN rank {base.adaln_rank} -> {cfg.adaln_rank}: at {base.adaln_rank} its per-token "
                     f"matmuls alone break the {100 * constraints.tolerance:g}% budget")
    elif not predicted.ok:  # report the template's rank, the one that was asked for
        cfg, ideal, predicted = _solve_widths(source, base, constraints, seq_len)
    if source.ffn == "moe":
        notes.append(f"ideal expert width {ideal['width']:.1f}, ideal expert count {ideal['experts']:.2f} -> "
                     f"{cfg.n_experts} x {cfg.expert_hidden} (multiples of {constraints.expert_multiple} "
                     f"and {constraints.width_multiple})")
    else:
        notes.append("dense FFN: all FFN weights are active, so total parameters and FLOPs can only both "
                     "match when unique == executed layers")
    validate(Config(model=cfg, data=dataclasses.replace(Config().data, seq_len=min(seq_len, cfg.max_seq_len))))
    return Solution(cfg, s, ideal, predicted, notes)


def _solve_widths(source: ModelConfig, base: ModelConfig, constraints: Constraints, seq_len: int
                  ) -> tuple[ModelConfig, dict[str, float], Comparison]:
    """Best (width, experts) on the integer grid around the real-valued solution, by the worst gap."""
    m = constraints.width_multiple
    target_total = flops.counts_from_config(source).total
    candidates: list[ModelConfig] = []
    if source.ffn == "moe":
        ideal_w = source.expert_hidden * base.n_heads / source.n_heads  # = width x s
        ideal = {"width": ideal_w}
        step = constraints.expert_multiple
        lo = math.ceil(max(base.top_k, step) / step) * step
        for w in _multiples_near(ideal_w, m, m):
            # total(E) is affine in E: two evaluations give it, then E* = (target - t0) / slope.
            t0 = flops.counts_from_config(dataclasses.replace(base, expert_hidden=w, n_experts=base.top_k)).total
            t1 = flops.counts_from_config(dataclasses.replace(base, expert_hidden=w, n_experts=base.top_k + 1)).total
            e_star = base.top_k + (target_total - t0) / (t1 - t0)
            if w == _nearest(ideal_w, m):
                ideal["experts"] = e_star
            candidates += [dataclasses.replace(base, expert_hidden=w, n_experts=e)
                           for e in _multiples_near(e_star, step, lo)]
    else:
        ideal_w = source.dense_hidden * base.n_heads / source.n_heads
        ideal = {"width": ideal_w}
        candidates = [dataclasses.replace(base, dense_hidden=w) for w in _multiples_near(ideal_w, m, m)]

    def score(c: ModelConfig) -> tuple[float, float]:
        # Primary: the worst checked gap; secondary: distance from the exactly scaled width.
        width = c.expert_hidden if c.ffn == "moe" else c.dense_hidden
        return compare(source, c, seq_len, constraints.tolerance, measured=False).max_checked_diff, abs(width - ideal_w)

    best = min(candidates, key=score)
    return best, ideal, compare(source, best, seq_len, constraints.tolerance, measured=False,
                                names=("reference", "derived"))


def _nearest(x: float, m: int) -> int:
    return max(m, int(round(x / m)) * m)


def search_layouts(source: ModelConfig, constraints: Constraints = Constraints(),
                   template: ModelConfig | None = None, iters: tuple[int, ...] = (2, 3),
                   seq_len: int | None = None) -> list[tuple[Layout, Solution | str]]:
    """Every layout P+KxR+C (P = C or C + 1) with R in ``iters`` whose head scale is an integer; each with
    its solution (or the reason it has none). Shows which layouts the integer constraints admit."""
    L = source.n_executed_layers
    out: list[tuple[Layout, Solution | str]] = []
    for executed in range(L + 1, 3 * L + 1):
        s = Fraction(L, executed)
        if (source.n_heads * s).denominator != 1 or (source.n_kv_heads * s).denominator != 1:
            continue
        for r in iters:
            for k in range(1, executed):
                unique = executed - k * (r - 1)
                if unique < k + 2 or (executed - r * k) < 2:
                    continue
                rest = unique - k
                lay = Layout((rest + 1) // 2, k, rest // 2, r)
                try:
                    out.append((lay, solve(source, lay, constraints, template, seq_len)))
                except (BalanceError, ConfigError) as e:
                    out.append((lay, str(e)))
    return out


# ---------------------------------------------------------------------------------------------------
# CLI


def resolve_preset(name: str) -> str:
    """A preset name in configs/ (``loopmoe_3b``) or a path to a YAML file."""
    if os.path.exists(name):
        return name
    path = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else name + ".yaml")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))
        raise ConfigError(f"preset {name!r} not found (neither a file nor configs/{name}.yaml); presets: {known}")
    return path


def default_against(name: str) -> str:
    """The twin by name: loopmoe <-> vanilla, dense_loop <-> dense."""
    base = os.path.basename(name)
    base = base[:-5] if base.endswith(".yaml") else base
    for x, y in (("loopmoe", "vanilla"), ("vanilla", "loopmoe"), ("dense_loop", "dense"), ("dense", "dense_loop")):
        if x in base:
            return base.replace(x, y, 1)
    raise ConfigError(f"cannot guess the reference for {name!r}; pass --against PRESET")


def _label(name: str) -> str:
    base = os.path.basename(name)
    return base[:-5] if base.endswith(".yaml") else base


MODEL_KEYS = ["vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "n_prelude", "n_loop", "n_coda",
              "loop_iters", "max_seq_len", "ffn", "dense_hidden", "n_experts", "expert_hidden", "top_k",
              "n_shared_experts", "adaln", "adaln_rank"]


def yaml_snippet(cfg: ModelConfig) -> str:
    skip = {"dense_hidden"} if cfg.ffn == "moe" else {"n_experts", "expert_hidden", "top_k", "n_shared_experts"}
    if not cfg.n_loop:
        skip |= {"adaln", "adaln_rank"}  # IterAdaLN exists only in loop layers
    keys = [k for k in MODEL_KEYS if k not in skip]
    return yaml.safe_dump({"model": {k: getattr(cfg, k) for k in keys}}, sort_keys=False).rstrip()


def _parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loopmoe.balance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", help="a preset in configs/ (e.g. loopmoe_3b) or a YAML path")
    ap.add_argument("--against", help="the reference preset (default: from the name, loopmoe -> vanilla)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override on PRESET's side (repeatable)")
    ap.add_argument("--against-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override on the reference's side (repeatable)")
    ap.add_argument("--tolerance", type=float, default=TOLERANCE, help="relative gap allowed (default 0.01)")
    ap.add_argument("--seq-len", type=int, help="sequence length for the attention FLOPs (default data.seq_len)")
    ap.add_argument("--formula", action="store_true", help="use the formula instead of counting the built models")
    g = ap.add_argument_group("solver")
    g.add_argument("--solve", action="store_true", help="derive PRESET's model from the reference; print YAML")
    g.add_argument("--layout", help="target layout for --solve, e.g. 6+10x2+6 (default: PRESET's)")
    g.add_argument("--ep-sizes", default="8", help="routed experts divisible by these (default 8)")
    g.add_argument("--tp-sizes", default="1", help="heads divisible by these TP sizes (default 1)")
    g.add_argument("--width-multiple", type=int, default=64, help="expert/dense width multiple (default 64)")
    g.add_argument("--search", action="store_true", help="with --solve: list the layouts that balance")
    args = ap.parse_args(argv)

    try:
        path_b = resolve_preset(args.preset)
        against = args.against or default_against(args.preset)
        cfg_b = load_config(path_b, args.overrides)
        cfg_a = load_config(resolve_preset(against), args.against_set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name_a, name_b = _label(against), _label(args.preset)
    seq_len = args.seq_len or cfg_a.data.seq_len

    if args.solve:
        return _solve_cli(args, cfg_a.model, cfg_b.model, name_a, name_b, seq_len)

    cmp_ = compare(cfg_a, cfg_b, seq_len, args.tolerance, measured=not args.formula, names=(name_a, name_b))
    how = "by formula" if args.formula else "measured: parameters counted on the models built on the meta device"
    print(f"balance: {name_b} vs reference {name_a} (seq_len {seq_len}; {how})")
    print(cmp_.table())
    print("FLOPs: the convention of loopmoe/flops.py (2 x active matmul params + 4 x executed layers x heads x\n"
          "head_dim x seq_len), cross-checked against torch.utils.flop_counter on real forwards (tests/test_flops.py).\n"
          "Active = per token, loop layers once per iteration, routed experts top_k/n_experts, embedding excluded.")
    if not cmp_.ok:
        for r in cmp_.failures:
            print(f"FAIL: {r.label} differs by {100 * r.rel:+.2f}% (> {100 * args.tolerance:g}%): "
                  f"{name_a} {_fmt(r.key, r.a)} vs {name_b} {_fmt(r.key, r.b)}")
        sys.stdout.flush()
        print(f"error: {name_b} is not balanced against {name_a}: "
              + ", ".join(r.label for r in cmp_.failures), file=sys.stderr)
        return 1
    print(f"OK: all checked quantities within {100 * args.tolerance:g}% "
          f"(largest gap {100 * cmp_.max_checked_diff:.2f}%)")
    return 0


def _solve_cli(args, source: ModelConfig, preset: ModelConfig, name_a: str, name_b: str, seq_len: int) -> int:
    cons = Constraints(expert_multiple=math.lcm(*_parse_ints(args.ep_sizes)), tp_sizes=_parse_ints(args.tp_sizes),
                       width_multiple=args.width_multiple, tolerance=args.tolerance)
    if args.search:
        results = [(lay, sol) for lay, sol in search_layouts(source, cons, preset, seq_len=seq_len)
                   if not isinstance(sol, str)]
        ok = [(lay, sol) for lay, sol in results if sol.feasible]
        print(f"layouts balancing {name_a} ({describe_layout(source)}) within {100 * cons.tolerance:g}%: "
              f"{len(ok)} of the {len(results)} layouts P+KxR+C (R = 2, 3) with integer heads; {cons}; "
              f"rank = IterAdaLN rank (from {name_b}, halved where needed)")
        print(f"{'layout':<12} {'loop/unique':>11}  {'heads':>5}  {'experts':>9}  {'rank':>4}  {'max gap':>7}  "
              "gaps: total, active, FLOPs, ratio (%)")
        for lay, sol in ok:
            c = sol.cfg
            gaps = ", ".join(f"{100 * r.rel:+.2f}" for r in sol.predicted.rows if r.checked)
            experts = f"{c.n_experts}x{c.expert_hidden}" if c.ffn == "moe" else f"d{c.dense_hidden}"
            print(f"{str(lay):<12} {lay.n_loop:>5}/{lay.unique:<5}  {c.n_heads:>2}/{c.n_kv_heads:<2}  {experts:>9}  "
                  f"{c.adaln_rank:>4}  {100 * sol.predicted.max_checked_diff:>6.2f}%  {gaps}")
        return 0 if ok else 1
    layout = Layout.parse(args.layout) if args.layout else Layout.of(preset)
    try:
        sol = solve(source, layout, cons, template=preset, seq_len=seq_len)
    except BalanceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"solve: {name_b} with layout {layout} from {name_a} ({describe_layout(source)}); {cons}")
    for n in sol.notes:
        print(f"  {n}")
    print(yaml_snippet(sol.cfg))
    sol.predicted.name_a, sol.predicted.name_b = name_a, "derived"
    print("predicted by formula (run without --solve to measure the preset):")
    print(sol.predicted.table())
    differs = [k for k in MODEL_KEYS if getattr(sol.cfg, k) != getattr(preset, k)]
    if differs:
        print(f"note: configs/{name_b} differs from the derived model in: "
              + ", ".join(f"{k} ({getattr(preset, k)} vs {getattr(sol.cfg, k)})" for k in differs))
    else:
        print(f"configs/{name_b} matches the derived model")
    if not sol.feasible:
        print("FAIL: no integer solution within the tolerance for this layout: "
              + ", ".join(r.label for r in sol.predicted.failures) + " (try --search)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
