"""The layers of the Hugging Face LoopMoE model (modeling_loopmoe.py has the model and the forward).

Exported with it as remote code: imports only torch, transformers and the files beside it. Parameter
names are the export's (loopmoe/export/hf.py maps them to the training model's).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .configuration_loopmoe import LoopMoEConfig
from .loopmoe_core import (adaln_gate, adaln_modulation, attention_input, block, dropless_moe, grouped_mm_align,
                           grouped_swiglu, iter_embedding, rope_angles, rotate, route, swiglu)


class LoopMoERMSNorm(nn.Module):
    """torch's RMSNorm (F.rms_norm, as the training model's nn.RMSNorm); ``affine=False``: no weight."""

    def __init__(self, d: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps, self.d = eps, d
        self.weight = nn.Parameter(torch.ones(d)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.d,), self.weight, self.eps)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [b, s] -> cos, sin [b, s, hd] fp32 (rotate-half convention; training's rope_cache)."""
    return rope_angles(position_ids, head_dim, theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, hd]; cos/sin [b, s, hd]."""
    return rotate(x, cos[:, None], sin[:, None])


class CacheSlot:
    """How one attention call uses the KV cache entry ``idx``: ``commit`` appends the new K/V (the
    normal case); otherwise the past K/V are read and the new ones only remembered in ``self.new``."""

    def __init__(self, cache: Cache | None, idx: int, commit: bool = True):
        self.cache, self.idx, self.commit, self.new = cache, idx, commit, None

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.new = (k, v)
        if self.cache is None:
            return k, v
        if self.commit:
            return self.cache.update(k, v, self.idx)
        past = cached_kv(self.cache, self.idx)
        if past is None:
            return k, v
        return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)


def cached_kv(cache: Cache, idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The K/V stored for entry ``idx`` (None when empty), for transformers 4.5x and 5.x caches."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if idx >= len(layers):
            return None
        layer = layers[idx]
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            return None
        return layer.keys, layer.values
    keys = getattr(cache, "key_cache", [])
    if idx >= len(keys) or keys[idx] is None or keys[idx].numel() == 0:
        return None
    return keys[idx], cache.value_cache[idx]


def cache_length(cache: Cache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


class LoopMoEAttention(nn.Module):
    """GQA: query head h reads kv head h // (H / KV) (the training model's grouped qkv layout, split)."""

    def __init__(self, cfg: LoopMoEConfig):
        super().__init__()
        d, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.H, self.KV, self.hd = H, KV, hd
        self.q_proj = nn.Linear(d, H * hd, bias=False)
        self.k_proj = nn.Linear(d, KV * hd, bias=False)
        self.v_proj = nn.Linear(d, KV * hd, bias=False)
        self.o_proj = nn.Linear(H * hd, d, bias=False)

    def kv(self, x, cos, sin):  # x [b, s, d] -> k, v [b, KV, s, hd] (k rotated)
        b, s, _ = x.shape
        k = self.k_proj(x).view(b, s, self.KV, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.KV, self.hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask, slot: CacheSlot | None):
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.H, self.hd).transpose(1, 2), cos, sin)
        k, v = self.kv(x, cos, sin)
        if slot is not None:
            k, v = slot(k, v)  # [b, KV, past + s, hd]
        causal = mask is None and s > 1 and k.shape[2] == s
        if mask is None and s > 1 and k.shape[2] != s:  # several new tokens after a cached past
            past = k.shape[2] - s
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=1.0 / math.sqrt(self.hd), enable_gqa=True)  # [b, H, s, hd]
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class LoopMoEMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x). The dense FFN and the (ungated) shared experts."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class LoopMoERouter(nn.Module):
    """fp32 logits; selection = top-k of logits + e_score_correction_bias (the aux-free balancing bias,
    selection only); gates = softmax over the k selected logits, or (softmax_then_topk) softmax over all
    E taken at the selected experts, not renormalised."""

    def __init__(self, cfg: LoopMoEConfig):
        super().__init__()
        self.k, self.score = cfg.num_experts_per_tok, cfg.router_score
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def forward(self, x):  # x [T, d] -> topk [T, k], gates [T, k] fp32
        topk, gates, _ = route(F.linear(x.float(), self.weight.float()), self.k, self.score,
                               self.e_score_correction_bias)
        return topk, gates


class LoopMoEExperts(nn.Module):
    """Stacked SwiGLU experts, training layout: gate_up_proj [E, d, 2h] (gate | up), down_proj [E, h, d]."""

    def __init__(self, cfg: LoopMoEConfig):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.hidden_size, cfg.expert_hidden
        self.n = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, d, 2 * h))
        self.down_proj = nn.Parameter(torch.empty(E, h, d))

    def forward(self, x, topk, gates):  # x [T, d] -> [T, d]; the training model's dropless dispatch (core)
        def experts(rows, counts):  # rows [N, d] sorted by expert -> [N, d]: two grouped GEMMs
            return grouped_swiglu(rows, counts, self.gate_up_proj, self.down_proj, grouped_mm_align(rows))

        return dropless_moe(x, topk, gates, self.n, experts)


class LoopMoESparseMoE(nn.Module):
    def __init__(self, cfg: LoopMoEConfig):
        super().__init__()
        self.gate = LoopMoERouter(cfg)
        self.experts = LoopMoEExperts(cfg)
        h_shared = cfg.n_shared_experts * cfg.expert_hidden
        self.shared_expert = LoopMoEMLP(cfg.hidden_size, h_shared) if h_shared else None

    def forward(self, x):
        b, s, d = x.shape
        xf = x.reshape(b * s, d)
        topk, gates = self.gate(xf)
        y = self.experts(xf, topk, gates).view(b, s, d)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y


class LoopMoEIterEmbed(nn.Module):
    """e_k = fc2(silu(fc1(sinusoid(k)))) in R^r, shared by all loop layers."""

    def __init__(self, rank: int):
        super().__init__()
        self.freq_dim = 2 * ((rank + 1) // 2)
        self.fc1 = nn.Linear(self.freq_dim, rank)
        self.fc2 = nn.Linear(rank, rank)

    def forward(self, k: int) -> torch.Tensor:
        return iter_embedding(k, self.fc1, self.fc2)


class LoopMoEIterAdaLN(nn.Module):
    """[shift_a, scale_a, gate_a, shift_f, scale_f, gate_f] = modulation(SiLU(e_k + token_proj(RMSNorm(x))))."""

    def __init__(self, cfg: LoopMoEConfig):
        super().__init__()
        self.mode, self.gate_mode = cfg.adaln, cfg.adaln_gate
        if self.mode in ("both", "token"):
            self.norm = LoopMoERMSNorm(cfg.hidden_size, cfg.rms_norm_eps, affine=False)
            self.token_proj = nn.Linear(cfg.hidden_size, cfg.adaln_rank, bias=False)
        self.modulation = nn.Linear(cfg.adaln_rank, 6 * cfg.hidden_size)

    def forward(self, x, e_k):
        return adaln_modulation(x, e_k, self.mode, getattr(self, "norm", None), getattr(self, "token_proj", None),
                                self.modulation)

    def gate(self, g):
        return adaln_gate(g, self.gate_mode)


class LoopMoEBlock(nn.Module):
    def __init__(self, cfg: LoopMoEConfig, adaln: bool):
        super().__init__()
        self.input_layernorm = LoopMoERMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LoopMoEAttention(cfg)
        self.post_attention_layernorm = LoopMoERMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (LoopMoESparseMoE(cfg) if cfg.ffn == "moe"
                    else LoopMoEMLP(cfg.hidden_size, cfg.dense_hidden))
        self.adaln = LoopMoEIterAdaLN(cfg) if adaln else None

    def forward(self, x, cos, sin, mask, slot, e_k=None):
        return block(x, lambda a: self.self_attn(a, cos, sin, mask, slot), lambda f: (self.mlp(f), None),
                     self.input_layernorm, self.post_attention_layernorm, self.adaln, e_k)[0]

    def propagate_kv(self, x, cos, sin, slot, e_k=None):
        """State propagation: append the K/V this layer computes from input x (nothing else runs)."""
        a_in, _ = attention_input(x, self.input_layernorm, self.adaln, e_k)
        slot(*self.self_attn.kv(a_in, cos, sin))
