"""Per-token early exit by read-out entropy in KV-cached decoding, and its teacher-forced quality.

    dec = ExitDecoder(model, threshold=2.0, kv_policy="propagate")   # batch size 1
    logits = dec.prefill(prompt_ids)                # [1, V]: the prompt runs the full model (all R iterations)
    logits, k = dec.step(next_id[:, None])          # one token; k = loop iterations it ran (1..R)

Decision. After loop iteration k < R (a loop boundary) the token's exit read-out is computed: the coda
and the LM head on its current state, exactly what ``model(exit_after=k)`` reads out (``_coda_head``).
If the entropy (nats) of that distribution is <= ``threshold`` the token stops there: its logits are the
read-out's, the read-out's coda K/V become the cached coda entries of this position, and iterations
k+1..R are not run. Otherwise the read-out is discarded (its coda K/V are never stored) and the token
continues; at iteration R the ordinary coda + head give its logits. ``threshold=None`` never reads out
(the full model); ``0`` reads out but exits only at entropy exactly 0 (never, in practice); ``inf`` exits everyone after iteration 1.

Skipped iterations' KV entries (``kv_policy``). The cache holds one K/V per (loop layer j, iteration i);
later tokens running iteration i of layer j attend to every earlier position's entry there, so an exited
position must leave one. Two policies:

* ``"copy"``: the entries of the skipped iterations i >= k of loop layer j are the K/V that
  position computed at its last executed iteration k-1 of the same layer (same position, so the rotary
  phase is right). Zero extra compute.
* ``"propagate"`` (default; CALM-style state propagation): from the exited (frozen) state h_k, loop layer j at
  skipped iteration i computes ONLY its K/V: the IterAdaLN modulation of iteration i on h_k, the attention
  norm, the K and V projections and the rotary embedding; no query, attention, FFN or residual update, and
  no input re-injection (the frozen state is not advanced). Costs the ``Costs.kv["loop"]`` FLOPs per
  skipped loop layer. The same approximation as the token mode of loopmoe/analysis/early_exit.py.

"propagate" is the default: on the tiny trained LoopMoE it costs about half the held-out loss of "copy" at
the same exit rate (and less than exiting every token) for ~5-12% of decode speed at the same threshold
(docs/benchmarks/exit_speed.md).

Either way every cache entry has the same length after each step, and later tokens attend to the filled
entries like any others (the cache is all a later token sees of an earlier position), so decoding stays
consistent: the cached decode equals recomputing the prefix without a cache under the same policy
(tests/test_exit_decoding.py).

Batch size: the per-token policy runs batch size 1 (a batched version would have to run the rows that
continue on a compacted batch; not done). A fixed ``exit_after=k`` (every token, any batch) needs no
decoder: ``model(ids, cache=cache, exit_after=k)`` (loopmoe/generate.py).

The prompt is prefilled with the full model (all R iterations for every prompt position, in one
parallel pass; prompt processing is not latency-bound). ``teacher_forced`` instead runs EVERY position
through ``step`` so the quality numbers include the KV effects of exits at every position.

FLOPs per token (``flops_saved``) come from loopmoe/analysis/exit_plan.py (the flops.py convention, the
read-outs at every boundary a token passes and, for "propagate", the K/V of skipped layers included).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loopmoe.analysis.exit_plan import flops_for_fractions, make_plan, step_costs
from loopmoe.model import core
from loopmoe.model.attention import KVCache
from loopmoe.model.schedule import reinjected

POLICIES = ("copy", "propagate")


class _PeekKV:
    """A LayerKV stand-in for a read-out's coda layer: attends to the cached past plus the new position
    and stores nothing until ``commit`` (the read-out of a token that continues leaves no trace)."""

    def __init__(self, kv):
        self.kv, self.k, self.v = kv, None, None

    @property
    def length(self) -> int:
        return self.kv.length

    def append(self, k, v):
        self.k, self.v = k, v
        if self.kv.k is None:
            return k, v
        return torch.cat([self.kv.k, k], dim=2), torch.cat([self.kv.v, v], dim=2)

    def commit(self) -> None:
        self.kv.append(self.k, self.v)


class ExitDecoder:
    """KV-cached decoding, batch size 1, with a per-token entropy exit at the loop boundaries."""

    def __init__(self, model, threshold: float | None, kv_policy: str = "propagate"):
        if kv_policy not in POLICIES:
            raise ValueError(f"kv_policy={kv_policy!r} must be one of {POLICIES}")
        self.model, self.threshold, self.kv_policy = model, threshold, kv_policy
        self.sched = model.schedule
        self.rope = (model.rope_cos, model.rope_sin)
        self.cache = KVCache()
        self._kv_w: dict[int, tuple] = {}  # loop layer index -> (wk, wv) rows of its fused qkv weight

    # -- pieces ---------------------------------------------------------------------------------------
    def _coda_head(self, h, kvs):
        for st, kv in zip(self.sched.coda_steps(), kvs):
            h = self.model.coda[st.index](h, self.rope, None, None, kv)[0]
        return self.model.head(self.model.norm(h))  # [1, 1, V]

    def _kv_weights(self, j: int):
        if j not in self._kv_w:
            a = self.model.loop[j].attn
            self._kv_w[j] = core.split_qkv_weight(a.qkv.weight, a.n_kv_local, a.q_per_kv, a.head_dim)[1:]
        return self._kv_w[j]

    def _fill_skipped(self, h, done: int) -> None:
        """KV entries of loop iterations done..R-1 for the position just decoded (it ran ``done``)."""
        sched, cache = self.sched, self.cache
        for it in range(done, sched.R):
            e_k = None
            if self.kv_policy == "propagate" and self.model.iter_embed is not None:
                e_k = self.model.iter_embed(it)
            for st in sched.loop_steps(it):
                if self.kv_policy == "copy":
                    last = cache.layer(st.layer, done - 1)
                    k, v = last.k[:, :, -1:], last.v[:, :, -1:]
                else:
                    blk = self.model.loop[st.index]
                    a = blk.attn
                    a_in, _ = blk.attention_input(h, e_k)  # [1, 1, d]
                    wk, wv = self._kv_weights(st.index)
                    pos = cache.layer(st.layer, it).length
                    cos, sin = self.rope[0][pos:pos + 1], self.rope[1][pos:pos + 1]  # [1, hd]
                    k = core.rotate(F.linear(a_in, wk).view(1, 1, a.n_kv_local, a.head_dim),
                                    cos[:, None], sin[:, None]).transpose(1, 2)  # [1, KV, 1, hd]
                    v = F.linear(a_in, wv).view(1, 1, a.n_kv_local, a.head_dim).transpose(1, 2)
                cache.layer(st.layer, it).append(k, v)

    # -- decoding -------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, s]: the full model over the prompt, into the cache -> logits of the last position [1, V]."""
        return self.model(ids, cache=self.cache).logits[:, -1]

    @torch.no_grad()
    def step(self, tok: torch.Tensor) -> tuple[torch.Tensor, int]:
        """tok [1, 1] (the next position) -> (logits [1, V], loop iterations run 1..R)."""
        if tok.shape != (1, 1):
            raise ValueError(f"ExitDecoder.step takes one token of one sequence ([1, 1]), got {tuple(tok.shape)}")
        m, sched, cache, thr = self.model, self.sched, self.cache, self.threshold
        h = m.embed(tok)  # [1, 1, d]
        for st in sched.prelude_steps():
            h = m.prelude[st.index](h, self.rope, None, None, cache.layer(st.layer, 0))[0]
        x0 = h
        R = sched.R
        for it in range(R):
            e_k = m.iter_embed(it) if m.iter_embed is not None else None
            for st in sched.loop_steps(it):
                if st.reinject:
                    h = reinjected(h, x0)
                h = m.loop[st.index](h, self.rope, e_k, None, cache.layer(st.layer, it))[0]
            if thr is not None and it < R - 1:  # a loop boundary: the exit read-out
                peeks = [_PeekKV(cache.layer(st.layer, 0)) for st in sched.coda_steps()]
                logits = self._coda_head(h, peeks)
                if float(core.entropy(logits)) <= thr:
                    for p in peeks:
                        p.commit()
                    self._fill_skipped(h, it + 1)
                    return logits[:, -1], it + 1
        logits = self._coda_head(h, [cache.layer(st.layer, 0) for st in sched.coda_steps()])
        return logits[:, -1], R


# ---------------------------------------------------------------------------------------------------
# Quality: teacher-forced sequential decoding over held-out text


@torch.no_grad()
def teacher_forced(model, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None,
                   threshold: float | None = None, kv_policy: str = "propagate", exit_after: int | None = None) -> dict:
    """Held-out CE of decoding ``tokens`` [b, s] position by position with the cache and the exit policy.

    ``threshold``: every position of every row goes through ``ExitDecoder.step`` (one row at a time), so
    the exits' KV effects on later positions are included. Else (full model, or a fixed ``exit_after``
    for every token): ``model(tokens, exit_after=k)`` in one pass, which equals the cached token-by-token
    decode exactly (tests/test_generate.py) since every position runs the same iterations.
    Returns {"ce_sum", "n", "exit_counts" [R] (tokens by loop iterations run), "logits" [b, s, V]}.
    """
    R = model.n_iters
    mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
    counts = torch.zeros(R, dtype=torch.long)
    if threshold is None:
        logits = model(tokens, exit_after=exit_after).logits
        counts[(exit_after or R) - 1] += tokens.numel()
    else:
        rows = []
        for r in range(tokens.shape[0]):
            dec = ExitDecoder(model, threshold, kv_policy)
            out = []
            for t in range(tokens.shape[1]):
                lg, k = dec.step(tokens[r:r + 1, t:t + 1])
                out.append(lg)
                counts[k - 1] += 1
            rows.append(torch.cat(out))  # [s, V]
        logits = torch.stack(rows)  # [b, s, V]
    ce = core.token_ce(logits, labels)  # [b, s]
    return {"ce_sum": float((ce * mask).sum()), "n": float(mask.sum()), "exit_counts": counts, "logits": logits}


def flops_saved(model, exit_frac: list[float], seq_len: int, kv_policy: str | None = "propagate",
                exit_after: int | None = None) -> dict:
    """FLOPs per token saved vs the full model (flops.py convention at attention context ``seq_len``).

    ``exit_after``: every token runs k iterations, one read-out (its output): saved = 1 - exec_fraction.
    Else the per-token policy with ``exit_frac[k-1]`` of the tokens stopping after iteration k: the
    read-out at every boundary a token passes is paid (exit_plan.flops_for_fractions; its "sequence" mode
    is exactly this decoder's execution under "copy", which costs nothing for the skipped KV), plus, for
    "propagate", the K/V of every skipped loop layer (``Costs.kv["loop"]``).
    Returns {"saved", "ideal_saved", "executed", "total"} (fractions of the full model; FLOPs/token)."""
    cfg = model.cfg
    plan, costs = make_plan(cfg, seq_len), step_costs(cfg, seq_len)
    if exit_after is not None:
        ex = plan.exec_fraction[exit_after - 1] * costs.total
        return {"saved": 1 - ex / costs.total, "ideal_saved": 1 - ex / costs.total, "executed": ex,
                "total": costs.total}
    f = flops_for_fractions(plan, costs, exit_frac, mode="sequence")
    executed = f["executed"]
    if kv_policy == "propagate":
        R = plan.n
        executed += sum(fr * (R - 1 - k) * cfg.n_loop * costs.kv["loop"] for k, fr in enumerate(exit_frac))
    return {"saved": 1 - executed / costs.total, "ideal_saved": f["ideal_saved"], "executed": executed,
            "total": costs.total}


def perplexity(ce_sum: float, n: float) -> float:
    return math.exp(ce_sum / max(n, 1.0))
