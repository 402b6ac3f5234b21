"""Capacity balancing, the solver: derive a LoopMoE (prelude + loop x R + coda: a ``LoopLayout``) from a
Vanilla MoE so that FLOPs, FFN/attention ratio and total parameters match (loopmoe/balance/__init__.py has the
equations). ``LoopLayout`` is the layer layout of one model; parallel/layout.Layout is a process layout."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction

from loopmoe import flops
from loopmoe.balance.measure import TOLERANCE, BalanceError, Comparison, compare
from loopmoe.config import Config, ConfigError, ModelConfig, validate

@dataclass(frozen=True)
class LoopLayout:
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
    def of(cls, cfg: ModelConfig) -> "LoopLayout":
        return cls(cfg.n_prelude, cfg.n_loop, cfg.n_coda, cfg.loop_iters)

    @classmethod
    def parse(cls, text: str) -> "LoopLayout":
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


def _scaled_int(value: int, s: Fraction, what: str, source: ModelConfig, layout: LoopLayout) -> int:
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


def solve(source: ModelConfig, layout: LoopLayout, constraints: Constraints = Constraints(),
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
                   seq_len: int | None = None) -> list[tuple[LoopLayout, Solution | str]]:
    """Every layout P+KxR+C (P = C or C + 1) with R in ``iters`` whose head scale is an integer; each with
    its solution (or the reason it has none). Shows which layouts the integer constraints admit."""
    L = source.n_executed_layers
    out: list[tuple[LoopLayout, Solution | str]] = []
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
                lay = LoopLayout((rest + 1) // 2, k, rest // 2, r)
                try:
                    out.append((lay, solve(source, lay, constraints, template, seq_len)))
                except (BalanceError, ConfigError) as e:
                    out.append((lay, str(e)))
    return out
