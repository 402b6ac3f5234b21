"""Early exit at loop boundaries by an output-entropy threshold, with MEASURED throughput; logit lens.

    python -m loopmoe.analysis.early_exit --checkpoint runs/demo/checkpoints --out runs/demo/early_exit
    python -m loopmoe.analysis.early_exit --checkpoint ... --data data/demo/python_docs_text_document \\
        --tokenizer data/demo/tokenizer.model --thresholds 1,2,3,4 --mode both
    python -m loopmoe.analysis.early_exit --checkpoint runs/vanilla/checkpoints --match-config configs/tiny_loopmoe.yaml

Boundaries (``ExitPlan``):
* looped model (n_loop > 0, R = loop_iters > 1): after every loop iteration k = 1..R. The read-out at
  boundary k is what ``model(exit_after=k)`` computes: coda + final norm + LM head on the state after k
  iterations (spec section 5). Boundary R is the normal output.
* non-looped model (Vanilla MoE, dense): after layer L_k, read out by the final norm + LM head alone
  (there is no coda to run). L_k is the layer count whose executed-FLOP fraction (flops.py convention,
  head included) is closest to the fraction a looped model executes when it exits at its boundary k:
  ``--match-config`` names that looped model (compare.py passes tiny_loopmoe's), else the spec's layout
  is assumed (middle third looped twice: exiting after iteration 1 runs 3/4 of the layers).

Decision: at boundary k < last, a token exits when the entropy (nats) of its read-out distribution is
<= the threshold; its read-out is then its output. Two executions, both real code that skips work:
* ``token`` mode (default), state propagation: an exited token's hidden state is frozen. Later layers
  still need its keys/values (causal attention of the tokens still running reads every earlier
  position), so for exited tokens a later layer computes ONLY its K/V projection (plus the IterAdaLN
  modulation feeding it) from the frozen state; queries, attention output, FFN / MoE and the residual
  update run for the running tokens only, gathered into a compact batch. In the coda, an exited token
  keeps the coda states of its own read-out (as a KV cache would). This changes what running tokens
  attend to (frozen instead of updated states of exited tokens), so the perplexity is that of this
  approximation; with no early exit, or everyone exiting at the first boundary, the outputs equal the
  model's exactly (tested).
* ``sequence`` mode: a whole sequence exits when the MEAN entropy of its tokens is <= the threshold,
  and later iterations run on the remaining sequences only (exact: an exited sequence's outputs are
  ``model(exit_after=k)``'s).
tokens/s = scored tokens / wall time of the exit-enabled forward (read-outs, entropies, gathers and
all) over the held-out batches, min over ``--repeats`` runs per batch, measured interleaved with the
plain forward ``model(tokens)`` (the no-exit baseline) in the same process and threads. Every exit
read-out costs coda + head FLOPs for the tokens still running: at small scale the head is a large
share of the model, so the NET FLOP saving (read-outs and propagated K/V included) is reported beside
the IDEAL one (skipped layers only, the usual paper number). See docs/analysis.md.
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loopmoe import flops
from loopmoe.analysis.logit_lens import LensAccumulator, entropy, token_ce

# ---------------------------------------------------------------------------------------------------
# The plan: which layers run between boundaries, and what one read-out costs


@dataclass
class PlanStep:
    kind: str  # "prelude" | "loop" | "coda": the model's ModuleList
    index: int  # index in that ModuleList
    layer: int  # unique layer index (model.layers order)
    iteration: int = 0  # loop iteration (0-based)
    reinject: bool = False  # add the loop input x0 before this step (input_reinjection)


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
    P, K, C = cfg.n_prelude, cfg.n_loop, cfg.n_coda
    pre = [PlanStep("prelude", i, i) for i in range(P)]
    iters = [[PlanStep("loop", j, P + j, it, reinject=(j == 0 and it > 0 and cfg.input_reinjection))
              for j in range(K)] for it in range(cfg.loop_iters if K else 0)]
    coda = [PlanStep("coda", c, P + K + c) for c in range(C)]
    return pre, iters, coda


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


# ---------------------------------------------------------------------------------------------------
# The exit-enabled forward


def _rope(x, cos, sin):  # x [..., hd]; cos/sin broadcastable (rotate-half, as loopmoe/model/attention.py)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def exit_decision(logits: torch.Tensor, threshold: float, mode: str = "token", seq_len: int | None = None
                  ) -> torch.Tensor:
    """logits [N, V] of the running tokens -> [N] bool: exit here. token: entropy (nats) <= threshold;
    sequence: the N tokens are whole rows of ``seq_len``, a row exits when its MEAN entropy <= threshold."""
    ent = entropy(logits)  # [N]
    if mode == "token":
        return ent <= threshold
    s = seq_len or ent.numel()
    return (ent.view(-1, s).mean(1) <= threshold).repeat_interleave(s)


@dataclass
class ExitResult:
    logits: torch.Tensor  # [b, s, V] each token's output (its read-out at its exit boundary)
    exit_at: torch.Tensor  # [b, s] boundary index (0-based) where each token exited
    flops: float  # FLOPs executed for the batch (by the cost table)
    readouts: list[torch.Tensor] = field(default_factory=list)  # with collect=True: every boundary's logits


class ExitRunner:
    """Runs a LoopMoEModel boundary by boundary, skipping the remaining work of exited tokens."""

    def __init__(self, model, plan: ExitPlan | None = None, seq_len: int | None = None,
                 match_fractions: list[float] | None = None):
        self.model = model
        cfg = model.cfg
        self.seq_len = seq_len or cfg.max_seq_len
        self.plan = plan or make_plan(cfg, self.seq_len, match_fractions)
        self.costs = step_costs(cfg, self.seq_len)
        self._qkv: dict[int, tuple] = {}

    def _block(self, st: PlanStep):
        return getattr(self.model, st.kind)[st.index]

    def _split_qkv(self, blk):
        """q and k/v rows of the fused qkv weight (layout: KV groups of [q_1..q_{H/KV}, k, v] x hd)."""
        key = id(blk)
        if key not in self._qkv:
            a = blk.attn
            w = a.qkv.weight  # [n_qkv, d]
            g = w.view(a.n_kv_local, a.q_per_kv + 2, a.head_dim, -1)
            self._qkv[key] = (g[:, :-2].reshape(-1, w.shape[1]).contiguous(),
                              g[:, -2].reshape(-1, w.shape[1]).contiguous(),
                              g[:, -1].reshape(-1, w.shape[1]).contiguous())
        return self._qkv[key]

    def _full(self, blk, h, e_k):
        return blk(h, (self.model.rope_cos, self.model.rope_sin), e_k)[0]

    def _partial(self, blk, h, active, e_k):
        """Token mode: the block for the running tokens; K/V only for the others (frozen state)."""
        b, s, d = h.shape
        a = blk.attn
        hd, H, KV = a.head_dim, a.n_kv_local * a.q_per_kv, a.n_kv_local
        if blk.adaln is not None:
            shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = blk.adaln(h, e_k)
            a_in = blk.attn_norm(h) * (1 + scale_a) + shift_a  # [b, s, d]
        else:
            a_in = blk.attn_norm(h)
        wq, wk, wv = self._split_qkv(blk)
        cos, sin = self.model.rope_cos[:s], self.model.rope_sin[:s]  # [s, hd]
        k = _rope(F.linear(a_in, wk).view(b, s, KV, hd), cos[:, None], sin[:, None]).transpose(1, 2)
        v = F.linear(a_in, wv).view(b, s, KV, hd).transpose(1, 2)  # [b, KV, s, hd]
        n = int(active.sum(1).max())
        pos = torch.arange(s, device=h.device).expand(b, s)
        srt = torch.where(active, pos, pos + s).sort(dim=1).values[:, :n]  # running positions first
        valid = srt < s  # [b, n]
        qpos = torch.where(valid, srt, torch.zeros_like(srt))
        a_q = a_in.gather(1, qpos[..., None].expand(b, n, d))  # [b, n, d]
        q = _rope(F.linear(a_q, wq).view(b, n, H, hd), cos[qpos][:, :, None], sin[qpos][:, :, None])
        mask = torch.arange(s, device=h.device)[None, None, :] <= qpos[:, :, None]  # [b, n, s]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                           scale=1.0 / math.sqrt(hd), enable_gqa=True)  # [b, H, n, hd]
        y = a.proj(y.transpose(1, 2).reshape(b, n, H * hd))[valid]  # [N, d], row-major = flat order
        flat = (torch.arange(b, device=h.device)[:, None] * s + qpos)[valid]  # [N]
        hf = h.reshape(b * s, d)
        x = hf[flat]

        def at(t):  # a modulation at the running tokens ([b, s, d]) or shared by all ("iter": [d])
            return t.reshape(b * s, d)[flat] if t.dim() == 3 else t

        if blk.adaln is not None:
            x = x + blk.adaln.gate(at(gate_a)) * y
            f_in = blk.ffn_norm(x) * (1 + at(scale_f)) + at(shift_f)
            x = x + blk.adaln.gate(at(gate_f)) * blk._ffn(f_in[None], None)[0][0]
        else:
            x = x + y
            x = x + blk._ffn(blk.ffn_norm(x)[None], None)[0][0]
        out = hf.clone()
        out[flat] = x
        return out.view(b, s, d)

    def _step(self, st: PlanStep, h, active, mode: str, gather: bool, e: dict):
        blk = self._block(st)
        e_k = e.get(st.iteration) if st.kind == "loop" else None
        n_act, T = int(active.sum()), active.numel()
        self._flops += n_act * self.costs.full[st.kind]
        if n_act == T:
            return self._full(blk, h, e_k)
        if mode == "sequence":
            rows = active.any(1)
            out = h.clone()
            out[rows] = self._full(blk, h[rows], e_k)
            return out
        self._flops += (T - n_act) * self.costs.kv[st.kind]
        if not gather:  # reference: the whole block for everyone, frozen states kept for the exited
            return torch.where(active[..., None], self._full(blk, h, e_k), h)
        return self._partial(blk, h, active, e_k)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, threshold: float | None = None, mode: str = "token",
            gather: bool = True, collect: bool = False) -> ExitResult:
        """tokens [b, s]. ``threshold`` None: nobody exits before the last boundary (read-outs are still
        computed at every boundary). ``collect``: return every boundary's read-out (needs threshold None).
        ``gather=False`` computes the same function by running whole blocks and masking (test reference)."""
        if mode not in ("token", "sequence"):
            raise ValueError(f"mode={mode!r}: use token or sequence")
        if collect and threshold is not None:
            raise ValueError("collect=True needs threshold=None (every token must reach every boundary)")
        m, plan = self.model, self.plan
        b, s = tokens.shape
        self._flops = 0.0
        e = {}
        if m.iter_embed is not None:
            e = {it: m.iter_embed(it) for it in range(m.cfg.loop_iters)}
        h = m.embed(tokens)
        active = torch.ones(b, s, dtype=torch.bool, device=tokens.device)
        logits = None
        exit_at = torch.full((b, s), plan.n - 1, dtype=torch.long, device=tokens.device)
        cache: list[torch.Tensor | None] = [None] * len(plan.readout)  # coda inputs of exited tokens
        readouts = []
        x0 = None
        for k, seg in enumerate(plan.segments):
            for st in seg:
                if st.kind == "loop" and st.iteration == 0 and st.index == 0:
                    x0 = h  # the loop's input (prelude output), for re-injection
                if st.reinject:
                    h = torch.where(active[..., None], h + x0, h)
                h = self._step(st, h, active, mode, gather, e)
            g, ins = h, []
            for c, st in enumerate(plan.readout):
                if cache[c] is not None and mode == "token":
                    g = torch.where(active[..., None], g, cache[c])
                ins.append(g)
                g = self._step(st, g, active, mode, gather, e)
            n_act = int(active.sum())
            self._flops += n_act * self.costs.head
            everyone = n_act == b * s
            lg = m.head(m.norm(g if everyone else g[active][None]))  # [b, s, V] or [1, N, V]: running only
            lg = lg.reshape(n_act, -1)  # [N, V]
            if collect:
                readouts.append(lg.view(b, s, -1))
            if k == plan.n - 1 or threshold is None:
                ex = torch.full((n_act,), k == plan.n - 1, dtype=torch.bool, device=lg.device)
            else:  # in sequence mode the running tokens are complete rows of s tokens
                ex = exit_decision(lg, threshold, mode, s)
            n_ex = int(ex.sum())
            if everyone and n_ex == n_act:  # the whole batch exits here: no copies
                logits = lg.view(b, s, -1)
                exit_at.fill_(k)
                break
            exiting = torch.zeros_like(active)
            exiting[active] = ex
            if logits is None:
                logits = lg.new_empty(b, s, lg.shape[-1])
            logits[exiting] = lg[ex]
            exit_at[exiting] = k
            if mode == "token" and bool(ex.any()):
                for c, inp in enumerate(ins):
                    base = cache[c] if cache[c] is not None else torch.zeros_like(inp)
                    cache[c] = torch.where(exiting[..., None], inp, base)
            active = active & ~exiting
            if not bool(active.any()):
                break
        return ExitResult(logits, exit_at, self._flops, readouts)


# ---------------------------------------------------------------------------------------------------
# Sweep, logit lens, timing


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def auto_thresholds(runner: ExitRunner, batches, mode: str,
                    quantiles=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)) -> list[float]:
    """Entropy thresholds at quantiles of the first boundary's read-out entropy (per token, or per
    sequence mean in sequence mode), so the sweep spans few to most tokens exiting."""
    vals = []
    for bt in batches:
        lg = runner.run(bt["tokens"], collect=True).readouts[0]
        ent = entropy(lg)  # [b, s]
        vals.append(ent.flatten() if mode == "token" else ent.mean(1))
    v = torch.cat(vals)
    return [round(float(v.quantile(q)), 4) for q in quantiles]


@torch.no_grad()
def logit_lens(runner: ExitRunner, batches, converged_jsd: float = 0.5) -> dict:
    acc = LensAccumulator(runner.plan.names, converged_jsd)
    for bt in batches:
        acc.add(runner.run(bt["tokens"], collect=True).readouts, bt["labels"], bt["loss_mask"])
    return {"boundaries": acc.result(), "converged_jsd": converged_jsd,
            "jsd_values": {n: torch.cat(v).tolist() for n, v in acc.jsd_values.items()}}


@torch.no_grad()
def sweep(runner: ExitRunner, batches, thresholds: list[float | None], mode: str = "token",
          repeats: int = 3) -> dict:
    """Per threshold: exit fractions per boundary, perplexity, ideal/net FLOPs saved, measured tokens/s.
    The plain forward (no exit) is timed interleaved with every threshold's run."""
    model, plan = runner.model, runner.plan
    n_tok = sum(bt["tokens"].numel() for bt in batches)
    rows = []
    base_times = []
    for thr in thresholds:
        counts = torch.zeros(plan.n)
        ce_sum, m_sum, fl, t_exit, t_base = 0.0, 0.0, 0.0, 0.0, 0.0
        for bt in batches:
            tok = bt["tokens"]
            tb, te = [], []
            for _ in range(repeats):
                tb.append(_time(lambda: model(tok)))
                res = None

                def go():
                    nonlocal res
                    res = runner.run(tok, thr, mode)

                te.append(_time(go))
            t_base += min(tb)
            t_exit += min(te)
            mask = bt["loss_mask"].float()
            ce_sum += (token_ce(res.logits, bt["labels"]) * mask).sum().item()
            m_sum += mask.sum().item()
            counts += torch.bincount(res.exit_at.flatten(), minlength=plan.n).float()
            fl += res.flops
        frac = (counts / counts.sum()).tolist()
        base_times.append(t_base)
        rows.append({
            "threshold": thr, "exit_frac": frac,
            "ppl": math.exp(ce_sum / max(m_sum, 1.0)), "loss": ce_sum / max(m_sum, 1.0),
            **{k: v for k, v in flops_for_fractions(plan, runner.costs, frac, mode).items() if k == "ideal_saved"},
            "net_saved": 1.0 - fl / (n_tok * runner.costs.total),
            "tokens_per_s": n_tok / t_exit, "base_tokens_per_s": n_tok / t_base,
            "speedup": t_base / t_exit,
        })
    base_tps = n_tok / sorted(base_times)[len(base_times) // 2]
    return {"mode": mode, "boundaries": plan.names, "exec_fraction": plan.exec_fraction, "rows": rows,
            "base_tokens_per_s": base_tps, "tokens": n_tok, "repeats": repeats}


def project(plan_cfg, seq_len: int, rows: list[dict], mode: str) -> list[dict]:
    """The FLOP savings of the measured exit fractions on another (larger) config's cost shares."""
    plan, costs = make_plan(plan_cfg, seq_len), step_costs(plan_cfg, seq_len)
    out = []
    for r in rows:
        if len(r["exit_frac"]) != plan.n:
            return []
        out.append({"threshold": r["threshold"], **flops_for_fractions(plan, costs, r["exit_frac"], mode)})
    return out


# ---------------------------------------------------------------------------------------------------
# Report


def _thr(t) -> str:
    if t is None:
        return "none"
    if t == math.inf:
        return "inf"
    return f"{t:.4g}"


def markdown(result: dict) -> str:
    lines = []
    lens = result.get("logit_lens")
    if lens:
        lines += [f"Logit lens (read-out at each boundary vs the final output; converged = normalised JSD < "
                  f"{lens['converged_jsd']}):", "",
                  "| boundary | FLOP fraction | loss | ppl | mean JSD / ln2 | converged | top-1 = final | entropy |",
                  "|---|---|---|---|---|---|---|---|"]
        for b, f in zip(lens["boundaries"], result["plan"]["exec_fraction"]):
            lines.append(f"| {b['boundary']} | {f:.3f} | {b['loss']:.4f} | {b['ppl']:.2f} | {b['jsd']:.4f} | "
                         f"{100 * b['converged']:.1f}% | {100 * b['top1_agree']:.1f}% | {b['entropy']:.3f} |")
        lines.append("")
    for sw in result["sweeps"]:
        names = sw["boundaries"]
        lines += [f"Entropy-threshold sweep, {sw['mode']} mode ({sw['tokens']:,} held-out tokens; plain forward "
                  f"{sw['base_tokens_per_s']:,.0f} tokens/s; min of {sw['repeats']} runs per batch):", "",
                  "| threshold (nats) | " + " | ".join(f"exit @ {n}" for n in names)
                  + " | ppl | FLOPs saved ideal | FLOPs saved net | tokens/s | vs plain forward |",
                  "|---" * (len(names) + 6) + "|"]
        for r in sw["rows"]:
            lines.append(f"| {_thr(r['threshold'])} | " + " | ".join(f"{100 * f:.1f}%" for f in r["exit_frac"])
                         + f" | {r['ppl']:.2f} | {100 * r['ideal_saved']:.1f}% | {100 * r['net_saved']:.1f}% | "
                         f"{r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x |")
        if sw.get("projected"):
            lines += ["", f"Same exit fractions on {sw['projected_name']}'s FLOP shares: "
                      + ", ".join(f"thr {_thr(p['threshold'])}: ideal {100 * p['ideal_saved']:.1f}% / net "
                                  f"{100 * p['net_saved']:.1f}%" for p in sw["projected"] if p["threshold"]
                                  not in (None,))]
        lines.append("")
    return "\n".join(lines)


def analyse(model, cfg, batches, thresholds=None, modes=("token",), repeats=3, converged_jsd=0.5,
            match_fractions=None, project_cfg=None, project_name="") -> dict:
    seq_len = batches[0]["tokens"].shape[1]
    runner = ExitRunner(model, seq_len=seq_len, match_fractions=match_fractions)
    plan = runner.plan
    if plan.n < 2:
        raise SystemExit("error: this model has a single boundary (no loop iterations to exit between and one "
                         "layer); nothing to sweep")
    result = {"plan": {"boundaries": plan.names, "exec_fraction": plan.exec_fraction, "looped": plan.looped,
                       "segments": [[f"{s.kind}.{s.index}@{s.iteration}" for s in seg] for seg in plan.segments]},
              "logit_lens": logit_lens(runner, batches, converged_jsd), "sweeps": []}
    for mode in modes:
        thr = list(thresholds) if thresholds else auto_thresholds(runner, batches, mode)
        thr = [None] + sorted(set(thr)) + [math.inf]
        sw = sweep(runner, batches, thr, mode, repeats)
        if project_cfg is not None:
            sw["projected"] = project(project_cfg, seq_len, sw["rows"], mode)
            sw["projected_name"] = project_name
        result["sweeps"].append(sw)
    return result


def main(argv: list[str] | None = None) -> int:
    from loopmoe.analysis.data import add_data_args, batches_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    add_data_args(ap)
    ap.add_argument("--thresholds", help="comma-separated entropy thresholds in nats (default: quantiles of the "
                                         "first boundary's entropy); 'none' and 'inf' are always added")
    ap.add_argument("--mode", default="token", choices=["token", "sequence", "both"],
                    help="token: per-token exit with state propagation; sequence: whole sequences (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats per batch, min taken (default: %(default)s)")
    ap.add_argument("--converged-jsd", type=float, default=0.5, help="normalised-JSD threshold of 'converged'")
    ap.add_argument("--match-config", help="non-looped model: a looped config (YAML) whose loop-boundary FLOP "
                                           "fractions pick the exit layers (default: the spec's 3/4)")
    ap.add_argument("--project-config", help="also report the FLOP savings of the measured exit fractions on this "
                                             "config's cost shares (e.g. configs/loopmoe_3b.yaml)")
    ap.add_argument("--out", required=True, help="output directory (early_exit.json/.md, PNGs)")
    ap.add_argument("--name", default="", help="prefix of the output file names")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from loopmoe.config import load_config
    from loopmoe.train.checkpoint import load_trained_model

    model, cfg = load_trained_model(args.checkpoint)
    batches = batches_from_args(args, cfg)
    seq_len = batches[0]["tokens"].shape[1]
    match = loop_fractions(load_config(args.match_config).model, seq_len) if args.match_config else None
    proj = load_config(args.project_config).model if args.project_config else None
    thresholds = None
    if args.thresholds:
        thresholds = [float(x) for x in args.thresholds.split(",") if x.strip() not in ("", "none", "inf")]
    modes = ("token", "sequence") if args.mode == "both" else (args.mode,)
    res = analyse(model, cfg, batches, thresholds, modes, args.repeats, args.converged_jsd, match, proj,
                  os.path.basename(args.project_config or ""))
    os.makedirs(args.out, exist_ok=True)
    pre = f"{args.name}_" if args.name else ""
    write(res, args.out, pre, title=args.checkpoint)
    print(markdown(res))
    print(f"wrote {os.path.join(args.out, pre + 'early_exit.md')} and PNGs", file=sys.stderr)
    return 0


def jsonable(o):
    """JSON-safe copy: inf/nan floats as strings, tuple keys as strings."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    return o


def write(res: dict, out: str, prefix: str = "", title: str = "") -> list[str]:
    from loopmoe.analysis import plots

    os.makedirs(out, exist_ok=True)
    slim = {k: v for k, v in res.items() if k != "logit_lens"}
    slim["logit_lens"] = {k: v for k, v in res["logit_lens"].items() if k != "jsd_values"}
    with open(os.path.join(out, prefix + "early_exit.json"), "w") as f:
        json.dump(jsonable(slim), f, indent=1)
    with open(os.path.join(out, prefix + "early_exit.md"), "w") as f:
        f.write(f"# Early exit: {title}\n\n" + markdown(res) + "\n")
    pngs = [os.path.join(out, prefix + "early_exit.png"), os.path.join(out, prefix + "logit_lens.png")]
    plots.early_exit_figure(res, pngs[0], title)
    plots.logit_lens_figure(res, pngs[1], title)
    return pngs


if __name__ == "__main__":
    sys.exit(main())
