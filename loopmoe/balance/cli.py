"""The command line of capacity balancing: presets, the side-by-side check, --solve / --search."""
from __future__ import annotations

import argparse
import math
import os
import sys

import yaml

from loopmoe.balance.measure import CONFIG_DIR, TOLERANCE, BalanceError, _fmt, compare, describe_layout
from loopmoe.balance.solver import Constraints, LoopLayout, search_layouts, solve
from loopmoe.config import ConfigError, ModelConfig, load_config


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
    layout = LoopLayout.parse(args.layout) if args.layout else LoopLayout.of(preset)
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

