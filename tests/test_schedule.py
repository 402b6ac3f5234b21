"""The one execution schedule (loopmoe/model/schedule.py), by hand-computed examples: step order and
indices, re-injection, the early-exit hook, pipeline slices."""
from __future__ import annotations

import pytest

from loopmoe.model.schedule import LoopSchedule


def _trace(sched, **kw):
    seen = []

    def run_layer(st, h, e_k):
        seen.append((st.kind, st.layer, st.iteration, st.executed, e_k))
        return h + 1

    return sched.run(0, run_layer, **kw), seen


def test_steps_cover_every_executed_layer_once_in_order():
    s = LoopSchedule(n_prelude=1, n_loop=2, n_coda=1, loop_iters=3, input_reinjection=False)
    steps = list(s.steps())
    assert [(st.kind, st.layer, st.iteration) for st in steps] == [
        ("prelude", 0, 0), ("loop", 1, 0), ("loop", 2, 0), ("loop", 1, 1), ("loop", 2, 1),
        ("loop", 1, 2), ("loop", 2, 2), ("coda", 3, 0)]
    assert [st.executed for st in steps] == list(range(1 + 3 * 2 + 1))  # one KV-cache entry each
    assert [st.loop_start for st in steps].count(True) == 1 and steps[1].loop_start
    assert [st.executed for st in s.steps(n_iters=1)] == [0, 1, 2, 7]  # the coda keeps its entry


def test_reinjection_adds_the_loop_input_before_every_later_iteration():
    # prelude: 0 -> 1 = x0; iteration 1: 1 -> 3; iteration 2: 3 + x0 = 4 -> 6; coda: 7
    on = LoopSchedule(1, 2, 1, 2, input_reinjection=True)
    assert _trace(on)[0] == 7
    off = LoopSchedule(1, 2, 1, 2, input_reinjection=False)
    assert _trace(off)[0] == 6


def test_iteration_embedding_and_exit_hook():
    s = LoopSchedule(0, 1, 1, 3, input_reinjection=False)
    exits = []
    h, seen = _trace(s, iter_embed=lambda it: f"e{it}", after_iteration=lambda it, h: exits.append((it, h)))
    assert [e for *_, e in seen] == ["e0", "e1", "e2", None]  # the coda gets no iteration embedding
    assert exits == [(0, 1), (1, 2)]  # after every iteration but the last
    h, _ = _trace(s, n_iters=2, after_iteration=lambda it, h: exits.append(it))
    assert h == 3 and exits[-1] == 0


def test_a_pipeline_slice_runs_only_its_layers_and_the_loop_whole():
    s = LoopSchedule(2, 2, 2, 2, input_reinjection=True)
    _, first = _trace(s, lo=0, hi=2)
    assert [x[:3] for x in first] == [("prelude", 0, 0), ("prelude", 1, 0)]
    h, mid = _trace(s, lo=2, hi=4)  # the loop block alone: x0 is the stage's input (0)
    assert [x[1:3] for x in mid] == [(2, 0), (3, 0), (2, 1), (3, 1)] and h == 4
    _, last = _trace(s, lo=4)
    assert [x[:2] for x in last] == [("coda", 4), ("coda", 5)]
    full_h, full = _trace(s)
    assert full == first + [(k, u, i, e, None) for k, u, i, e, _ in full if 2 <= u < 4] + last


def test_no_loop_is_one_pass_and_exit_after_is_checked():
    s = LoopSchedule(3, 0, 0, 4, input_reinjection=True)
    assert s.R == 1 and _trace(s)[0] == 3
    assert LoopSchedule(1, 1, 1, 3, False).check_exit(None) == 3
    with pytest.raises(ValueError, match=r"exit_after=4 must be in 1..3"):
        LoopSchedule(1, 1, 1, 3, False).check_exit(4)
