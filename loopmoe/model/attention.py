"""Grouped-query causal self-attention with rotary position embeddings (torch SDPA).

Fused qkv layout (the same for every linear backend; the HF export must use it too): the output
features are ``n_kv_heads`` groups, each ``[q_1 .. q_{n_heads/n_kv_heads}, k, v]`` x head_dim. A
column-parallel split across TP ranks therefore hands every rank whole kv-groups (n_kv_heads must
be divisible by TP), exactly like megatron-core's grouped layout.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from loopmoe.model import core
from loopmoe.model.recompute import checkpointed


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq_len, head_dim] (rotate-half convention, as in LLaMA / HF)."""
    return core.rope_angles(torch.arange(seq_len), head_dim, theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, h, hd]; cos/sin [s, hd] -> rotated x [b, s, h, hd]."""
    return core.rotate(x, cos[:, None, :], sin[:, None, :])  # cos/sin [s, 1, hd]


class Attention(nn.Module):
    def __init__(self, cfg, lin, out_std: float):
        super().__init__()
        tp = lin.tp
        if cfg.n_kv_heads % tp:
            raise ValueError(f"model.n_kv_heads={cfg.n_kv_heads} must be divisible by TP={tp}")
        self.head_dim = cfg.head_dim
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.n_kv_local = cfg.n_kv_heads // tp  # kv heads on this TP rank
        n_qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv = lin.column(cfg.d_model, n_qkv, cfg.init_std)  # heads split across TP ranks
        self.proj = lin.row(cfg.n_heads * cfg.head_dim, cfg.d_model, out_std)  # output all-reduced

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: "LayerKV | None" = None, recompute_core: bool = False) -> torch.Tensor:
        qkv = self.qkv(x)  # [b, s, n_kv_local * (q_per_kv + 2) * hd]  (full s under sequence parallel)
        b, s, _ = qkv.shape
        q, k, v = core.split_qkv(qkv, self.n_kv_local, self.q_per_kv, self.head_dim)  # q [b, s, H_local, hd],
        # k, v [b, s, KV_local, hd]
        past = kv.length if kv is not None else 0  # positions already in the cache
        cos, sin = cos[past:past + s], sin[past:past + s]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, hd]
        mask = None
        if kv is not None:
            k, v = kv.append(k, v)  # [b, KV_local, past + s, hd]
            if past and s > 1:  # new queries see the whole past and, causally, each other
                mask = torch.ones(s, past + s, dtype=torch.bool, device=q.device).tril(diagonal=past)
        sdpa = functools.partial(  # the attention core; query head h reads kv head h // q_per_kv
            F.scaled_dot_product_attention, attn_mask=mask, is_causal=past == 0 and s > 1,
            scale=1.0 / math.sqrt(self.head_dim), enable_gqa=True)
        y = checkpointed(sdpa, q, k, v) if recompute_core else sdpa(q, k, v)  # [b, H_local, s, hd]
        return self.proj(y.transpose(1, 2).reshape(b, s, -1))  # [b, s(/tp), d]


class LayerKV:
    """Keys and values of one executed attention layer (a loop layer has one per iteration)."""

    def __init__(self):
        self.k: torch.Tensor | None = None  # [b, KV_local, t, hd]
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """One LayerKV per executed layer, keyed (unique layer index, iteration): P + R*K + C entries."""

    def __init__(self):
        self.layers: dict[tuple[int, int], LayerKV] = {}

    def layer(self, layer: int, iteration: int) -> LayerKV:
        return self.layers.setdefault((layer, iteration), LayerKV())

    @property
    def length(self) -> int:
        return max((kv.length for kv in self.layers.values()), default=0)
