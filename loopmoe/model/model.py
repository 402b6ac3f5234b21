"""LoopMoE: embedding -> prelude -> loop (shared layers, R iterations) -> coda -> RMSNorm -> LM head.

    P unique prelude layers, K shared loop layers run R = loop_iters times, C unique coda layers:
    executed layers P + R*K + C. Vanilla MoE: n_loop=0. Dense (looped or not): ffn="dense".
    Loop layers modulate their norms with IterAdaLN(iteration k, token state); with
    input_reinjection the loop input x0 is added back before every iteration after the first.

Shapes: b batch, s sequence, d d_model, V vocabulary, T = b*s tokens, E experts, k top-k, r adaln rank.
Spec: /work/shared/loopmoe-spec.md; docs: docs/model.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from loopmoe.model import core
from loopmoe.model.attention import Attention, KVCache, rope_cache
from loopmoe.model.iter_adaln import IterAdaLN, IterEmbed
from loopmoe.model.layers import Linears
from loopmoe.model.moe import MoE, SwiGLU
from loopmoe.model.recompute import MODES, checkpointed
from loopmoe.model.schedule import LoopSchedule, Step


@dataclass
class RoutingRecord:
    layer: int  # unique layer index in model.layers order
    iteration: int  # 0-based loop iteration (0 for prelude/coda layers)
    topk: torch.Tensor  # [T, k] experts chosen for each token
    load: torch.Tensor  # [E] token-slots per expert


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [b, s, V]
    loss: torch.Tensor | None = None  # lm_loss + aux_loss + sum_k w_k * exit_losses[k]
    lm_loss: torch.Tensor | None = None  # CE, mean over loss_mask
    aux_loss: torch.Tensor | None = None  # lb_loss_coef * lb_loss + z_loss_coef * z_loss
    lb_loss: torch.Tensor | None = None  # unweighted, summed over every executed MoE pass
    z_loss: torch.Tensor | None = None  # unweighted, summed over every executed MoE pass
    routing: list[RoutingRecord] = field(default_factory=list)
    exit_logits: list[torch.Tensor] | None = None  # logits after iteration 1..R (last == logits)
    exit_losses: list[torch.Tensor] | None = None  # CE at the early exits 1..R-1 (when labels given)


class Block(nn.Module):
    """Pre-norm transformer layer; with ``adaln`` (loop layers only) IterAdaLN modulates both norms."""

    def __init__(self, cfg, lin: Linears, out_std: float, adaln: bool, ep_size: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, lin, out_std)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.ffn == "moe":
            self.ffn = MoE(cfg, lin, out_std, ep_size)
        else:
            self.ffn = SwiGLU(cfg.d_model, cfg.dense_hidden, lin, cfg.init_std, out_std)
        small = cfg.init_std if cfg.adaln_init == "small" else None  # None: variance-preserving init
        self.adaln = (IterAdaLN(cfg.d_model, cfg.adaln_rank, cfg.adaln, cfg.adaln_gate, cfg.norm_eps, small)
                      if adaln else None)

    def forward(self, x, rope, e_k=None, forced_topk=None, kv=None, recompute="none"):
        # x [b, s, d] -> ([b, s, d], Routing | None); recompute: see loopmoe/model/recompute.py
        if recompute == "full":  # this executed layer keeps only its input; recomputed in backward
            return checkpointed(self.forward, x, rope, e_k, forced_topk, kv)
        sel = recompute == "selective"  # recompute the FFN and the attention core
        a_in, mods = self.attention_input(x, e_k)
        return self.finish(x, self.attn(a_in, *rope, kv, recompute_core=sel), mods, forced_topk, sel)

    # The two halves of forward, public for analysis (early_exit runs the attention on a token subset).
    def attention_input(self, x, e_k=None):
        """x [b, s, d] -> (attention input [b, s, d], IterAdaLN modulation: 6 tensors, or None)."""
        return core.attention_input(x, self.attn_norm, self.adaln, e_k)

    def finish(self, x, attn_out, mods, forced_topk=None, recompute=False):
        """Attention residual, then the FFN half: -> (x [b, s, d], Routing | None)."""
        return core.block_rest(x, attn_out, lambda f: self.ffn_out(f, forced_topk, recompute), self.ffn_norm,
                               self.adaln, mods)

    def ffn_out(self, x, forced_topk=None, recompute=False):
        """The FFN (MoE or dense) on its normed input: -> (y, Routing | None); ``recompute``: selective."""
        if isinstance(self.ffn, MoE):
            return checkpointed(self.ffn, x, forced_topk) if recompute else self.ffn(x, forced_topk)
        return (checkpointed(self.ffn, x) if recompute else self.ffn(x)), None


class LoopMoEModel(nn.Module):
    def __init__(self, cfg, *, ep_size: int = 1, sequence_parallel: bool = False, recompute: str = "none"):
        super().__init__()
        if recompute not in MODES:
            raise ValueError(f"recompute={recompute!r} must be one of {MODES} (train.recompute)")
        self.cfg = cfg
        self.recompute = recompute  # activation recompute per executed layer, training only
        lin = Linears(cfg, sequence_parallel)  # the only place that knows the linear backend
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_executed_layers)  # residual-branch outputs
        adaln = cfg.adaln != "none"

        def blocks(n, in_loop=False):
            return nn.ModuleList(Block(cfg, lin, out_std, adaln and in_loop, ep_size) for _ in range(n))

        self.embed = lin.embedding(cfg.vocab_size, cfg.d_model, cfg.init_std)
        self.prelude = blocks(cfg.n_prelude)
        self.loop = blocks(cfg.n_loop, in_loop=True)
        self.coda = blocks(cfg.n_coda)
        self.iter_embed = (IterEmbed(cfg.adaln_rank, cfg.init_std if cfg.adaln_init == "small" else None)
                           if cfg.n_loop and cfg.adaln in ("both", "iter") else None)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = lin.column(cfg.d_model, cfg.vocab_size, cfg.init_std, gather_output=True)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_seq_len, head_dim]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.schedule = LoopSchedule.from_config(cfg)  # the execution order (schedule.py)
        self.n_iters = self.schedule.R  # R (1 when there is no loop)
        self.sequence_parallel = lin.sequence_parallel
        lin.mark_sequence_parallel(self)

    @property
    def layers(self) -> list[Block]:
        """Unique blocks in order prelude, loop, coda (RoutingRecord.layer indexes this list)."""
        return [*self.prelude, *self.loop, *self.coda]

    def forward(self, tokens, labels=None, loss_mask=None, return_routing=False, exit_logits=False,
                exit_after=None, force_routing=None, cache: KVCache | None = None) -> ModelOutput:
        """``cache``: a KVCache for incremental decoding; ``tokens`` are then the new positions only."""
        cfg = self.cfg
        n_iters = self.schedule.check_exit(exit_after)
        want_exit_losses = labels is not None and any(w != 0 for w in cfg.exit_loss_weights)
        run = _Run(self, force_routing or {}, return_routing, cache)

        h = self.embed(tokens)  # [b, s, d]
        exits = []  # logits after iterations 1..n_iters-1, [b, s, V] each
        read_exit = (lambda it, h: exits.append(self._coda_head(h, run, record=False))  # early exit read-out
                     if exit_logits or want_exit_losses else None)
        h = self.schedule.prelude(h, run.layer)
        h = self.schedule.loop(h, run.layer, self.iter_embed, n_iters, read_exit)
        logits = self._coda_head(h, run, record=True)  # [b, s, V]

        out = ModelOutput(logits=logits, lb_loss=run.lb, z_loss=run.z, routing=run.records,
                          exit_logits=[*exits, logits] if exit_logits else None)
        out.aux_loss = cfg.lb_loss_coef * run.lb + cfg.z_loss_coef * run.z
        if labels is not None:
            out.lm_loss = lm_loss(logits, labels, loss_mask)
            out.loss = out.lm_loss + out.aux_loss
            if exits:
                out.exit_losses = [lm_loss(x, labels, loss_mask) for x in exits]
                for w, l in zip(cfg.exit_loss_weights, out.exit_losses):
                    out.loss = out.loss + w * l
        return out

    def _coda_head(self, h, run, record: bool):
        h = self.schedule.coda(h, run.layer if record else run.layer_unrecorded)
        return self.head(self.norm(h))  # [b, s, V]

    @torch.no_grad()
    def update_router_biases(self, groups=None) -> None:
        """Aux-loss-free balancing step (call after optimizer.step()): b_i += rate*sign(mean - load_i)
        per router, from the loads of every training pass since the last call. Loads are summed over
        ``groups`` first so all ranks keep the same bias; default: megatron's data-parallel group, plus
        the TP group under sequence parallelism (TP ranks then route different tokens)."""
        if not (self.cfg.ffn == "moe" and self.cfg.aux_free_bias):
            return
        if groups is None:
            groups = []
            # Whatever the linear backend: with linear_backend="torch" at DP>1 the loads were once not
            # summed and every rank drifted to its own bias.
            if torch.distributed.is_initialized():
                from megatron.core import parallel_state as ps

                if ps.model_parallel_is_initialized():
                    groups.append(ps.get_data_parallel_group())
                    if self.sequence_parallel:
                        groups.append(ps.get_tensor_model_parallel_group())
                elif torch.distributed.get_world_size() > 1:
                    raise RuntimeError("update_router_biases: several processes but no megatron parallel_state "
                                       "to sum the loads over; pass groups=[...] or call init_distributed first")
        for blk in self.layers:
            blk.ffn.router.update_bias(self.cfg.aux_free_rate, groups)


class _Run:
    """Per-forward bookkeeping: forced routing lookup, aux-loss sums, routing records. ``layer`` is the
    schedule's run_layer; every executed layer of the training model and of a pipeline stage goes
    through ``block`` (the one place to wrap an executed layer, e.g. for recompute)."""

    def __init__(self, model: nn.Module, force: dict, return_routing: bool, cache: KVCache | None):
        self.model, self.force, self.return_routing, self.cache = model, force, return_routing, cache
        self.lb = torch.zeros((), device=model.rope_cos.device)
        self.z = torch.zeros((), device=model.rope_cos.device)
        self.records: list[RoutingRecord] = []

    def _blk(self, st: Step) -> Block:
        mods = getattr(self.model, st.kind)  # a ModuleList, or a pipeline stage's ModuleDict slice
        return mods[str(st.index)] if isinstance(mods, nn.ModuleDict) else mods[st.index]

    def layer(self, st: Step, h, e_k=None):
        return self.block(self._blk(st), st.layer, st.iteration, h, e_k)

    def layer_unrecorded(self, st: Step, h, e_k=None):  # an early-exit read-out's coda
        return self.block(self._blk(st), st.layer, st.iteration, h, e_k, record=False)

    def block(self, blk: Block, layer: int, it: int, h, e_k=None, record: bool = True):
        forced = self.force.get((layer, it)) if record else None
        rope = (self.model.rope_cos, self.model.rope_sin)
        kv = self.cache.layer(layer, it) if self.cache is not None and record else None
        h, r = blk(h, rope, e_k, forced, kv, recompute=self.model.recompute if kv is None else "none")
        if r is not None:  # every executed MoE pass counts for the aux losses
            self.lb, self.z = self.lb + r.lb, self.z + r.z
            if record and self.return_routing:
                self.records.append(RoutingRecord(layer, it, r.topk, r.load))
        return h


LayerRunner = _Run  # the public name (the pipeline stage runs its layers through it too)


def lm_loss(logits, labels, loss_mask=None):
    """Cross-entropy (fp32) averaged over loss_mask; labels are already shifted (next tokens)."""
    return core.masked_ce(logits, labels, loss_mask)
