"""THE execution order of a LoopMoE forward, written once: prelude -> R loop iterations -> coda.

    sched = LoopSchedule(n_prelude=P, n_loop=K, n_coda=C, loop_iters=R, input_reinjection=True)
    h = sched.run(h, run_layer, iter_embed, after_iteration=read_out)   # every executed layer, in order

Loop iteration k (0-based) first re-injects the loop input x0 (``input_reinjection``, k > 0), computes
the iteration embedding e_k = iter_embed(k), then runs the K shared layers. ``after_iteration(k, h)``
is called after every iteration but the last that runs (the early-exit read-outs). The coda runs after
the loop; a read-out runs it again through ``sched.coda``.

Every executed layer goes through ONE call, ``run_layer(step, h, e_k) -> h``: the consumer (training
model, pipeline stage, exported HF model, early-exit analysis) decides how a layer is run (routing
records, KV cache, recompute, masks); the order is decided here. A pipeline stage runs the contiguous
slice ``[lo, hi)`` of unique layers (the loop block always whole, parallel/layout.py enforces it).

Imports only torch (none at all, in fact): the export copies this file next to the remote-code model
as ``loopmoe_schedule.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Step:
    """One executed layer."""

    kind: str  # "prelude" | "loop" | "coda": the module list it lives in
    index: int  # index in that list
    layer: int  # unique layer index (order prelude, loop, coda: model.layers)
    iteration: int = 0  # loop iteration, 0-based (0 outside the loop)
    executed: int = 0  # executed-layer index P + k*K + j (a KV-cache entry; the coda's P + R*K + c)
    reinject: bool = False  # the loop input x0 is added to h before this step
    loop_start: bool = False  # the first step of the loop: h before it is x0


class LoopSchedule:
    def __init__(self, n_prelude: int, n_loop: int, n_coda: int, loop_iters: int, input_reinjection: bool):
        self.P, self.K, self.C = n_prelude, n_loop, n_coda
        self.R = loop_iters if n_loop else 1  # iterations (1 when there is no loop)
        self.reinjection = bool(input_reinjection)

    @classmethod
    def from_config(cls, cfg) -> "LoopSchedule":
        """A training ModelConfig (loop_iters) or the export's LoopMoEConfig (n_iters)."""
        iters = cfg.loop_iters if hasattr(cfg, "loop_iters") else cfg.n_iters
        return cls(cfg.n_prelude, cfg.n_loop, cfg.n_coda, iters, cfg.input_reinjection)

    # -- the steps --------------------------------------------------------------------------------
    def prelude_steps(self) -> list[Step]:
        return [Step("prelude", i, i, 0, i) for i in range(self.P)]

    def loop_steps(self, it: int) -> list[Step]:
        """The K shared layers at iteration ``it``."""
        P, K = self.P, self.K
        return [Step("loop", j, P + j, it, P + it * K + j, reinject=j == 0 and it > 0 and self.reinjection,
                     loop_start=j == 0 and it == 0) for j in range(K)]

    def coda_steps(self) -> list[Step]:
        P, K, R = self.P, self.K, self.R
        return [Step("coda", c, P + K + c, 0, P + R * K + c) for c in range(self.C)]

    def steps(self, n_iters: int | None = None) -> Iterator[Step]:
        """Every executed layer in order (``n_iters`` loop iterations, default R)."""
        yield from self.prelude_steps()
        for it in range(self.R if n_iters is None else n_iters):
            yield from self.loop_steps(it) if self.K else ()
        yield from self.coda_steps()

    def check_exit(self, exit_after: int | None) -> int:
        """Loop iterations to run for ``exit_after`` (None: all R)."""
        if exit_after is not None and not 1 <= exit_after <= self.R:
            raise ValueError(f"exit_after={exit_after} must be in 1..{self.R} (loop iterations)")
        return self.R if exit_after is None else exit_after

    # -- running them -----------------------------------------------------------------------------
    def prelude(self, h, run_layer: Callable, lo: int = 0, hi: int | None = None):
        return _run_unique(self.prelude_steps(), h, run_layer, lo, hi)

    def loop(self, h, run_layer: Callable, iter_embed=None, n_iters: int | None = None,
             after_iteration: Callable | None = None):
        """``n_iters`` iterations of the K shared layers; ``after_iteration(it, h)`` after all but the last."""
        if not self.K:
            return h
        n = self.R if n_iters is None else n_iters
        x0 = h  # the loop's input state (for re-injection)
        for it in range(n):
            e_k = iter_embed(it) if iter_embed is not None else None  # [r]
            for st in self.loop_steps(it):
                if st.reinject:
                    h = reinjected(h, x0)  # the loop input, before every iteration after the first
                h = run_layer(st, h, e_k)
            if after_iteration is not None and it < n - 1:
                after_iteration(it, h)
        return h

    def coda(self, h, run_layer: Callable, lo: int = 0, hi: int | None = None):
        return _run_unique(self.coda_steps(), h, run_layer, lo, hi)

    def run(self, h, run_layer: Callable, iter_embed=None, n_iters: int | None = None,
            after_iteration: Callable | None = None, lo: int = 0, hi: int | None = None):
        """Prelude, loop, coda over the unique layers [lo, hi) (default: all). A slice holds the loop
        block whole or not at all."""
        h = self.prelude(h, run_layer, lo, hi)
        if self.K and lo <= self.P < (self.P + self.K + self.C if hi is None else hi):
            h = self.loop(h, run_layer, iter_embed, n_iters, after_iteration)
        return self.coda(h, run_layer, lo, hi)


def reinjected(h, x0, rows=None):
    """Input re-injection: h + x0; with ``rows`` (bool [b, s]) only there (the early-exit runner: the
    tokens still running keep being updated, exited ones keep their state)."""
    if rows is None:
        return h + x0
    return (h + x0).where(rows[..., None], h)


def _run_unique(steps: list[Step], h, run_layer: Callable, lo: int, hi: int | None):
    """Unique (prelude or coda) layers in [lo, hi): no iteration embedding."""
    for st in steps:
        if lo <= st.layer and (hi is None or st.layer < hi):
            h = run_layer(st, h, None)
    return h
