"""The maths shared by the training model and the exported Hugging Face model, written once.

Imports only torch: the export copies this file next to the remote-code model (as ``loopmoe_core.py``,
see loopmoe/export/hf.py), so the training code and the exported model run the same lines. Nothing here
owns parameters; the modules (training: loopmoe/model/*.py, export: modeling_loopmoe.py) pass theirs in.

Shapes: b batch, s sequence, d d_model, hd head_dim, H query heads, KV kv heads, V vocabulary, r rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# Rotary position embeddings (rotate-half convention, as LLaMA / HF)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] (any integer shape) -> cos, sin [..., hd] fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                               / head_dim)  # [hd/2]
    angles = positions[..., None].float() * inv_freq  # [..., hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., hd]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., hd] rotated by cos/sin already broadcastable to x (the caller lines up the head axis)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


# ---------------------------------------------------------------------------------------------------
# The grouped fused-qkv layout


def split_qkv(t: torch.Tensor, n_kv: int, q_per_kv: int, head_dim: int):
    """Last dim of ``t`` in the fused layout -- ``n_kv`` groups of [q_1 .. q_{q_per_kv}, k, v] x hd -- into
    q [..., n_kv*q_per_kv, hd], k and v [..., n_kv, hd]. Applies to activations [b, s, n_qkv] and, on a
    transposed weight [d, n_qkv], to the weight rows."""
    g = t.reshape(*t.shape[:-1], n_kv, q_per_kv + 2, head_dim)
    return g[..., :-2, :].flatten(-3, -2), g[..., -2, :], g[..., -1, :]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of split_qkv: q [..., H, hd], k/v [..., KV, hd] -> [..., (H + 2KV) hd] (grouped layout)."""
    n_kv, hd = k.shape[-2], k.shape[-1]
    q = q.reshape(*q.shape[:-2], n_kv, -1, hd)  # [..., KV, H/KV, hd]
    return torch.cat([q, k[..., None, :], v[..., None, :]], dim=-2).flatten(-3)


def split_qkv_weight(w: torch.Tensor, n_kv: int, q_per_kv: int, head_dim: int):
    """Fused weight [(H + 2KV) hd, d] -> wq [H hd, d], wk and wv [KV hd, d] (fresh contiguous copies)."""
    q, k, v = split_qkv(w.t(), n_kv, q_per_kv, head_dim)  # [d, H, hd], [d, KV, hd], [d, KV, hd]
    return tuple(t.flatten(-2).t().clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def fuse_qkv_weight(wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of split_qkv_weight -> [(H + 2KV) hd, d]."""
    d = wq.shape[-1]
    q, k, v = (t.t().reshape(d, -1, head_dim) for t in (wq, wk, wv))  # [d, heads, hd]
    return fuse_qkv(q, k, v).t().clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------
# IterAdaLN pieces (docs: loopmoe/model/iter_adaln.py)


def sinusoid(k: int, dim: int, max_period: float = 10000.0, device=None) -> torch.Tensor:
    """Fixed sinusoidal encoding of the iteration index k -> [dim] (dim even; DiT's timestep form)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / half)
    angles = k * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)])


def iter_embedding(k: int, fc1, fc2) -> torch.Tensor:
    """e_k = fc2(SiLU(fc1(sinusoid(k)))) -> [r]."""
    e = sinusoid(k, fc1.in_features, device=fc1.weight.device).to(fc1.weight.dtype)
    return fc2(F.silu(fc1(e)))


def adaln_modulation(x: torch.Tensor, e_k, mode: str, norm, token, mod) -> list[torch.Tensor]:
    """x [b, s, d], e_k [r] or None -> [shift_a, scale_a, gate_a, shift_f, scale_f, gate_f], each [b, s, d]
    ([d] in "iter" mode). ``norm``/``token`` (W_h) are unused in "iter" mode, ``mod`` is W_m, b."""
    if mode == "iter":
        u = F.silu(e_k)  # [r]
    elif mode == "token":
        u = F.silu(token(norm(x)))  # [b, s, r]
    else:
        u = F.silu(e_k + token(norm(x)))  # [b, s, r]
    return list(mod(u).chunk(6, dim=-1))


def adaln_gate(g: torch.Tensor, mode: str) -> torch.Tensor:
    return 1 + g if mode == "one_plus" else g


def modulate(x_normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x_normed * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------
# The pre-norm block, in two halves (analysis runs the attention half on a subset of tokens)


def attention_input(x: torch.Tensor, attn_norm, adaln, e_k):
    """The attention's input and the IterAdaLN modulation (None without IterAdaLN): a_in [b, s, d]."""
    if adaln is None:
        return attn_norm(x), None
    mods = adaln(x, e_k)  # 6 x [b, s, d]
    return modulate(attn_norm(x), mods[0], mods[1]), mods


def block_rest(x: torch.Tensor, attn_out: torch.Tensor, ffn, ffn_norm, adaln, mods):
    """Residual after attention, then the FFN half. ``ffn(x) -> (y, extra)``; returns (x, extra)."""
    if mods is None:
        x = x + attn_out
        y, extra = ffn(ffn_norm(x))
        return x + y, extra
    shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = mods
    x = x + adaln.gate(gate_a) * attn_out
    y, extra = ffn(modulate(ffn_norm(x), shift_f, scale_f))  # the router sees this input
    return x + adaln.gate(gate_f) * y, extra


def block(x: torch.Tensor, attn, ffn, attn_norm, ffn_norm, adaln=None, e_k=None):
    """x [b, s, d] -> (x [b, s, d], extra): attention(a_in) -> [b, s, d]; ffn as in block_rest."""
    a_in, mods = attention_input(x, attn_norm, adaln, e_k)
    return block_rest(x, attn(a_in), ffn, ffn_norm, adaln, mods)


# ---------------------------------------------------------------------------------------------------
# Feed-forward: SwiGLU and the router's decision


def swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down(SiLU(gate x) * up x): the dense FFN and the shared experts."""
    return down(F.silu(gate(x)) * up(x))


def route(logits: torch.Tensor, k: int, score: str, bias: torch.Tensor | None = None,
          forced_topk: torch.Tensor | None = None):
    """logits [T, E] fp32 -> topk [T, k], gates [T, k] fp32, probs [T, E]. Selection: top-k of logits + bias
    (the aux-free balancing bias: selection only), or ``forced_topk``. Gates: "topk_then_softmax" = softmax
    over the k selected logits (sums to 1); "softmax_then_topk" = the softmax over all E at the selected
    experts (not renormalised)."""
    if forced_topk is not None:
        topk = forced_topk.to(logits.device)  # reuse a recorded decision
    else:
        topk = (logits if bias is None else logits + bias.float()).topk(k, dim=-1).indices  # [T, k]
    probs = logits.softmax(dim=-1)  # [T, E]
    if score == "topk_then_softmax":
        gates = logits.gather(1, topk).softmax(dim=-1)
    else:
        gates = probs.gather(1, topk)
    return topk, gates, probs


# ---------------------------------------------------------------------------------------------------
# Losses and read-out statistics


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[..., V], [...] -> [...] cross-entropy in fp32 (labels already shifted: next tokens)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return ce.view(labels.shape)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over ``loss_mask`` (1 = scored; None = every token)."""
    ce = token_ce(logits, labels).flatten()
    if loss_mask is None:
        return ce.mean()
    mask = loss_mask.flatten().float()
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] logits -> [...] entropy of softmax in nats (fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)

# ---------------------------------------------------------------------------------------------------
# Routed experts: dropless index dispatch and grouped-GEMM SwiGLU (training model and export)


def count_per_expert(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[E] int64 occurrences of each expert in ``idx``. (``torch.bincount`` on CUDA reads the maximum
    back to the host to size its output: a synchronisation per layer; a scatter-add does not.)"""
    flat = idx.reshape(-1).long()
    return flat.new_zeros(n_experts).scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(topk: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk [T, k] -> (order [T*k]: token-slots grouped by expert, token order inside a group (stable),
    counts [E] slots per expert)."""
    flat = topk.reshape(-1)  # [T*k] expert of each token-slot
    return flat.argsort(stable=True), count_per_expert(flat, n_experts)


class _CombineExperts(torch.autograd.Function):
    """out [T, d] = sum over slots i of w[i] * ys[i] at row token[i], accumulated in fp32, cast to ``dtype``.

    Written by hand for the memory of the backward: autograd of the plain expression keeps two fp32 [N, d]
    tensors per MoE pass (``ys.float()`` and the weighted product that ``index_add_`` holds), N = k*T slots,
    the largest activation term of the 3B preset. This keeps only ys as given (bf16 in training), the fp32
    gates [N] and the indices [N]; the fp32 [N, d] temporaries live only inside forward and backward. The
    arithmetic is the plain expression's, op for op (same values and gradients)."""

    @staticmethod
    def forward(ctx, ys, w, token, n_tokens: int, dtype):  # ys [N, d], w [N] fp32, token [N] -> [T, d]
        out = torch.zeros(n_tokens, ys.shape[1], dtype=torch.float32, device=ys.device)  # [T, d] fp32
        out.index_add_(0, token, ys.to(torch.float32, copy=True).mul_(w.unsqueeze(1)))  # [N, d] fp32, a temporary
        ctx.save_for_backward(ys, w, token)
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out [T, d] (x's dtype)
        ys, w, token = ctx.saved_tensors
        g = grad_out.float().index_select(0, token)  # [N, d] fp32: each slot's token gradient
        grad_w = (g * ys.float()).sum(1) if ctx.needs_input_grad[1] else None  # [N] fp32
        grad_ys = g.mul_(w.unsqueeze(1)).to(ys.dtype) if ctx.needs_input_grad[0] else None  # [N, d]
        return grad_ys, grad_w, None, None, None


def combine_experts(x: torch.Tensor, token: torch.Tensor, ys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Scatter-add the expert outputs ys [N, d] of source tokens ``token`` [N], weighted by w [N] (fp32),
    back to [T, d] = x's shape, in fp32, cast to x's dtype. Keeps no fp32 [N, d] tensor for the backward
    (see _CombineExperts)."""
    return _CombineExperts.apply(ys, w, token, x.shape[0], x.dtype)


def dropless_moe(x: torch.Tensor, topk: torch.Tensor, gates: torch.Tensor, n_experts: int, experts) -> torch.Tensor:
    """x [T, d], topk/gates [T, k] -> [T, d]; ``experts(rows [N, d] sorted by expert, counts [E]) -> [N, d]``."""
    k = topk.shape[1]
    order, counts = sort_by_expert(topk, n_experts)
    token = order // k  # [N] source token of every slot
    return combine_experts(x, token, experts(x[token], counts), gates.reshape(-1)[order])


def grouped_mm_align(x: torch.Tensor) -> int:
    """Rows per group alignment for ``grouped_swiglu``: Hopper's grouped GEMM (TMA) wants each group to
    start at a 16-byte boundary (8 bf16 rows; torchtitan pads the same way); the CPU kernel does not."""
    return 16 // x.element_size() if x.is_cuda else 1


def group_rows(x: torch.Tensor, counts: torch.Tensor, align: int):
    """Lay the rows of x [N, d] (sorted by expert, counts [E]) out with every group padded to a
    multiple of ``align`` rows (zero rows), in a buffer of a static size -- known without reading
    ``counts`` on the host -- that is itself a multiple of ``align``: n_pad = the largest multiple of
    ``align`` <= N + E*(align-1). The padded groups sum to a multiple of ``align`` that is at most
    N + E*(align-1), hence at most n_pad; the slack n_pad - sum (a multiple of ``align`` too) goes to
    the last group. So every group, the last included, is a multiple of ``align`` (TE's FP8 grouped
    GEMM asserts 16 rows per split), every row of the buffer belongs to a group (no uninitialised rows
    reach the backward) and shapes do not depend on the routing. Returns (buffer [n_pad, d], pos [N]
    row of each x row in it, sizes [E] rows per group, summing to n_pad). ``align=1``: no padding."""
    N, E = x.shape[0], counts.numel()
    n_pad = (N + E * (align - 1)) // align * align
    padded = (counts + align - 1) // align * align  # [E] rows per group after padding
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # [E] padded start - start
    pos = torch.arange(N, device=x.device) + shift.repeat_interleave(counts, output_size=N)  # [N]
    padded[-1] += n_pad - padded.sum()  # the slack rows (a multiple of align) to the last group
    return x.new_zeros(n_pad, x.shape[1]).index_copy(0, pos, x), pos, padded


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                   align: int = 1) -> torch.Tensor:
    """SwiGLU experts on rows grouped by expert: x [N, d], counts [E] -> [N, d]; w1 [E, d, 2h], w2 [E, h, d].
    Two grouped GEMMs on the padded layout of ``group_rows``; group ends stay on the device."""
    xp, pos, sizes = group_rows(x, counts, align)  # xp [n_pad, d]
    offs = sizes.cumsum(0).to(torch.int32)  # [E] group ends, the last == n_pad
    g, u = F.grouped_mm(xp, w1, offs=offs).chunk(2, dim=-1)  # [n_pad, h] each
    yp = F.grouped_mm(F.silu(g) * u, w2, offs=offs)  # [n_pad, d]
    return yp.index_select(0, pos)  # [N, d]
