"""Per-GPU memory estimate of a training layout: model states by ZeRO stage and EP, activations per
micro-batch with and without recompute, the largest buffers, and the total against the device.

    python -m loopmoe.memory configs/loopmoe_9b.yaml parallel.ep=8 --world 32 [--device-gb 80]
    est = estimate(cfg, layout)            # Estimate; est.total(mode) in bytes

Model states (per rank; dense parameters split over TP (attention, shared experts, dense FFN,
embedding, head; norms/router/IterAdaLN replicated) and the pipeline stage, routed experts over EP;
the ZeRO partition N = DP for dense and DP/EP (expert-DP) for expert parameters):
  fp32, ZeRO 0        weights 4 + grads 4 + Adam moments 8 B/param (torch AdamW, replicated)
  fp32, ZeRO 1/2      weights 4 + grads 4 (ZeRO 2: 4/N + a reduce bucket) + fp32 master 4/N + Adam 8/N
  bf16/fp8, ZeRO 1/2  weights 2 + grads 2 (ZeRO 2: 2/N + bucket) + fp32 master 4/N + Adam 8/N
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
token copy, gate|up, SiLU, activation, and the fp32 expert output and gate-weighted output); the shared
expert's four hidden vectors; IterAdaLN's modulations). Tokens per rank: micro_batch x seq_len (÷ TP
for the residual stream and the MoE under sequence parallelism). Balanced routing is assumed (a hot
expert's rank holds more slots). Recompute (train.recompute): "full" keeps each executed layer's input
plus one layer being recomputed; "selective" drops the FFN's internals and SDPA's log-sum-exp. The
loss keeps the logits (bf16/fp32) and the fp32 log-softmax, [b, s, V] each, full vocabulary on every
TP rank (the head gathers its output); its backward adds two fp32 [b, s, V] gradients. Under 1F1B a
pipeline stage i of PP holds min(PP - i, micro-batches) micro-batches' activations.

Not counted: the CUDA context and NCCL buffers (~1-2 GB per GPU), allocator fragmentation,
temporaries inside a kernel. Validated on the CPU against torch's recorded allocations of real
training steps (tests/test_memory.py); see docs/memory.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

from loopmoe.config import Config, ConfigError, ModelConfig, load_config

GB = 1e9
MODES = ("none", "selective", "full")
GRAD_TEMP = 0.25  # a layer's backward temporaries / its kept tensors (fitted: tests/test_memory.py, dense case)
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

    @property
    def model_states(self) -> float:
        return self.weights + self.grads + self.optimizer

    def total(self, mode: str) -> float:
        fwd_bwd = self.weights + self.grads_in_backward + self.optimizer + self.buffers + self.activations[mode]
        step = self.model_states + self.buffers + self.step_temp
        return max(fwd_bwd, step)


@dataclass
class Estimate:
    stages: list[StageMemory]
    describe: str  # the layout in words

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total("none"))

    def total(self, mode: str = "none") -> float:
        return max(s.total(mode) for s in self.stages)


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


def _layer_parts(m: ModelConfig, T: int, tp: int, sp: bool, beta: int, loop_layer: bool) -> dict[str, float]:
    """Bytes autograd keeps for one executed layer, by part; the keys ending in ``*`` are what
    selective recompute drops. T = tokens of the micro-batch on this rank before any TP split."""
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
        slots = k * Ts  # balanced: every rank's experts run about k tokens-slots per token
        parts["router*"] = Ts * (2 * E * 4 + 4 + k * 12 + (d * 4 if beta != 4 else 0))  # fp32 logits, probs
        parts["experts*"] = slots * ((d + 4 * h) * beta + 2 * d * 4 + 3 * 8 + 4)  # + fp32 outputs, indices
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
                            T: int, tp: int, sp: bool, beta: int, exits: int = 0
                            ) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """({mode: bytes at this stage's backward peak for one micro-batch}, largest buffers).

    Executed layers on the stage: n_prelude + loop_iters * n_loop + n_coda (loop layers carry IterAdaLN).
    ``exits``: early-exit read-outs (each runs the coda and the head again)."""
    plain = _layer_parts(m, T, tp, sp, beta, loop_layer=False)
    looped = _layer_parts(m, T, tp, sp, beta, loop_layer=True)
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
    peak = {
        "none": kept["none"] + max(head_grad, GRAD_TEMP * one_layer),
        "selective": kept["selective"] + max(head_grad, recomputed),  # the FFN being recomputed
        "full": kept["full"] + max(head_grad, (1 + GRAD_TEMP) * one_layer),  # a recomputed layer + gradients
    }
    largest = []
    if has_head:
        largest += [(f"logits [b, s, V] {'fp32' if beta == 4 else 'bf16'}", T * m.vocab_size * beta),
                    ("log-softmax [b, s, V] fp32 (and its gradient in backward)", T * m.vocab_size * 4)]
    if m.ffn == "moe" and (n_plain or n_looped):
        N = m.top_k * Ts
        largest += [("MoE dispatch: token copies [k*T, d]", N * m.d_model * beta),
                     ("MoE expert gate|up [k*T, 2h]", N * 2 * m.expert_hidden * beta),
                     ("MoE combine: fp32 expert outputs [k*T, d] x2", N * m.d_model * 8)]
    if n_plain or n_looped:
        largest += [("attention qkv [T, (H+2KV) hd]", T * (m.n_heads + 2 * m.n_kv_heads) / tp * m.head_dim * beta),
                    ("one loop layer, all kept tensors" if n_looped else "one layer, all kept tensors", one_layer)]
    largest.sort(key=lambda x: -x[1])
    return peak, largest


# ---------------------------------------------------------------------------------------------------
# The estimate


def estimate(cfg: Config, layout) -> Estimate:
    """Per-rank memory of every pipeline stage of ``layout`` (loopmoe.parallel.layout.Layout)."""
    from loopmoe.parallel.layout import stage_ranges

    m, t = cfg.model, cfg.train
    tp, pp, ep, dp, sp, zero = layout.tp, layout.pp, layout.ep, layout.dp, layout.sequence_parallel, layout.zero_stage
    edp = dp // ep
    ranges = stage_ranges(m, layout.pp_split) if pp > 1 else [(0, m.n_unique_layers)]
    beta = 4 if t.precision == "fp32" else 2  # activations and weights: fp32, or bf16 (fp8 counted as bf16)
    bucket = _reduce_bucket(cfg)
    T = t.micro_batch * cfg.data.seq_len
    exits = (m.loop_iters - 1) if m.n_loop and any(w != 0 for w in m.exit_loss_weights) else 0
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
            grads = beta * part + beta * bucket if zero >= 2 else beta * n
            step_temp = 4 * part  # fp32 gradient partition / foreach temporaries
        accumulated = t.grad_accum > 1 or pp > 1
        acts, largest = micro_batch_activations(m, n_pre, n_loop, n_coda, hi == m.n_unique_layers, T, tp, sp,
                                                beta, exits)
        in_flight = min(pp - i, t.grad_accum) if pp > 1 else 1
        one = {k: v for k, v in acts.items()}
        for mode in acts:  # in-flight micro-batches keep their activations; one of them is in its backward
            head = T * m.vocab_size * 8 if hi == m.n_unique_layers else 0
            acts[mode] = one[mode] + (in_flight - 1) * max(one[mode] - head, 0)
        rope = 2 * m.max_seq_len * m.head_dim * 4
        layers = _describe_layers(m, lo, hi)
        stages.append(StageMemory(i, layers, dense, expert, weights, grads, grads if accumulated else 0.0, opt,
                                  step_temp, rope + (beta * bucket if zero >= 2 else 0), in_flight, acts, largest))
    return Estimate(stages, layout.describe())


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


def format_report(cfg: Config, est: Estimate, device_bytes: float | None) -> str:
    t = cfg.train
    s = est.worst
    dev = f"{device_bytes / GB:.0f} GB" if device_bytes else "?"
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
    ]
    for mode in MODES:
        fits = "" if not device_bytes else ("  fits" if s.total(mode) <= device_bytes else "  DOES NOT FIT")
        lines.append(f"  activations {mode:>9} {s.activations[mode] / GB:8.2f} GB   total {s.total(mode) / GB:8.2f} GB"
                     f" of {dev}{fits}")
    lines.append("  largest buffers (one micro-batch):")
    lines += [f"    {b / GB:8.3f} GB  {name}" for name, b in s.largest[:6]]
    lines.append("  not counted: CUDA context + NCCL buffers (~1-2 GB), allocator fragmentation")
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
    est = estimate(cfg, layout)
    cap, what = device_memory()
    mode = cfg.train.recompute
    need = est.total(mode)
    log.info("memory estimate per rank: %.2f GB (recompute %s; none %.2f / selective %.2f / full %.2f GB) of "
             "%.1f GB %s (python -m loopmoe.memory for the breakdown)", need / GB, mode, est.total("none") / GB,
             est.total("selective") / GB, est.total("full") / GB, cap / GB, what)
    if need > cap:
        better = [m for m in MODES if est.total(m) <= cap]
        hint = (f"train.recompute={better[0]} fits" if better
                else "no recompute mode fits: lower train.micro_batch, raise EP or DP")
        log.warning("memory estimate %.2f GB exceeds the device's %.1f GB (%s): %s", need / GB, cap / GB, what, hint)
    return est


def main(argv: list[str] | None = None) -> int:
    from loopmoe.parallel.layout import validate_layout

    ap = argparse.ArgumentParser(prog="python -m loopmoe.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    ap.add_argument("--world", type=int, default=0, help="processes (GPUs); default TP x PP x EP")
    ap.add_argument("--device-gb", type=float, default=80.0, help="device memory to compare with (default 80)")
    ap.add_argument("--json", action="store_true", help="print the per-stage figures as JSON")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the options
    try:
        cfg = load_config(args.config, args.overrides)
        p = cfg.parallel
        layout = validate_layout(cfg, args.world or p.tp * p.pp * p.ep)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    est = estimate(cfg, layout)
    if args.json:
        print(json.dumps([dataclasses.asdict(s) | {"total": {m: s.total(m) for m in MODES}} for s in est.stages]))
    else:
        print(format_report(cfg, est, args.device_gb * GB))
    return 0


if __name__ == "__main__":
    sys.exit(main())
