"""Per-GPU memory estimate of a training layout: model states by ZeRO stage and EP, activations per
micro-batch with and without recompute, the busiest EP rank, the allocator's margin, the CUDA context and
NCCL buffers, the largest buffers, and the total against the device.

    python -m loopmoe.memory                 # both presets at their Slurm layouts vs 80% of 80 GB (exit 1: no fit)
    python -m loopmoe.memory configs/loopmoe_9b.yaml parallel.ep=8 --world 32 [--device-gb 80] [--imbalance 1.4]
    est = estimate(cfg, layout)            # Estimate; est.total(mode) / .allocated(mode) / .reserved(mode), bytes

Model states (per rank; dense parameters split over TP (attention, shared experts, dense FFN,
embedding, head; norms/router/IterAdaLN replicated) and the pipeline stage, routed experts over EP;
the ZeRO partition N = DP for dense and DP/EP (expert-DP) for expert parameters):
  fp32, ZeRO 0        weights 4 + grads 4 + Adam moments 8 B/param (torch AdamW, replicated)
  fp32, ZeRO 1/2      weights 4 + grads 4 (ZeRO 2: 4/N + a reduce bucket) + fp32 master 4/N + Adam 8/N
  bf16/fp8, ZeRO 1/2  weights 2 + fp32 grads 4 (ZeRO 2: 4/N + an fp32 bucket) + fp32 master 4/N + Adam 8/N
                      (fp32 gradient accumulation and reduction; ZeRO 1 is DeepSpeed's BF16_Optimizer)
Gradients are counted during the forward/backward only when they are already there: grad_accum > 1
(later micro-batches run on the accumulated ones) or PP > 1; with one micro-batch DeepSpeed frees them
at the step and the backward allocates them while it frees activations (measured CPU peaks of such
runs sometimes held one gradient-sized buffer more, freed at a varying moment). The optimizer step
(phase B) adds its temporaries (one fp32 copy of the partition: the fp32 gradient partition / foreach
temporaries; ZeRO 0: the all-reduce bucket) after the activations are gone; the total is the larger
of the two phases.

Activations: the tensors autograd keeps for backward, per token, derived from the saved tensors of
our layers (norm input and normalised input, qkv, q/k after RoPE, SDPA output and log-sum-exp: flash
kernels, nothing grows with s^2; the router's fp32 logits and probabilities; per token-slot k x (the
token copy, gate|up, SiLU, activation, and the combine's saved expert output and gate); the shared
expert's four hidden vectors; IterAdaLN's modulations). Tokens per rank: micro_batch x seq_len (÷ TP
for the residual stream and the MoE under sequence parallelism). The MoE combine keeps the expert
outputs [k*T, d] in the activation dtype, the fp32 gates and int64 indices (no fp32 [k*T, d] copy).
Under EP the rows a rank's experts run (the grouped GEMM's input copy, gate|up, SiLU, their product, the
row maps) scale with its routed load: the busiest rank runs ``imbalance`` x the mean (IMBALANCE,
measured, see docs/memory.md); its own slots (router, combine) do not.
Recompute (train.recompute): "full" keeps each executed layer's input
plus one layer being recomputed; "selective" drops the FFN's internals and SDPA's log-sum-exp. The
loss keeps the logits (bf16/fp32) and the fp32 log-softmax, [b, s, V] each, full vocabulary on every
TP rank (the head gathers its output); its backward adds two fp32 [b, s, V] gradients. Under 1F1B a
pipeline stage i of PP holds min(PP - i, micro-batches) micro-batches' activations.

On a GPU, three figures: allocated (the peak of PyTorch's allocations: torch.cuda.max_memory_allocated),
reserved = allocated x (1 + FRAGMENTATION) (the caching allocator's segments: max_memory_reserved), and
total = reserved + the CUDA context and NCCL buffers outside the allocator (runtime_overhead: per
process group that runs collectives, and the EP all-to-all's buffers). On the CPU the total is the
allocation peak. Not counted: temporaries inside a kernel. Validated on the CPU against torch's
recorded allocations of real training steps and of skewed EP routing (tests/test_memory.py); see
docs/memory.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field

from loopmoe.config import Config, ConfigError, ModelConfig, load_config

GB = 1e9
MODES = ("none", "selective", "full")
GRAD_TEMP = 0.25  # a layer's backward temporaries / its kept tensors (fitted: tests/test_memory.py, dense case)
# The busiest EP rank's routed rows / the EP group's mean (--imbalance), over all MoE passes of a micro-batch
# (what the kept activations add up). Measured by bench/routing_imbalance.py on a tiny LoopMoE with the 3B
# routing shape (72 experts, top-8, EP-8 groups of 9) trained 600 steps on the CPU: 1.04-1.37, the worst
# early in training (step 25); rounded up (docs/memory.md).
IMBALANCE = 1.4
# The caching allocator's reserved / allocated - 1 at the peak (--fragmentation): every routed buffer
# changes size with every layer and step. 15% covers the 12.5% reported for MoE training without
# expandable segments (NovaSky-AI/SkyRL#1470: 15.5 GiB reserved-unallocated on 124.2 GiB allocated);
# training logs mem_reserved_gib next to mem_gib to measure it (docs/memory.md).
FRAGMENTATION = 0.15
# Outside PyTorch's allocator, per GPU (runtime_overhead; --overhead-gb replaces the sum):
CUDA_CONTEXT_GB = 1.1  # context, kernels, cuBLAS, and the first communicator: 1.06 GB on 8 x H100 (NVIDIA/nccl#1685)
NCCL_ALLTOALL_GB = 3.3  # an 8-GPU all-to-all's P2P buffers (32 channels a peer): 4.34 - 1.06 GB (NVIDIA/nccl#1685)
NCCL_COMM_GB = 0.7  # each further collective communicator: 544-688 MB measured (NVIDIA/nccl#964)
BUDGET = 0.8  # a preset must fit this fraction of the device (--budget)
PRESETS = ("loopmoe_3b", "loopmoe_9b")  # checked at their Slurm layouts (--preset-check)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TP_SPLIT = (".attn.qkv.", ".attn.proj.", ".ffn.shared.", ".ffn.w1.", ".ffn.w2.", ".ffn.w3.")


@dataclass
class StageMemory:
    """One pipeline stage's per-rank memory, bytes."""

    stage: int
    layers: str  # e.g. "prelude 0-5, loop 6-15 x2, coda 16-21"
    dense_params: float  # elements on this rank
    expert_params: float
    weights: float
    grads: float
    grads_in_backward: float  # the part of ``grads`` alive during forward/backward
    optimizer: float  # fp32 master + Adam moments
    step_temp: float  # optimizer-step temporaries (phase B)
    buffers: float  # RoPE tables, reduce buckets
    in_flight: int  # micro-batches whose activations a rank holds at once
    activations: dict[str, float] = field(default_factory=dict)  # mode -> bytes (all in-flight micro-batches)
    largest: list[tuple[str, float]] = field(default_factory=list)  # (buffer, bytes) of one micro-batch
    imbalance: float = 1.0  # the busiest EP rank's routed load / the mean (1 at EP 1)
    imbalance_bytes: dict[str, float] = field(default_factory=dict)  # mode -> what it adds to ``activations``
    fragmentation: float = 0.0  # the allocator's reserved / allocated - 1 at the peak (0 on the CPU)
    overhead: float = 0.0  # bytes outside PyTorch's allocator: CUDA context + NCCL buffers (0 on the CPU)
    overhead_parts: list[tuple[str, float]] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    def allocated(self, mode: str) -> float:
        """The peak of PyTorch's allocations (``torch.cuda.max_memory_allocated``): the larger of the
        forward/backward and the optimizer step."""
        fwd_bwd = self.weights + self.grads_in_backward + self.optimizer + self.buffers + self.activations[mode]
        step = self.model_states + self.buffers + self.step_temp
        return max(fwd_bwd, step)

    def reserved(self, mode: str) -> float:
        """The allocator's segments at that peak (``torch.cuda.max_memory_reserved``)."""
        return self.allocated(mode) * (1.0 + self.fragmentation)

    def total(self, mode: str) -> float:
        """What the process holds on the device: reserved + the CUDA context and NCCL's buffers."""
        return self.reserved(mode) + self.overhead


@dataclass
class Estimate:
    stages: list[StageMemory]
    describe: str  # the layout in words

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total("none"))

    def total(self, mode: str = "none") -> float:
        return max(s.total(mode) for s in self.stages)

    def allocated(self, mode: str = "none") -> float:
        return max(s.allocated(mode) for s in self.stages)


# ---------------------------------------------------------------------------------------------------
# Parameters per rank and stage


def _stage_of_param(name: str, m: ModelConfig, ranges: list[tuple[int, int]]) -> int:
    P, K = m.n_prelude, m.n_loop
    part = name.split(".")
    if part[0] in ("prelude", "loop", "coda"):
        unique = int(part[1]) + {"prelude": 0, "loop": P, "coda": P + K}[part[0]]
    elif part[0] == "embed":
        return 0
    elif part[0] in ("norm", "head"):
        return len(ranges) - 1
    elif part[0] == "iter_embed":
        unique = P
    else:
        raise ValueError(f"unknown parameter {name} (see flops.count_model's naming contract)")
    return next(i for i, (lo, hi) in enumerate(ranges) if lo <= unique < hi)


def params_per_stage(m: ModelConfig, tp: int, ep: int, ranges) -> list[tuple[float, float]]:
    """(dense, expert) parameter elements one rank holds, per stage, counted on a meta-device model."""
    from loopmoe.flops import meta_model

    out = [[0.0, 0.0] for _ in ranges]
    for name, p in meta_model(m).named_parameters():
        st = out[_stage_of_param(name, m, ranges)]
        if ".ffn.experts." in name:
            st[1] += p.numel() / ep
        elif name.startswith(("embed.", "head.")) or any(k in name for k in _TP_SPLIT):
            st[0] += p.numel() / tp
        else:
            st[0] += p.numel()
    return [tuple(s) for s in out]


# ---------------------------------------------------------------------------------------------------
# Activations of one micro-batch (bytes), per executed layer and for the loss


def _layer_parts(m: ModelConfig, T: int, tp: int, sp: bool, beta: int, loop_layer: bool, ep: int = 1,
                 imbalance: float = 1.0) -> dict[str, float]:
    """Bytes autograd keeps for one executed layer, by part; the keys ending in ``*`` are what
    selective recompute drops. T = tokens of the micro-batch on this rank before any TP split.
    ``imbalance``: this rank's routed rows / the mean over the EP group (only under EP > 1: at EP 1 a
    rank runs all its own k*T slots whatever the routing)."""
    d, hd = m.d_model, m.head_dim
    Ts = T / tp if sp else T  # residual stream / routed tokens on this rank
    H, KV = m.n_heads / tp, m.n_kv_heads / tp
    norm = Ts * (2 * d * beta + 4)  # RMSNorm: input, normalised input, rstd
    parts = {
        "attn norm": norm,
        "attn in": Ts * d * beta,  # qkv input (megatron keeps the sequence shard under SP)
        "qkv, q, k": T * (H + 2 * KV + H + KV) * hd * beta,  # v is a view of qkv
        "attn out": T * H * hd * beta,  # SDPA output = proj input
        "attn core*": T * H * 4,  # SDPA log-sum-exp (flash: no [s, s] scores)
        "ffn norm": norm,
        "ffn in": Ts * d * beta,
    }
    if m.ffn == "moe":
        k, h, E = m.top_k, m.expert_hidden, m.n_experts
        slots = k * Ts  # this rank's own token-slots (dropless: exactly k per token)
        rows = slots * (imbalance if ep > 1 else 1.0)  # rows this rank's experts run: under EP its routed load
        parts["router*"] = Ts * (2 * E * 4 + 4 + k * 12 + (d * 4 if beta != 4 else 0))  # fp32 logits, probs
        # per row run here: the grouped GEMM's input copy, gate|up, SiLU(gate), their product; int64 maps:
        # the group layout's row positions (+ under EP the receive permutation and its inverse)
        parts["experts*"] = rows * ((d + 4 * h) * beta + 8 * (3 if ep > 1 else 1))
        # the combine's saved tensors, per own slot: the expert outputs [N, d] (activation dtype), the fp32
        # gates [N] and the int64 source tokens and expert order [N] (no fp32 [N, d] copy)
        parts["combine*"] = slots * (d * beta + 4 + 2 * 8)
        parts["shared*"] = T * 4 * m.n_shared_experts * h / tp * beta
    else:
        parts["dense ffn*"] = T * 4 * m.dense_hidden / tp * beta
    if loop_layer and m.adaln != "none":
        parts["adaln"] = Ts * ((9 * d + 2 * m.adaln_rank) * beta + 4) if m.adaln != "iter" else Ts * 4 * d * beta
    return parts


def _loss_parts(m: ModelConfig, T: int, tp: int, sp: bool, beta: int) -> dict[str, float]:
    d, V = m.d_model, m.vocab_size
    Ts = T / tp if sp else T
    return {"final norm + head in": Ts * (3 * d * beta + 4), "logits": T * V * beta,
            "fp32 log-softmax": T * V * 4}


def micro_batch_activations(m: ModelConfig, n_prelude: int, n_loop: int, n_coda: int, has_head: bool,
                            T: int, tp: int, sp: bool, beta: int, exits: int = 0, ep: int = 1,
                            imbalance: float = 1.0) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """({mode: bytes at this stage's backward peak for one micro-batch}, largest buffers).

    Executed layers on the stage: n_prelude + loop_iters * n_loop + n_coda (loop layers carry IterAdaLN).
    ``exits``: early-exit read-outs (each runs the coda and the head again). ``ep``, ``imbalance``: the
    EP size and this rank's routed load over the group's mean (every executed MoE pass at that load:
    the kept tensors add up over the passes, so this is the busiest rank's share of their sum)."""
    plain = _layer_parts(m, T, tp, sp, beta, loop_layer=False, ep=ep, imbalance=imbalance)
    looped = _layer_parts(m, T, tp, sp, beta, loop_layer=True, ep=ep, imbalance=imbalance)
    n_plain = n_prelude + n_coda * (1 + exits if has_head else 1)
    n_looped = m.loop_iters * n_loop
    Ts = T / tp if sp else T
    kept = {
        "none": n_plain * sum(plain.values()) + n_looped * sum(looped.values()),
        "selective": sum(n * sum(v for k, v in parts.items() if not k.endswith("*"))
                         for n, parts in ((n_plain, plain), (n_looped, looped))),
        "full": (n_plain + n_looped) * Ts * m.d_model * beta,  # each executed layer's input
    }
    if has_head:
        loss = sum(_loss_parts(m, T, tp, sp, beta).values()) * (1 + exits)
        for mode in kept:
            kept[mode] += loss + T * 8  # + token ids
    one_layer = max(sum(looped.values()) if n_looped else 0, sum(plain.values()) if n_plain else 0)
    head_grad = T * m.vocab_size * 8 if has_head else 0  # fp32 grads of the log-softmax and of the logits
    recomputed = max(sum(v for k, v in parts.items() if k.endswith("*"))
                     for n, parts in ((n_plain, plain), (n_looped, looped)) if n) if n_plain or n_looped else 0
    # kept + the largest transient of the backward: the loss's fp32 gradients, or a layer's gradient
    # temporaries (GRAD_TEMP x its kept tensors, measured on the CPU), plus what a recompute rebuilds
    # the combine's backward: fp32 [k*T, d] gathered gradient, fp32 copy of the outputs (none in fp32), product
    combine_bwd = m.top_k * Ts * m.d_model * 4 * (2 if beta == 4 else 3) if m.ffn == "moe" and one_layer else 0
    layer_bwd = max(GRAD_TEMP * one_layer, combine_bwd)
    peak = {
        "none": kept["none"] + max(head_grad, layer_bwd),
        "selective": kept["selective"] + max(head_grad, recomputed),  # the FFN being recomputed
        "full": kept["full"] + max(head_grad, one_layer + layer_bwd),  # a recomputed layer + gradients
    }
    largest = []
    if has_head:
        largest += [(f"logits [b, s, V] {'fp32' if beta == 4 else 'bf16'}", T * m.vocab_size * beta),
                    ("log-softmax [b, s, V] fp32 (and its gradient in backward)", T * m.vocab_size * 4)]
    if m.ffn == "moe" and (n_plain or n_looped):
        N = m.top_k * Ts
        M = N * (imbalance if ep > 1 else 1.0)  # rows this rank's experts run
        largest += [("MoE dispatch: token copies [k*T, d]" + (" (this rank's routed load)" if ep > 1 else ""),
                     M * m.d_model * beta),
                    ("MoE expert gate|up [k*T, 2h]" + (" (this rank's routed load)" if ep > 1 else ""),
                     M * 2 * m.expert_hidden * beta),
                    ("MoE combine: expert outputs [k*T, d] (+ gates, indices)", N * (m.d_model * beta + 20))]
    if n_plain or n_looped:
        largest += [("attention qkv [T, (H+2KV) hd]", T * (m.n_heads + 2 * m.n_kv_heads) / tp * m.head_dim * beta),
                    ("one loop layer, all kept tensors" if n_looped else "one layer, all kept tensors", one_layer)]
    largest.sort(key=lambda x: -x[1])
    return peak, largest


# ---------------------------------------------------------------------------------------------------
# The estimate


def runtime_overhead(layout) -> list[tuple[str, float]]:
    """(what, bytes) outside PyTorch's allocator on one GPU of ``layout``: the CUDA context with the
    first NCCL communicator, one more communicator per further process group that runs collectives
    (DP; TP, PP, expert-DP of more than one rank), and the EP all-to-all's peer-to-peer buffers.
    Torch creates a communicator at a group's first collective; groups of one rank never get one."""
    parts = [("CUDA context + first NCCL communicator", CUDA_CONTEXT_GB * GB)]
    groups = [("DP", layout.dp), ("TP", layout.tp), ("PP", layout.pp),
              ("expert-DP", layout.edp if layout.ep > 1 else 1)]
    parts += [(f"NCCL {name} communicator", NCCL_COMM_GB * GB) for name, n in groups if n > 1]
    if layout.ep > 1:
        parts.append(("NCCL EP all-to-all buffers", NCCL_ALLTOALL_GB * GB))
    return parts


def estimate(cfg: Config, layout, *, on_gpu: bool = True, imbalance: float = IMBALANCE,
             fragmentation: float = FRAGMENTATION, overhead_gb: float | None = None) -> Estimate:
    """Per-rank memory of every pipeline stage of ``layout`` (loopmoe.parallel.layout.Layout).

    ``imbalance``: the busiest EP rank's routed load over the mean, applied to what scales with a
    rank's routed rows (EP > 1 only). ``on_gpu=False`` (the CPU): no allocator margin and no CUDA
    context or NCCL buffers. ``fragmentation``: reserved / allocated - 1; ``overhead_gb``: the context
    and NCCL buffers in GB (None: ``runtime_overhead``)."""
    from loopmoe.parallel.layout import stage_ranges

    m, t = cfg.model, cfg.train
    tp, pp, ep, dp, sp, zero = layout.tp, layout.pp, layout.ep, layout.dp, layout.sequence_parallel, layout.zero_stage
    edp = dp // ep
    ranges = stage_ranges(m, layout.pp_split) if pp > 1 else [(0, m.n_unique_layers)]
    beta = 4 if t.precision == "fp32" else 2  # activations and weights: fp32, or bf16 (fp8 counted as bf16)
    bucket = _reduce_bucket(cfg)
    T = t.micro_batch * cfg.data.seq_len
    exits = (m.loop_iters - 1) if m.n_loop and any(w != 0 for w in m.exit_loss_weights) else 0
    imb = imbalance if ep > 1 and m.ffn == "moe" else 1.0
    if not on_gpu:  # no CUDA context, NCCL buffers or caching allocator
        extra = []
    elif overhead_gb is None:
        extra = runtime_overhead(layout)
    else:
        extra = [("stated (--overhead-gb)", overhead_gb * GB)]
    overhead = sum(b for _, b in extra)
    frag = fragmentation if on_gpu else 0.0
    stages = []
    for i, ((dense, expert), (lo, hi)) in enumerate(zip(params_per_stage(m, tp, ep, ranges), ranges)):
        n = dense + expert
        P, K = m.n_prelude, m.n_loop
        n_pre = max(0, min(hi, P) - lo)
        n_loop = max(0, min(hi, P + K) - max(lo, P))
        n_coda = max(0, hi - max(lo, P + K))
        if beta == 4 and zero == 0:
            weights, grads, opt = 4 * n, 4 * n, 8 * n
            step_temp = min(4 * n, 4 * 5e8)  # DeepSpeed's flattened all-reduce bucket
        else:
            part = dense / dp + expert / edp  # this rank's ZeRO partition
            weights, opt = beta * n, 12 * part
            # gradients are accumulated and reduced in fp32 at every precision (engine.py's bf16 settings):
            # ZeRO 1 in bf16 is DeepSpeed's BF16_Optimizer, whose fp32 buffer holds every parameter's gradient
            # (the bf16 .grad is dropped as soon as it is added: immediate_grad_update); ZeRO 2 keeps the fp32
            # partition and an fp32 reduce bucket
            grads = 4 * part + 4 * bucket if zero >= 2 else 4 * n
            step_temp = 4 * part  # fp32 gradient partition / foreach temporaries
        accumulated = t.grad_accum > 1 or pp > 1
        in_flight = min(pp - i, t.grad_accum) if pp > 1 else 1
        has_head = hi == m.n_unique_layers
        acts, largest = _stage_activations(m, n_pre, n_loop, n_coda, has_head, T, tp, sp, beta, exits, ep,
                                           imb, in_flight)
        balanced, _ = _stage_activations(m, n_pre, n_loop, n_coda, has_head, T, tp, sp, beta, exits, ep, 1.0,
                                         in_flight)
        rope = 2 * m.max_seq_len * m.head_dim * 4
        layers = _describe_layers(m, lo, hi)
        stages.append(StageMemory(i, layers, dense, expert, weights, grads, grads if accumulated else 0.0, opt,
                                  step_temp, rope + (4 * bucket if zero >= 2 else 0), in_flight, acts, largest,
                                  imb, {k: acts[k] - balanced[k] for k in acts}, frag, overhead, extra))
    return Estimate(stages, layout.describe())


def _stage_activations(m, n_pre, n_loop, n_coda, has_head, T, tp, sp, beta, exits, ep, imbalance, in_flight):
    """({mode: bytes of the stage's in-flight micro-batches}, largest buffers of one)."""
    one, largest = micro_batch_activations(m, n_pre, n_loop, n_coda, has_head, T, tp, sp, beta, exits, ep,
                                           imbalance)
    head = T * m.vocab_size * 8 if has_head else 0
    # in-flight micro-batches keep their activations; one of them is in its backward (the head's transient)
    return {k: v + (in_flight - 1) * max(v - head, 0) for k, v in one.items()}, largest


def _reduce_bucket(cfg: Config) -> float:
    try:
        with open(cfg.train.ds_config) as f:
            return float(json.load(f).get("zero_optimization", {}).get("reduce_bucket_size", 5e8))
    except (OSError, ValueError):
        return 5e8


def _describe_layers(m: ModelConfig, lo: int, hi: int) -> str:
    P, K = m.n_prelude, m.n_loop
    out = []
    parts = (("prelude", 0, P, ""), ("loop", P, P + K, f" x{m.loop_iters}"), ("coda", P + K, P + K + m.n_coda, ""))
    for name, a, b, rep in parts:
        x, y = max(a, lo), min(b, hi)
        if x < y:
            out.append(f"{name} {x}-{y - 1}{rep}" if y - x > 1 else f"{name} {x}{rep}")
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------------
# Reports


def format_report(cfg: Config, est: Estimate, device_bytes: float | None, budget: float = BUDGET) -> str:
    t = cfg.train
    s = est.worst
    dev = f"{device_bytes / GB:.0f} GB" if device_bytes else "?"
    cap = budget * device_bytes if device_bytes else None
    lines = [f"memory per rank ({est.describe}; {t.precision}, micro-batch {t.micro_batch} x seq {cfg.data.seq_len}, "
             f"grad_accum {t.grad_accum}, recompute set to {t.recompute})"]
    if len(est.stages) > 1:
        lines.append(f"  largest stage: {s.stage} ({s.layers}), {s.in_flight} micro-batch(es) in flight (1F1B)")
    lines += [
        f"  parameters   {(s.dense_params + s.expert_params) / 1e9:8.3f} B  (dense {s.dense_params / 1e9:.3f} B, "
        f"experts {s.expert_params / 1e9:.3f} B on this rank)",
        f"  weights      {s.weights / GB:8.2f} GB",
        f"  gradients    {s.grads / GB:8.2f} GB" + ("" if s.grads_in_backward else "  (allocated during the backward)"),
        f"  optimizer    {s.optimizer / GB:8.2f} GB  (fp32 master + Adam moments, ZeRO partition)",
        f"  buffers      {s.buffers / GB:8.2f} GB  (RoPE tables, ZeRO-2 reduce bucket)",
        f"  step temps   {s.step_temp / GB:8.2f} GB  (optimizer step, after the activations are freed)",
        f"  busiest EP rank: routed load x{s.imbalance:.2f} of the mean"
        + (" (EP 1: no EP imbalance)" if s.imbalance == 1.0 else "")
        + f"; allocator margin: reserved = allocated x {1 + s.fragmentation:.2f}",
        f"  CUDA context + NCCL {s.overhead / GB:6.2f} GB  ("
        + (", ".join(f"{w} {b / GB:.2f}" for w, b in s.overhead_parts) or "none on the CPU") + ")",
        f"  {'recompute':>9}  {'activations (of it: busiest EP rank)':>36}  {'allocated':>9} {'reserved':>8} "
        f"{'total':>8}  vs {budget:.0%} of {dev}" + (f" = {cap / GB:.1f} GB" if cap else ""),
    ]
    for mode in MODES:
        fits = "" if not cap else ("  fits" if s.total(mode) <= cap else "  DOES NOT FIT")
        lines.append(f"  {mode:>9}  {s.activations[mode] / GB:19.2f} GB (+{s.imbalance_bytes[mode] / GB:5.2f} GB)  "
                     f"{s.allocated(mode) / GB:6.2f} GB {s.reserved(mode) / GB:6.2f} GB "
                     f"{s.total(mode) / GB:6.2f} GB{fits}")
    lines.append("  largest buffers (one micro-batch):")
    lines += [f"    {b / GB:8.3f} GB  {name}" for name, b in s.largest[:6]]
    lines.append("  allocated ~ torch.cuda.max_memory_allocated, reserved ~ max_memory_reserved; total = reserved + "
                 "CUDA context + NCCL (docs/memory.md)")
    return "\n".join(lines)


def device_memory() -> tuple[float, str]:
    """(bytes, what) of this process's device: the GPU's memory, else system RAM shared by the local ranks."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), props.name
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().total / local, f"CPU RAM / {local} local rank(s)"


def log_estimate(cfg: Config, layout, log) -> Estimate:
    """Start-up: log the estimate; warn when it exceeds the device's memory."""
    import torch

    est = estimate(cfg, layout, on_gpu=torch.cuda.is_available())
    cap, what = device_memory()
    mode = cfg.train.recompute
    need = est.total(mode)
    s = est.worst
    log.info("memory estimate per rank: %.2f GB (recompute %s; none %.2f / selective %.2f / full %.2f GB; allocated "
             "%.2f GB, reserved x%.2f, busiest EP rank x%.2f, CUDA context + NCCL %.2f GB) of %.1f GB %s "
             "(python -m loopmoe.memory for the breakdown)", need / GB, mode, est.total("none") / GB,
             est.total("selective") / GB, est.total("full") / GB, est.allocated(mode) / GB, 1 + s.fragmentation,
             s.imbalance, s.overhead / GB, cap / GB, what)
    if need > cap:
        better = [m for m in MODES if est.total(m) <= cap]
        hint = (f"train.recompute={better[0]} fits" if better
                else "no recompute mode fits: lower train.micro_batch, raise EP or DP")
        log.warning("memory estimate %.2f GB exceeds the device's %.1f GB (%s): %s", need / GB, cap / GB, what, hint)
    return est


# ---------------------------------------------------------------------------------------------------
# The presets at their Slurm layouts


@dataclass
class SlurmLayout:
    """What a slurm/<preset>.sbatch template launches when submitted as is."""

    config: str  # configs/<MODEL>.yaml
    nodes: int
    tasks_per_node: int
    global_batch: int | None  # samples per step; None: the preset's grad_accum
    parallel: list[str]  # parallel.* overrides the template sets (TP=, PP=, EP= defaults)

    @property
    def world(self) -> int:
        return self.nodes * self.tasks_per_node


def _sbatch_value(text: str, pattern: str, path: str) -> str:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise ConfigError(f"{path}: no match for {pattern!r} (the Slurm template's layout lines changed?)")
    return match.group(1)


def slurm_layout(preset: str, root: str = ROOT) -> SlurmLayout:
    """Read slurm/<preset>.sbatch: #SBATCH --nodes / --ntasks-per-node, MODEL=${MODEL:-...},
    GLOBAL_BATCH=${GLOBAL_BATCH-N}, TP/PP/EP=${X:-N} (empty: the preset's), as slurm/common.sh uses them."""
    path = os.path.join(root, "slurm", f"{preset}.sbatch")
    with open(path) as f:
        text = f.read()
    nodes = int(_sbatch_value(text, r"^#SBATCH\s+--nodes[= ](\d+)", path))
    tasks = int(_sbatch_value(text, r"^#SBATCH\s+--ntasks-per-node[= ](\d+)", path))
    model = _sbatch_value(text, r"^MODEL=\$\{MODEL:-([\w.-]+)\}", path)
    gb = re.search(r"^GLOBAL_BATCH=\$\{GLOBAL_BATCH:?-(\d*)\}", text, re.M)
    parallel = [f"parallel.{k.lower()}={v}" for k, v in re.findall(r"\b(TP|PP|EP)=\$\{\1:-(\d*)\}", text) if v]
    return SlurmLayout(os.path.join(root, "configs", f"{model}.yaml"), nodes, tasks,
                       int(gb.group(1)) if gb and gb.group(1) else None, parallel)


def preset_config(sl: SlurmLayout, overrides: list[str]) -> Config:
    """The preset's config at its Slurm layout: the template's parallel overrides, then ``overrides``,
    and grad_accum = GLOBAL_BATCH / (micro_batch x DP) as slurm/common.sh computes it."""
    ovr = sl.parallel + list(overrides)
    cfg = load_config(sl.config, ovr)
    if sl.global_batch is None:
        return cfg
    p, t = cfg.parallel, cfg.train
    dp = sl.world // (p.tp * p.pp)
    if sl.global_batch % (t.micro_batch * dp):
        raise ConfigError(f"GLOBAL_BATCH={sl.global_batch} is not a multiple of micro_batch x DP = "
                          f"{t.micro_batch} x {dp}")
    return load_config(sl.config, ovr + [f"train.grad_accum={sl.global_batch // (t.micro_batch * dp)}"])


def preset_check(overrides: list[str], device_gb: float, budget: float, **kw) -> tuple[str, bool]:
    """(report, all fit): every preset of PRESETS at its Slurm layout, at its own recompute setting,
    against ``budget`` x ``device_gb``."""
    from loopmoe.parallel.layout import validate_layout

    out, ok, rows = [], True, []
    for name in PRESETS:
        sl = slurm_layout(name)
        cfg = preset_config(sl, overrides)
        est = estimate(cfg, validate_layout(cfg, sl.world), **kw)
        mode = cfg.train.recompute
        fits = est.total(mode) <= budget * device_gb * GB
        ok &= fits
        out += [f"== {name}: slurm/{name}.sbatch, {sl.nodes} node(s) x {sl.tasks_per_node} GPUs",
                format_report(cfg, est, device_gb * GB, budget), ""]
        rows.append(f"  {name:<11} {sl.world:>3} GPUs  micro-batch {cfg.train.micro_batch} x grad_accum "
                    f"{cfg.train.grad_accum:<3} recompute {mode:<9} allocated {est.allocated(mode) / GB:5.1f}  "
                    f"total {est.total(mode) / GB:5.1f} GB of {budget * device_gb:.0f} GB  "
                    + ("fits" if fits else "DOES NOT FIT"))
    frag, imb = kw.get("fragmentation", FRAGMENTATION), kw.get("imbalance", IMBALANCE)
    out += [f"presets at their Slurm layouts (total = reserved x{1 + frag:.2f} of allocated + CUDA context + NCCL; "
            f"busiest EP rank x{imb:.2f}), budget {budget:.0%} of {device_gb:.0f} GB:"] + rows
    if not ok:
        out.append("error: a preset does not fit its budget: raise train.recompute, lower train.micro_batch "
                   "(its grad_accum follows) or spread it over more GPUs")
    return "\n".join(out), ok


def main(argv: list[str] | None = None) -> int:
    from loopmoe.parallel.layout import validate_layout

    ap = argparse.ArgumentParser(prog="python -m loopmoe.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="a config file; none: --preset-check")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--preset-check", action="store_true",
                    help=f"both presets ({', '.join(PRESETS)}) at their Slurm layouts; exit 1 if one does not fit")
    ap.add_argument("--world", type=int, default=0, help="processes (GPUs); default TP x PP x EP")
    ap.add_argument("--device-gb", type=float, default=80.0, help="device memory to compare with (default 80)")
    ap.add_argument("--budget", type=float, default=BUDGET, help=f"fraction of the device a run may use "
                    f"(default {BUDGET}); exit 1 when the configured recompute mode exceeds it")
    ap.add_argument("--imbalance", type=float, default=IMBALANCE, help="the busiest EP rank's routed load / the "
                    f"mean (default {IMBALANCE}, measured: docs/memory.md)")
    ap.add_argument("--fragmentation", type=float, default=FRAGMENTATION, help="allocator margin: reserved / "
                    f"allocated - 1 (default {FRAGMENTATION})")
    ap.add_argument("--overhead-gb", type=float, default=None, help="CUDA context + NCCL buffers per GPU in GB "
                    "(default: from the layout, see runtime_overhead)")
    ap.add_argument("--json", action="store_true", help="print the per-stage figures as JSON")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the options
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml", ".json")):
        args.overrides.insert(0, args.config)  # an override, not a file: the preset check with overrides
        args.config = None
    kw = dict(imbalance=args.imbalance, fragmentation=args.fragmentation, overhead_gb=args.overhead_gb)
    try:
        if args.preset_check or not args.config:
            report, ok = preset_check(args.overrides, args.device_gb, args.budget, **kw)
            print(report)
            return 0 if ok else 1
        cfg = load_config(args.config, args.overrides)
        p = cfg.parallel
        layout = validate_layout(cfg, args.world or p.tp * p.pp * p.ep)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    est = estimate(cfg, layout, **kw)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) | {k: {m: getattr(s, k)(m) for m in MODES}
                                                    for k in ("allocated", "reserved", "total")}
                          for s in est.stages]))
    else:
        print(format_report(cfg, est, args.device_gb * GB, args.budget))
    return 0 if est.total(cfg.train.recompute) <= args.budget * args.device_gb * GB else 1


if __name__ == "__main__":
    sys.exit(main())
