"""The early-exit plan: which executed layers run between exit boundaries (the model's schedule cut at
the boundaries) and what each step and read-out costs in FLOPs. See early_exit.py for the method."""
from __future__ import annotations

from dataclasses import dataclass

from loopmoe import flops
from loopmoe.model.schedule import LoopSchedule, Step



PlanStep = Step  # one executed layer, from the model's schedule (loopmoe/model/schedule.py)


@dataclass
class ExitPlan:
    segments: list[list[PlanStep]]  # layers run before boundary 1, between 1 and 2, ...
    readout: list[PlanStep]  # run at every read-out before norm + head (the coda; empty if none)
    names: list[str]  # boundary names
    exec_fraction: list[float]  # per-token FLOP fraction executed by a token exiting at each boundary
    looped: bool

    @property
    def n(self) -> int:
        return len(self.segments)


@dataclass(frozen=True)
class Costs:
    """Forward FLOPs per token by the flops.py convention, split by step."""

    full: dict[str, int]  # one executed layer of this kind
    kv: dict[str, int]  # K/V projection (+ IterAdaLN) for a propagated (exited) token
    head: int
    total: int  # one full forward per token (= flops.forward_flops_per_token)


def step_costs(cfg, seq_len: int) -> Costs:
    c = flops.counts_from_config(cfg)
    attn = c.attn // cfg.n_unique_layers
    ffn = c.ffn_active // cfg.n_executed_layers
    passes = cfg.n_loop * cfg.loop_iters
    adaln = c.adaln_active // passes if passes and c.adaln_active else 0
    scores = 4 * cfg.n_heads * cfg.head_dim * seq_len
    kv_proj = 2 * cfg.n_kv_heads * cfg.head_dim * cfg.d_model
    full = {"prelude": 2 * (attn + ffn) + scores, "coda": 2 * (attn + ffn) + scores,
            "loop": 2 * (attn + ffn + adaln) + scores}
    kv = {"prelude": 2 * kv_proj, "coda": 2 * kv_proj, "loop": 2 * (kv_proj + adaln)}
    total = (full["prelude"] * cfg.n_prelude + full["loop"] * passes + full["coda"] * cfg.n_coda + 2 * c.head)
    return Costs(full, kv, 2 * c.head, total)


def _steps(cfg) -> tuple[list[PlanStep], list[list[PlanStep]], list[PlanStep]]:
    sched = LoopSchedule.from_config(cfg)
    iters = [sched.loop_steps(it) for it in range(sched.R)] if sched.K else []
    return sched.prelude_steps(), iters, sched.coda_steps()


def loop_fractions(cfg, seq_len: int) -> list[float]:
    """Executed-FLOP fraction when a looped model exits after iteration k = 1..R-1."""
    return make_plan(cfg, seq_len).exec_fraction[:-1]


def make_plan(cfg, seq_len: int, match_fractions: list[float] | None = None) -> ExitPlan:
    """Boundaries of ``cfg`` (a ModelConfig); see the module doc."""
    costs = step_costs(cfg, seq_len)
    pre, iters, coda = _steps(cfg)
    if cfg.n_loop and cfg.loop_iters > 1:
        segments = [pre + iters[0]] + iters[1:]
        names = [f"iter {k + 1}" for k in range(cfg.loop_iters)]
        readout = coda
    else:
        layers = pre + [s for it in iters for s in it] + coda
        L = len(layers)
        cum = [0]
        for st in layers:
            cum.append(cum[-1] + costs.full[st.kind])
        frac = [(cum[n] + costs.head) / costs.total for n in range(L + 1)]
        targets = match_fractions if match_fractions is not None else [0.75]
        cuts = sorted({min(range(1, L), key=lambda n: abs(frac[n] - f)) for f in targets} if L > 1 else set())
        bounds = cuts + [L]
        segments = [layers[a:b] for a, b in zip([0] + cuts, bounds)]
        names = [f"layer {b}" for b in bounds]
        readout = []
    ro = sum(costs.full[s.kind] for s in readout) + costs.head
    fractions, run = [], 0
    for seg in segments:
        run += sum(costs.full[s.kind] for s in seg)
        fractions.append((run + ro) / costs.total)
    return ExitPlan(segments, readout, names, fractions, bool(cfg.n_loop and cfg.loop_iters > 1))


def flops_for_fractions(plan: ExitPlan, costs: Costs, exit_frac: list[float], mode: str = "token") -> dict:
    """Per-token FLOPs executed when ``exit_frac[k]`` of the tokens exit at boundary k (sums to 1).

    Returns ideal_saved (skipped layers only), net_saved (read-outs at every boundary passed and, in
    token mode, K/V of propagated tokens included) and executed (FLOPs per token).
    """
    ideal = 1.0 - sum(f * e for f, e in zip(exit_frac, plan.exec_fraction))
    executed, active = 0.0, 1.0
    for k, seg in enumerate(plan.segments):
        if active <= 1e-12:
            break
        partial = mode == "token" and active < 1.0
        executed += sum(active * costs.full[s.kind] + (1 - active) * costs.kv[s.kind] * partial for s in seg)
        executed += sum(active * costs.full[s.kind] + (1 - active) * costs.kv[s.kind] * partial
                        for s in plan.readout) + active * costs.head
        active -= exit_frac[k]
    return {"ideal_saved": ideal, "net_saved": 1.0 - executed / costs.total, "executed": executed}
