"""Parameter and FLOP accounting: THE FLOP convention of the project (spec section 4).

Convention (used for MFU, the balance check and every report):

    forward FLOPs / token = 2 x active matmul parameters per token
                          + 4 x executed layers x query heads x head_dim x seq_len
    training FLOPs / token = 3 x forward

* active matmul parameters: the weights a token is multiplied with, counted once per EXECUTION
  (a loop layer counts ``loop_iters`` times). Routed experts count ``top_k / n_experts`` of their
  weights (token-choice top-k: exactly k experts per token, whichever they are); shared experts, the
  router and a dense FFN count fully; the LM head counts; the embedding lookup does not (a gather).
  IterAdaLN's per-token matmuls (W_h and W_m, once per iteration) count. Not counted: norms, biases,
  element-wise ops, softmax/top-k, and the iteration MLP (``iter_embed``: it embeds the iteration
  index, once per iteration for the whole batch, not per token).
* 4 x ... x seq_len: QK^T and AV of causal attention WITHOUT the causal discount (the same as
  torch.utils.flop_counter and most MFU reports), at the training sequence length.

Two ways to get the counts, which must agree (tests/test_flops.py):
* ``counts_from_config(cfg)``: the formula, from the ModelConfig alone;
* ``count_model(model, cfg)``: counting the named parameters of an instantiated model (build it on the
  meta device to count a 9B model without allocating: ``meta_model(cfg)``).
``measure_forward_flops`` runs a real forward under ``torch.utils.flop_counter.FlopCounterMode`` to
cross-check the convention (exact for dropless token-choice routing, see its docstring).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from loopmoe.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by role. ``*_active`` are per token, counted once per execution (see module doc)."""

    total: int  # every parameter, counted once
    embedding: int  # input embedding (0 extra when tied: the head then holds it)
    head: int  # LM head weight (active per token; = the embedding when tied)
    attn: int  # attention matmul weights, all unique layers
    ffn: int  # FFN weights: ALL routed experts + shared experts + router (+ dense FFN)
    adaln: int  # IterAdaLN: loop.*.adaln.* + iter_embed.*
    other: int  # norms and the like
    attn_active: int
    ffn_active: int  # routed x top_k/n_experts + shared + router (+ dense)
    adaln_active: int  # per-token IterAdaLN matmuls (W_h, W_m) x iterations
    distinct_active: int  # information only: the matmul weights a token touches, each counted ONCE
    executed_layers: int

    @property
    def active(self) -> int:
        """Active matmul parameters per token (executed; embedding lookup excluded, head included)."""
        return self.attn_active + self.ffn_active + self.adaln_active + self.head

    @property
    def attn_ffn_ratio(self) -> float:
        """Active attention : active FFN parameters (A/F), the spec's 'active sublayer ratio'."""
        return self.attn_active / self.ffn_active if self.ffn_active else float("inf")


# ---------------------------------------------------------------------------------------------------
# Formula side: from the config alone


def _adaln_shapes(cfg: ModelConfig) -> tuple[int, int, int]:
    """(params per loop layer, per-token matmul params per loop layer per iteration, iter_embed params).

    Mirrors loopmoe/model/iter_adaln.py: W_h r x d (no bias, modes both/token), W_m 6d x r + b 6d,
    and one shared iteration MLP (sinusoid of width 2*ceil(r/2) -> r -> r, with biases; modes both/iter).
    """
    if cfg.n_loop == 0 or cfg.adaln == "none":  # the model builds IterAdaLN for every loop layer
        return 0, 0, 0
    d, r = cfg.d_model, cfg.adaln_rank
    w_h = r * d if cfg.adaln in ("both", "token") else 0
    w_m = 6 * d * r
    per_layer = w_h + w_m + 6 * d
    # In "iter" mode W_m multiplies one [r] vector per iteration, not each token.
    per_token = w_h + (w_m if cfg.adaln in ("both", "token") else 0)
    freq = 2 * ((r + 1) // 2)
    iter_mlp = (freq * r + r) + (r * r + r) if cfg.adaln in ("both", "iter") else 0
    return per_layer, per_token, iter_mlp


def counts_from_config(cfg: ModelConfig) -> ParamCounts:
    """The formula (must equal ``count_model`` on the built model; tested)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d  # fused qkv + proj
    if cfg.ffn == "moe":
        expert = 3 * d * cfg.expert_hidden  # SwiGLU: gate, up, down
        router = cfg.n_experts * d
        ffn = cfg.n_experts * expert + cfg.n_shared_experts * expert + router
        ffn_act = cfg.top_k * expert + cfg.n_shared_experts * expert + router
    else:
        ffn = ffn_act = 3 * d * cfg.dense_hidden
    norms = 2 * d  # attn_norm, ffn_norm
    ad_layer, ad_token, iter_mlp = _adaln_shapes(cfg)
    n_loop_adaln = cfg.n_loop if ad_layer else 0

    embedding = cfg.vocab_size * d
    head = cfg.vocab_size * d
    unique, executed = cfg.n_unique_layers, cfg.n_executed_layers
    adaln = n_loop_adaln * ad_layer + iter_mlp
    other = unique * norms + d  # + final norm
    total = embedding + (0 if cfg.tie_embeddings else head) + unique * (attn + ffn) + adaln + other
    return ParamCounts(
        total=total, embedding=embedding, head=head, attn=unique * attn, ffn=unique * ffn, adaln=adaln,
        other=other, attn_active=executed * attn, ffn_active=executed * ffn_act,
        adaln_active=n_loop_adaln * cfg.loop_iters * ad_token,
        distinct_active=unique * (attn + ffn_act) + n_loop_adaln * ad_token + head,
        executed_layers=executed,
    )


# ---------------------------------------------------------------------------------------------------
# Measurement side: counting the named parameters of a built model

_LAYER = re.compile(r"^(prelude|loop|coda)\.(\d+)\.")


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model on the meta device (no memory), torch linears (same shapes as megatron's at TP=1)."""
    from loopmoe.model import LoopMoEModel

    with torch.device("meta"):
        return LoopMoEModel(dataclasses.replace(cfg, linear_backend="torch"))


def count_model(model: torch.nn.Module, cfg: ModelConfig) -> ParamCounts:
    """Count by parameter name, by loopmoe/model's naming contract: ``embed``, ``prelude.{i}``,
    ``loop.{i}``, ``coda.{i}``, ``norm``, ``head``; inside a block ``.attn.``, ``.ffn.experts.`` (routed,
    stacked [E, ...]), ``.ffn.shared.``, ``.ffn.router.``, other ``.ffn.`` (dense), ``.adaln.``; and
    ``iter_embed.``.

    Executions per parameter come from its layer: ``loop.{i}.*`` runs ``loop_iters`` times. A
    parameter is a matmul weight when it has >= 2 dims (1-dim: norms, biases, router selection bias).
    """
    c = dict(total=0, embedding=0, head=0, attn=0, ffn=0, adaln=0, other=0,
             attn_active=0, ffn_active=0, adaln_active=0, distinct_active=0)
    layers: set[tuple[str, int]] = set()
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        n = p.numel()
        c["total"] += n
        m = _LAYER.match(name)
        if m:
            layers.add((m.group(1), int(m.group(2))))
        runs = cfg.loop_iters if m and m.group(1) == "loop" else 1
        matmul = p.dim() >= 2
        if name.startswith("embed"):
            c["embedding"] += n
        elif name.startswith("head"):
            c["head"] += n
        elif ".attn." in name and matmul:
            c["attn"] += n
            c["attn_active"] += runs * n
            c["distinct_active"] += n
        elif ".ffn." in name:
            c["ffn"] += n
            if not matmul:
                continue
            # Routed experts: stacked [E, ...]; each token uses exactly top_k of the E.
            share = n * cfg.top_k // cfg.n_experts if ".ffn.experts." in name else n
            c["ffn_active"] += runs * share
            c["distinct_active"] += share
        elif ".adaln." in name or name.startswith("iter_embed."):
            c["adaln"] += n
            per_token = matmul and ".adaln." in name and cfg.adaln in ("both", "token")
            if per_token:
                c["adaln_active"] += runs * n
                c["distinct_active"] += n
        else:
            c["other"] += n
    if cfg.tie_embeddings and c["head"] == 0:
        c["head"] = c["embedding"]  # the tied head still multiplies every token
    c["distinct_active"] += c["head"]
    executed = sum(cfg.loop_iters if kind == "loop" else 1 for kind, _ in layers)
    return ParamCounts(executed_layers=executed, **c)


# ---------------------------------------------------------------------------------------------------
# FLOPs and KV cache


def attention_score_flops_per_token(cfg: ModelConfig, seq_len: int, executed_layers: int | None = None) -> int:
    """QK^T + AV per token: 2 matmuls x 2 FLOPs x heads x head_dim x seq_len per executed layer."""
    layers = cfg.n_executed_layers if executed_layers is None else executed_layers
    return 4 * layers * cfg.n_heads * cfg.head_dim * seq_len


def flops_from_counts(counts: ParamCounts, cfg: ModelConfig, seq_len: int) -> int:
    return 2 * counts.active + attention_score_flops_per_token(cfg, seq_len, counts.executed_layers)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward FLOPs per token by the convention (formula); ``seq_len`` defaults to max_seq_len."""
    return flops_from_counts(counts_from_config(cfg), cfg, seq_len or cfg.max_seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward + backward = 3 x forward (backward = 2 x forward for matmuls)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def kv_cache_per_token(cfg: ModelConfig) -> int:
    """KV-cache elements per token: K and V for every EXECUTED layer (each iteration has its own)."""
    return 2 * cfg.n_executed_layers * cfg.n_kv_heads * cfg.head_dim


# ---------------------------------------------------------------------------------------------------
# Cross-check with torch's FLOP counter


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grouped_mm_flops(mat_a, mat_b, *args, out_val=None, **kwargs) -> int:
    """2 x rows x K x N for the routed experts' 2d x 3d grouped GEMM (torch's registry has no formula).
    Raw tensors (``_get_raw``): the rows in groups are ``offs[-1]``, which includes any alignment
    padding (none on the CPU; see moe.grouped_swiglu)."""
    offs = kwargs.get("offs", args[0] if args else None)
    rows = int(offs[-1]) if offs is not None and offs.numel() else mat_a.shape[0]
    return 2 * rows * mat_a.shape[-1] * mat_b.shape[-1]


_grouped_mm_flops._get_raw = True  # FlopCounterMode: pass the tensors, not their shapes


def measure_forward_flops(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Total forward FLOPs of ``model(tokens)`` counted by ``FlopCounterMode`` (matmuls and attention).

    FlopCounterMode counts mm/bmm/addmm/SDPA, no element-wise ops, and SDPA without causal discount
    -- i.e. our convention. Three details make the comparison exact:
    * the routed experts' grouped GEMM (``aten._grouped_mm``) has no formula in torch's registry; we
      register one (``_grouped_mm_flops``);
    * the CPU flash-attention kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no formula
      in torch's registry (it would count 0); we register the same formula torch uses on GPU;
    * routed experts only run on the tokens routed to them, so the count depends on the routing --
      except with dropless token-choice top-k, where every token hits exactly k experts: the expert
      matmul FLOPs are then 2 x T x k x (expert params) whatever the routing (use capacity_factor=0
      and dispatch="index"; the "einsum" dispatch adds one-hot matmuls of its own).
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _sdpa_cpu_flops
    mapping[torch.ops.aten._grouped_mm] = _grouped_mm_flops
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(tokens)
    return counter.get_total_flops()
