"""The exit-enabled forward: runs a LoopMoEModel boundary by boundary along an ExitPlan and skips the
remaining work of exited tokens (token mode: state propagation; sequence mode). See early_exit.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from loopmoe.analysis.exit_plan import ExitPlan, PlanStep, make_plan, step_costs
from loopmoe.model import core
from loopmoe.model.core import entropy
from loopmoe.model.schedule import reinjected



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
            self._qkv[key] = core.split_qkv_weight(a.qkv.weight, a.n_kv_local, a.q_per_kv, a.head_dim)
        return self._qkv[key]

    def _full(self, blk, h, e_k):
        return blk(h, (self.model.rope_cos, self.model.rope_sin), e_k)[0]

    def _partial(self, blk, h, active, e_k):
        """Token mode: the block for the running tokens; K/V only for the others (frozen state)."""
        b, s, d = h.shape
        a = blk.attn
        hd, H, KV = a.head_dim, a.n_kv_local * a.q_per_kv, a.n_kv_local
        a_in, mods = blk.attention_input(h, e_k)  # [b, s, d]; IterAdaLN modulation or None
        wq, wk, wv = self._split_qkv(blk)
        cos, sin = self.model.rope_cos[:s], self.model.rope_sin[:s]  # [s, hd]
        k = core.rotate(F.linear(a_in, wk).view(b, s, KV, hd), cos[:, None], sin[:, None]).transpose(1, 2)
        v = F.linear(a_in, wv).view(b, s, KV, hd).transpose(1, 2)  # [b, KV, s, hd]
        n = int(active.sum(1).max())
        pos = torch.arange(s, device=h.device).expand(b, s)
        srt = torch.where(active, pos, pos + s).sort(dim=1).values[:, :n]  # running positions first
        valid = srt < s  # [b, n]
        qpos = torch.where(valid, srt, torch.zeros_like(srt))
        a_q = a_in.gather(1, qpos[..., None].expand(b, n, d))  # [b, n, d]
        q = core.rotate(F.linear(a_q, wq).view(b, n, H, hd), cos[qpos][:, :, None], sin[qpos][:, :, None])
        mask = torch.arange(s, device=h.device)[None, None, :] <= qpos[:, :, None]  # [b, n, s]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                           scale=1.0 / math.sqrt(hd), enable_gqa=True)  # [b, H, n, hd]
        y = a.proj(y.transpose(1, 2).reshape(b, n, H * hd))[valid]  # [N, d], row-major = flat order
        flat = (torch.arange(b, device=h.device)[:, None] * s + qpos)[valid]  # [N]
        hf = h.reshape(b * s, d)
        x = hf[flat]

        def at(t):  # a modulation at the running tokens ([b, s, d]) or shared by all ("iter": [d])
            return t.reshape(b * s, d)[flat] if t.dim() == 3 else t

        x = blk.finish(x[None], y[None], [at(m) for m in mods] if mods is not None else None)[0][0]  # [N, d]
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
                if st.loop_start:
                    x0 = h  # the loop's input (prelude output), for re-injection
                if st.reinject:
                    h = reinjected(h, x0, active)
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
