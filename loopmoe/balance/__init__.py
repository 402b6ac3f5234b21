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

Files: measure.py (budgets and the side-by-side check), solver.py (the solver and the layout search),
cli.py (presets and the command line); this package hands their names on.
"""
from loopmoe.balance.cli import MODEL_KEYS, default_against, main, resolve_preset, yaml_snippet  # noqa: F401
from loopmoe.balance.measure import (QUANTITIES, TOLERANCE, BalanceError, Budget, Comparison, Row,  # noqa: F401
                                     budget, compare, describe_layout)
from loopmoe.balance.solver import Constraints, LoopLayout, Solution, search_layouts, solve  # noqa: F401
