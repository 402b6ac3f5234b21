"""Mixture-of-Experts FFN: our router, stacked SwiGLU experts, index dispatch (dropless by default).

    y, r = moe(x)          # x [b, s, d] -> y [b, s, d]; r: Routing (top-k, gates, load, lb, z)

Router (fp32): logits = x W_r^T [T, E]. Selection = top-k of (logits + bias), where ``bias`` is the
aux-loss-free balancing buffer (DeepSeek-V3; used for SELECTION only, zero unless aux_free_bias).
Gate weights: "topk_then_softmax" = softmax over the k selected logits (Mixtral; identical to
softmax-over-all then renormalise over the selected) or "softmax_then_topk" = softmax over all E,
taken at the selected experts, NOT renormalised (DeepSeek-V2 style; the gates sum to < 1).
Losses per pass: lb = E * sum_i f_i p_i (f_i = fraction of the T*k token-slots routed to i, p_i =
mean router probability of i; 1.0 when perfectly balanced), z = mean_t logsumexp(logits_t)^2.

Dispatch "index": sort the T*k token-slots by expert (stable argsort: within an expert, token order),
run each expert on its contiguous slice, scatter-add back weighted by the gates (index_add_, fp32).
Dropless unless capacity_factor > 0: then each expert keeps at most ceil(cf * T*k / E) slots, the
first ones by token position; a dropped slot contributes nothing (its gate is not redistributed;
the token still gets the shared experts and the residual). Dispatch "einsum": DeepSpeed's one-hot
gate (``deepspeed.moe.sharded_moe.topkgating`` on our logits, then einsum "sec,sm->ecm" and
"sec,ecm->sm"), kept as a baseline; it supports the plain router only (topk_then_softmax, no
aux-free bias, no forced routing). With a capacity it keeps the same slots (DeepSpeed's "position"
policy) but renormalises the gates over a token's kept slots.

Expert parallelism (ep_size > 1, helpers at the end of this file): this rank holds experts
[rank*E/ep, (rank+1)*E/ep) of DeepSpeed's expert-parallel group and exchanges token-slots with it by
an all-to-all (variable splits for "index", DeepSpeed's equal-split ``_AllToAll`` for "einsum").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loopmoe.model import core
from loopmoe.model.core import count_per_expert, group_rows, grouped_swiglu  # noqa: F401  (the maths lives in core)
from loopmoe.model.recompute import is_recomputing




@dataclass
class Routing:
    """What one MoE pass decided (T = tokens on this rank)."""

    logits: torch.Tensor  # [T, E] fp32
    topk: torch.Tensor  # [T, k] selected experts
    gates: torch.Tensor  # [T, k] fp32 weights
    load: torch.Tensor  # [E] token-slots per expert (before capacity drops)
    lb: torch.Tensor  # scalar, unweighted load-balancing loss
    z: torch.Tensor  # scalar, unweighted z-loss


class Router(nn.Module):
    # Buffers kept in fp32 when DeepSpeed trains the model in bf16 (deepspeed/runtime/keep_in_fp32.py, read
    # against 0.19.8: the transformers attribute, honoured by the engine's module cast even when
    # ``data_types.buffer_dtype`` asks for bf16 buffers). In bf16 an aux-free bias of |b| >= 0.5 would
    # swallow the 1e-3 updates (bf16 spacing there is 2^-8 .. 2^-7), and load counts above 256 would round.
    _keep_in_fp32_modules_strict = ["bias", "load_acc"]

    def __init__(self, cfg):
        super().__init__()
        self.n_experts, self.k = cfg.n_experts, cfg.top_k
        self.score, self.aux_free = cfg.router_score, cfg.aux_free_bias
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))  # W_r [E, d]
        nn.init.normal_(self.weight, 0.0, cfg.init_std)
        self.register_buffer("bias", torch.zeros(cfg.n_experts))  # aux-free bias, selection only
        self.register_buffer("load_acc", torch.zeros(cfg.n_experts), persistent=False)  # since last update

    def forward(self, x: torch.Tensor, forced_topk: torch.Tensor | None = None) -> Routing:
        T, E, k = x.shape[0], self.n_experts, self.k
        logits = F.linear(x.float(), self.weight.float())  # [T, E] fp32
        topk, gates, probs = core.route(logits, k, self.score, self.bias if self.aux_free else None,
                                        forced_topk)  # [T, k], [T, k], [T, E]
        load = count_per_expert(topk, E)  # [E]
        lb = E * (load.float() / (T * k) * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        if self.training and self.aux_free and not is_recomputing():  # a recompute must not count twice
            self.load_acc += load.detach().float()
        return Routing(logits, topk, gates, load.detach(), lb, z)

    @torch.no_grad()
    def update_bias(self, rate: float, groups=()) -> None:
        """b_i += rate * sign(mean_load - load_i) from the loads since the last call; then reset.
        Loads are first summed over each process group in ``groups`` (ranks must agree on the bias)."""
        load = self.load_acc
        for group in groups:
            if torch.distributed.get_world_size(group) > 1:
                torch.distributed.all_reduce(load, group=group)
        # No update without loads (no training pass since the last call); masked, not an ``if`` on a
        # device value, so the step does not wait for the GPU here.
        self.bias += rate * torch.sign(load.mean() - load) * (load.sum() > 0)
        load.zero_()


class Experts(nn.Module):
    """E_local SwiGLU experts as stacked weights: w1 [E_local, d, 2h] (gate | up), w2 [E_local, h, d].

    With ep_size > 1 they are marked as DeepSpeed expert parameters (``allreduce=False``,
    ``group_name="ep_size_{ep}"``, see deepspeed/moe/utils.py ``is_moe_param``) so that ZeRO reduces
    them over the expert-data-parallel group. Not at ep_size = 1: there that group is the data-parallel
    group (no difference), and DeepSpeed's engine only supplies its expert groups to ZeRO when it finds
    a ``deepspeed.moe.layer.MoE`` module (isinstance), so marked parameters of our MoE make ZeRO's
    gradient reduction fail (see docs/model.md, "Notes for the parallel / training code").
    """

    def __init__(self, cfg, ep_size: int, ep_rank: int, out_std: float):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.d_model, cfg.expert_hidden
        if d % 8 or h % 8:  # F.grouped_mm: 16-byte row strides (8 bf16 values), on every device
            up = lambda v: -(-v // 8) * 8  # noqa: E731
            raise ValueError(f"model.d_model={d} and model.expert_hidden={h} must be multiples of 8 (the grouped "
                             f"expert GEMM needs 16-byte rows in bf16): use e.g. d_model={up(d)}, "
                             f"expert_hidden={up(h)}")
        n = E // ep_size
        # Draw all E experts and keep this rank's slice: same weights at every EP size for one seed.
        w1 = torch.empty(E, d, 2 * h).normal_(0.0, cfg.init_std)[ep_rank * n:(ep_rank + 1) * n]
        w2 = torch.empty(E, h, d).normal_(0.0, out_std)[ep_rank * n:(ep_rank + 1) * n]
        self.w1, self.w2 = nn.Parameter(w1.clone()), nn.Parameter(w2.clone())
        self.align: int | None = None  # group row alignment; None: chosen by device (group_align)
        if ep_size > 1:  # see the class docstring for why not at ep_size=1
            for p in (self.w1, self.w2):
                p.allreduce = False
                p.group_name = f"ep_size_{ep_size}"

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, d] sorted by local expert, counts [E_local] (a device tensor) rows each -> [N, d].

        One grouped GEMM per weight (``F.grouped_mm``), never a per-expert loop over the stacked
        weights (each ``w1[e]`` select would materialise a zero gradient of the whole [E, d, 2h]
        tensor in the backward). No host synchronisation: the group offsets stay on the device.
        """
        return grouped_swiglu(x, counts, self.w1, self.w2, self.group_align(x))

    def group_align(self, x: torch.Tensor) -> int:
        """Row alignment of every expert's group: Hopper's grouped GEMM (TMA) wants each group to start
        at a 16-byte boundary (8 bf16 rows; torchtitan pads the same way); the CPU kernel does not."""
        if self.align is not None:  # set by tests to exercise the padding on the CPU
            return self.align
        return core.grouped_mm_align(x)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """x [E_local, C, d] (capacity buffer) -> [E_local, C, d]."""
        g, u = torch.bmm(x, self.w1).chunk(2, dim=-1)
        return torch.bmm(F.silu(g) * u, self.w2)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN from TP linears: w2(silu(w1 x) * w3 x). Also the shared experts."""

    def __init__(self, d: int, hidden: int, lin, std: float, out_std: float):
        super().__init__()
        if hidden % lin.tp:
            raise ValueError(f"FFN hidden width {hidden} must be divisible by TP={lin.tp}")
        self.w1 = lin.column(d, hidden, std)  # gate
        self.w3 = lin.column(d, hidden, std)  # up
        self.w2 = lin.row(hidden, d, out_std)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, d] -> [b, s, d]
        return core.swiglu(x, self.w1, self.w3, self.w2)


class MoE(nn.Module):
    def __init__(self, cfg, lin, out_std: float, ep_size: int = 1):
        super().__init__()
        if cfg.n_experts % ep_size:
            raise ValueError(f"model.n_experts={cfg.n_experts} must be divisible by EP={ep_size}")
        if cfg.dispatch == "einsum" and (cfg.aux_free_bias or cfg.router_score != "topk_then_softmax"):
            raise ValueError("model.dispatch='einsum' (DeepSpeed's gate) supports only "
                             "router_score='topk_then_softmax' without aux_free_bias")
        self.n_experts, self.k, self.ep_size = cfg.n_experts, cfg.top_k, ep_size
        self.n_local = cfg.n_experts // ep_size
        self.capacity_factor, self.dispatch = cfg.capacity_factor, cfg.dispatch
        self.ep_group = expert_group(ep_size) if ep_size > 1 else None
        ep_rank = torch.distributed.get_rank(self.ep_group) if ep_size > 1 else 0
        self.router = Router(cfg)
        self.experts = lin.experts(cfg, ep_size, ep_rank, out_std)  # stacked, or TE GroupedLinear
        h_shared = cfg.n_shared_experts * cfg.expert_hidden  # n SwiGLUs of width h == one of width n*h
        self.shared = SwiGLU(cfg.d_model, h_shared, lin, cfg.init_std, out_std) if h_shared else None

    def forward(self, x: torch.Tensor, forced_topk: torch.Tensor | None = None):
        b, s, d = x.shape
        xf = x.reshape(b * s, d)  # [T, d]
        r = self.router(xf, forced_topk)
        if self.dispatch == "einsum":
            if forced_topk is not None:
                raise ValueError("force_routing needs model.dispatch='index'")
            y = self._einsum(xf, r.logits)
        else:
            y = self._index(xf, r.topk, r.gates)
        y = y.view(b, s, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, r

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens * self.k / self.n_experts)

    def _index(self, x: torch.Tensor, topk: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        T, k = topk.shape
        order, counts = core.sort_by_expert(topk, self.n_experts)  # [T*k] slots by expert, [E]
        if self.capacity_factor > 0:
            starts = counts.cumsum(0) - counts  # first sorted position of each expert
            slot = torch.arange(T * k, device=topk.device)
            rank_in_expert = slot - starts.repeat_interleave(counts, output_size=T * k)
            keep = rank_in_expert < self.capacity(T)  # order[keep]: a host sync (the kept count)
            order, counts = order[keep], counts.clamp(max=self.capacity(T))
        token = order // k  # [N] source token of every kept slot
        xs = x[token]  # [N, d] token copies, sorted by expert
        if self.ep_size > 1:
            ys = run_experts(self.experts, xs, counts, self.ep_size, self.ep_group)
        else:
            ys = self.experts(xs, counts)  # [N, d]
        return core.combine_experts(x, token, ys, gates.reshape(-1)[order])  # [T, d]

    def _einsum(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        from deepspeed.moe.sharded_moe import einsum, topkgating

        cf = self.capacity_factor
        _, combine, dispatch_mask, _ = topkgating(  # combine [T, E, C] fp32, dispatch_mask bool
            logits, self.k, cf, min_capacity=0, drop_tokens=cf > 0, ep_group=self.ep_group,
            drop_policy="position")
        dispatched = einsum("sec,sm->ecm", dispatch_mask.to(x.dtype), x)  # [E, C, d]
        if self.ep_size > 1:
            out = run_experts_padded(self.experts, dispatched, self.ep_size, self.ep_group)
        else:
            out = self.experts.forward_padded(dispatched)  # [E, C, d]
        return einsum("sec,ecm->sm", combine.to(x.dtype), out)  # [T, d]


# ---------------------------------------------------------------------------------------------------
# Expert parallelism: DeepSpeed's expert groups + all-to-all. Kept here so the model file stays a model.


def expert_group(ep_size: int):
    """DeepSpeed's expert-parallel process group "ep_size_{ep}", looked up, never made here: the one
    constructor is loopmoe.parallel.groups.create_expert_groups (called by init_distributed before the
    model is built), so the model and ZeRO see the same layout. DeepSpeed's own constructor would lay the
    groups out differently from the training layout, so a missing group is an error, not a fallback."""
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.utils import groups

    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        raise RuntimeError(f"MoE with ep_size={ep_size}: no expert-parallel groups; call "
                           f"loopmoe.parallel.distributed.init_distributed(ep={ep_size}) (or megatron's "
                           f"parallel_state.initialize_model_parallel and then "
                           f"loopmoe.parallel.groups.create_expert_groups({ep_size})) before building the model")
    if not ds_comm.is_initialized():  # the all-to-all goes through DeepSpeed's comm layer
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    return groups._get_expert_parallel_group(name)


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with variable split sizes (rows), differentiable: backward swaps the splits.
    (DeepSpeed's ``_AllToAll`` is equal-split only; gloo and nccl both accept variable splits.)"""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        torch.distributed.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAllV.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def run_experts(experts: Experts, xs: torch.Tensor, counts: torch.Tensor, ep: int, group) -> torch.Tensor:
    """Dropless EP: xs [N, d] sorted by global expert with counts [E] -> expert outputs [N, d]."""
    n_local = counts.numel() // ep
    send = counts.view(ep, n_local)  # [ep, E_local] slots I send to each rank's experts
    recv = torch.empty_like(send)
    torch.distributed.all_to_all_single(recv, send.contiguous(), group=group)  # slots each rank sends me
    send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
    xr = _AllToAllV.apply(xs, recv_splits, send_splits, group)  # [M, d] by source rank, then expert
    expert_of_row = torch.arange(n_local, device=xs.device).repeat(ep).repeat_interleave(
        recv.reshape(-1), output_size=xr.shape[0])
    perm = expert_of_row.argsort(stable=True)  # group received rows by local expert
    ys_sorted = experts(xr[perm], recv.sum(0))
    yr = ys_sorted[perm.argsort()]  # back to (source rank, expert) order
    return _AllToAllV.apply(yr, send_splits, recv_splits, group)  # [N, d]


def run_experts_padded(experts: Experts, dispatched: torch.Tensor, ep: int, group) -> torch.Tensor:
    """Capacity-buffer EP (einsum baseline): [E, C, d] -> [E, C, d] with DeepSpeed's _AllToAll."""
    from deepspeed.moe.sharded_moe import _AllToAll

    E, C, d = dispatched.shape
    x = _AllToAll.apply(group, dispatched)  # [ep(source), E_local, C, d] flattened
    x = x.view(ep, E // ep, C, d).transpose(0, 1).reshape(E // ep, ep * C, d)  # [E_local, ep*C, d]
    y = experts.forward_padded(x)
    y = y.view(E // ep, ep, C, d).transpose(0, 1).reshape(E, C, d)
    return _AllToAll.apply(group, y)  # [E, C, d] back at the source
