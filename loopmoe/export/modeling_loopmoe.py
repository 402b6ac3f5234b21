"""Hugging Face model of an exported LoopMoE checkpoint (``AutoModelForCausalLM`` + ``trust_remote_code``).

Self-contained: imports only torch, transformers and the files exported beside it (never the ``loopmoe``
training package): ``loopmoe_core.py`` (the shared maths, a copy of loopmoe/model/core.py) and
``loopmoe_schedule.py`` (the execution order, a copy of loopmoe/model/schedule.py). So it computes
exactly what the training model (loopmoe/model, docs/model.md) computes, with the same lines:

    embed -> prelude (P unique layers) -> loop (K shared layers, R iterations, IterAdaLN) -> coda (C)
          -> RMSNorm -> lm_head

Layer ``u`` of ``model.layers`` is unique layer u in the order prelude, loop, coda (the training
model's ``model.layers`` order). Pre-norm blocks: GQA attention with RoPE (rotate-half), SwiGLU FFN
or MoE (fp32 router, top-k of logits + the aux-free selection bias, dropless; stacked experts
``gate_up_proj`` [E, d, 2h] and ``down_proj`` [E, h, d] applied as ``x @ W``, the training layout;
always-on shared experts without a gate).

KV cache (transformers' ``DynamicCache``): one entry per EXECUTED layer. The executed-layer index of
prelude layer u is u; of loop layer j in iteration k (0-based) P + k*K + j; of coda layer c
P + R*K + c. So a loop layer has one cache entry per iteration; ``config.num_hidden_layers`` is
P + R*K + C.

Early exit (docs/export.md):
- ``exit_after=k`` (argument or config): every token runs k of the R loop iterations, then coda +
  head: the training model's ``exit_after=k``.
- ``exit_entropy_threshold=t`` (argument or config, nats): per token, after each loop iteration
  k < R, the coda + head read out the distribution; the token exits when its entropy is below t.
  The coda layers read the cache entries of the earlier tokens (filled from THEIR exit states); the
  read-out of a token that does not exit is discarded. Tokens are processed one position at a time
  (the decision of a token depends on the states earlier tokens exited with), so the result does not
  depend on how the sequence is split into forward calls (cached == uncached generation).
- State propagation (CALM): the loop-layer cache entries of the iterations an exited token skipped are
  filled with the K/V each skipped layer computes from the token's exit state h_exit, i.e.
  ``k_proj/v_proj(modulate(RMSNorm(h_exit), IterAdaLN_j(k, h_exit)))`` with RoPE at its position, so
  later tokens that run those iterations attend to it. The fixed ``exit_after`` mode fills them the
  same way when a cache is used, so every cache entry always covers every position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_loopmoe import LoopMoEConfig
from .loopmoe_core import (adaln_gate, adaln_modulation, attention_input, block, entropy, iter_embedding,
                           masked_ce, rope_angles, rotate)
from .loopmoe_schedule import LoopSchedule

# transformers 5.x renamed the output's ``past_key_values`` to ``cache``; support both.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_TF_MAJOR = int(__import__("transformers").__version__.split(".")[0])


@dataclass
class LoopMoECausalLMOutput(CausalLMOutputWithPast):
    """``exit_logits``: logits after loop iterations 1..n (the last equals ``logits``), with
    ``output_exit_logits=True`` (no cache). ``exit_iterations`` [b, s]: loop iterations each token ran."""

    exit_logits: tuple[torch.Tensor, ...] | None = None
    exit_iterations: torch.LongTensor | None = None


# ---------------------------------------------------------------------------------------------------
# Layers


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


class _Slot:
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
        past = _cached_kv(self.cache, self.idx)
        if past is None:
            return k, v
        return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)


def _cached_kv(cache: Cache, idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
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


def _cache_length(cache: Cache | None) -> int:
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

    def forward(self, x, cos, sin, mask, slot: _Slot | None):
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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
        logits = F.linear(x.float(), self.weight.float())
        topk = (logits + self.e_score_correction_bias.float()).topk(self.k, dim=-1).indices
        if self.score == "topk_then_softmax":
            gates = logits.gather(1, topk).softmax(dim=-1)
        else:
            gates = logits.softmax(dim=-1).gather(1, topk)
        return topk, gates


class LoopMoEExperts(nn.Module):
    """Stacked SwiGLU experts, training layout: gate_up_proj [E, d, 2h] (gate | up), down_proj [E, h, d]."""

    def __init__(self, cfg: LoopMoEConfig):
        super().__init__()
        E, d, h = cfg.n_experts, cfg.hidden_size, cfg.expert_hidden
        self.n = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, d, 2 * h))
        self.down_proj = nn.Parameter(torch.empty(E, h, d))

    def forward(self, x, topk, gates):  # x [T, d] -> [T, d]; dropless index dispatch as in training
        T, k = topk.shape
        flat = topk.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n).tolist()
        token = order // k
        outs = []
        for e, xe in enumerate(x[token].split(counts)):
            if xe.shape[0] == 0:
                continue
            g, u = (xe @ self.gate_up_proj[e]).chunk(2, dim=-1)
            outs.append((F.silu(g) * u) @ self.down_proj[e])
        ys = torch.cat(outs) if outs else x[token]
        w = gates.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, ys.float() * w).to(x.dtype)


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


# ---------------------------------------------------------------------------------------------------
# Models


class LoopMoEPreTrainedModel(PreTrainedModel):
    config_class = LoopMoEConfig
    base_model_prefix = "model"
    _no_split_modules = ["LoopMoEBlock"]
    _supports_sdpa = True
    _supports_cache_class = True
    supports_gradient_checkpointing = False

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, LoopMoERMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, LoopMoERouter):
            nn.init.normal_(module.weight, 0.0, std)
            nn.init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, LoopMoEExperts):
            nn.init.normal_(module.gate_up_proj, 0.0, std)
            nn.init.normal_(module.down_proj, 0.0, std)
        if isinstance(module, LoopMoEIterAdaLN):  # adaLN-Zero
            nn.init.zeros_(module.modulation.weight)
            nn.init.zeros_(module.modulation.bias)


class LoopMoETextModel(LoopMoEPreTrainedModel):
    """The trunk: embeddings, unique blocks (prelude, loop, coda), iteration embedding, final norm."""

    def __init__(self, config: LoopMoEConfig):
        super().__init__(config)
        P, K, C = config.n_prelude, config.n_loop, config.n_coda
        in_loop = config.adaln != "none"
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LoopMoEBlock(config, adaln=in_loop and P <= u < P + K) for u in range(P + K + C))
        self.iter_embed = (LoopMoEIterEmbed(config.adaln_rank)
                           if K and config.adaln in ("both", "iter") else None)
        self.norm = LoopMoERMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value


class LoopMoEForCausalLM(LoopMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if _TF_MAJOR >= 5 else ["lm_head.weight"])

    def __init__(self, config: LoopMoEConfig):
        super().__init__(config)
        self.model = LoopMoETextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def schedule(self) -> LoopSchedule:
        return LoopSchedule.from_config(self.config)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        exit_after: int | None = None,
        exit_entropy_threshold: float | None = None,
        output_exit_logits: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> LoopMoECausalLMOutput:
        """``attention_mask`` [b, past + s] (1 = token, 0 = padding; left or right padding);
        ``position_ids`` default to the mask's running count (or past .. past+s-1). ``exit_after`` /
        ``exit_entropy_threshold`` override the config's values (see the module docstring).
        ``labels`` (unshifted, -100 = ignore) give the plain next-token cross-entropy: the MoE aux
        losses and the aux-free bias update exist only in the training code."""
        cfg = self.config
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(cfg, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        exit_after = exit_after if exit_after is not None else cfg.exit_after
        threshold = exit_entropy_threshold if exit_entropy_threshold is not None else cfg.exit_entropy_threshold
        R = cfg.n_iters
        if exit_after is not None and not 1 <= exit_after <= R:
            raise ValueError(f"exit_after={exit_after} must be in 1..{R} (loop iterations)")
        n_max = exit_after or R
        if output_exit_logits and cache is not None:
            raise ValueError("output_exit_logits needs use_cache=False (the read-outs see the whole sequence)")

        h = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, _ = h.shape
        past = _cache_length(cache)
        if attention_mask is not None and attention_mask.shape[1] == s and past:
            attention_mask = torch.cat([attention_mask.new_ones(b, past), attention_mask], dim=1)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
            else:
                position_ids = torch.arange(past, past + s, device=h.device).expand(b, s)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)
        padded = attention_mask is not None and not bool(attention_mask.all())

        exit_iters = None
        exit_logits = None
        if threshold is not None and n_max > 1:
            logits, exit_iters = self._entropy_forward(h, cos, sin, attention_mask if padded else None,
                                                       cache, past, n_max, float(threshold))
        else:
            mask = _attention_mask(attention_mask, b, s, past, h.device) if padded else None
            logits, exits = self._parallel_forward(h, cos, sin, mask, cache, n_max, output_exit_logits)
            if output_exit_logits:
                exit_logits = (*exits, logits)
            exit_iters = torch.full((b, s), n_max, dtype=torch.long, device=h.device)

        loss = None
        if labels is not None:
            targets = labels[:, 1:].to(logits.device)  # -100 = ignore
            loss = masked_ce(logits[:, :-1], targets.clamp(min=0), targets != -100)
        out = LoopMoECausalLMOutput(loss=loss, logits=logits, exit_logits=exit_logits, exit_iterations=exit_iters,
                                    **{_CACHE_FIELD: cache})
        return out.to_tuple() if return_dict is False else out

    # -- the standard pass (also fixed early exit)
    def _parallel_forward(self, h, cos, sin, mask, cache, n_iters, want_exits):
        sched, layers = self.schedule, self.model.layers

        def run_layer(st, h, e_k):  # every executed layer of the trunk
            return layers[st.layer](h, cos, sin, mask, _Slot(cache, st.executed), e_k)

        exits = []
        read_exit = (lambda it, h: exits.append(self._readout(h, cos, sin, mask, None, commit=True)[0])
                     if want_exits else None)
        h = sched.prelude(h, run_layer)
        h = sched.loop(h, run_layer, self.model.iter_embed, n_iters, read_exit)
        if cache is not None:  # iterations skipped by a fixed exit: state propagation from h
            self._propagate(h, cos, sin, cache, range(n_iters, sched.R))
        logits, _ = self._readout(h, cos, sin, mask, cache, commit=True)
        return logits, exits

    def _propagate(self, h_exit, cos, sin, cache, iterations):
        """Fill the loop layers' cache entries of ``iterations`` with the K/V computed from ``h_exit``."""
        for it in iterations:
            e_k = self._e(it)
            for st in self.schedule.loop_steps(it):
                self.model.layers[st.layer].propagate_kv(h_exit, cos, sin, _Slot(cache, st.executed), e_k)

    def _e(self, it: int):
        return self.model.iter_embed(it) if self.model.iter_embed is not None else None

    def _readout(self, h, cos, sin, mask, cache, commit: bool):
        """coda + norm + head; returns (logits, the coda layers' slots)."""
        layers, slots = self.model.layers, []

        def run_layer(st, h, e_k):
            slots.append(_Slot(cache, st.executed, commit))
            return layers[st.layer](h, cos, sin, mask, slots[-1], e_k)

        h = self.schedule.coda(h, run_layer)
        return self.lm_head(self.model.norm(h)), slots

    # -- per-token entropy exit -----------------------------------------------------------------------
    def _entropy_forward(self, h, cos, sin, attention_mask, cache, past, n_max, threshold):
        """One position at a time (see the module docstring); a temporary cache when none is kept."""
        b, s, _ = h.shape
        work = cache if cache is not None else DynamicCache()
        logits, iters = [], []
        for t in range(s):
            mask = None
            if attention_mask is not None:
                mask = attention_mask[:, None, None, : past + t + 1].bool().clone()
                mask[..., -1] = True  # a padding query attends to itself (its output is unused)
            lg, it = self._entropy_step(h[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], mask, work, n_max, threshold)
            logits.append(lg)
            iters.append(it)
        return torch.cat(logits, dim=1), torch.stack(iters, dim=1)

    def _entropy_step(self, h, cos, sin, mask, cache, n_max, threshold):
        sched, layers = self.schedule, self.model.layers
        b = h.shape[0]
        state = {"active": torch.ones(b, dtype=torch.bool, device=h.device), "logits": None}
        h_exit = [h]  # exited rows: their exit state (state propagation)
        iters = torch.full((b,), n_max, dtype=torch.long, device=h.device)
        coda_kv = [None] * sched.C

        def keep(sel, new, old):  # rows in sel take new
            if old is None:
                return new
            return torch.where(sel.view(-1, *([1] * (new.dim() - 1))), new, old)

        def prelude_layer(st, h, e_k):
            return layers[st.layer](h, cos, sin, mask, _Slot(cache, st.executed), e_k)

        def loop_layer(st, h, e_k):
            active, slot = state["active"], _Slot(cache, st.executed)
            if not bool(active.any()):  # everyone exited: only propagate K/V from h_exit
                layers[st.layer].propagate_kv(h_exit[0], cos, sin, slot, e_k)
                return h
            y = layers[st.layer](keep(active, h, h_exit[0]), cos, sin, mask, slot, e_k)
            return keep(active, y, h_exit[0])

        def decide(it, h):  # read out after iteration it; the running tokens below the threshold exit
            nonlocal iters
            active = state["active"]
            if not bool(active.any()):
                return
            lg, slots = self._readout(h, cos, sin, mask, cache, commit=False)
            now = active & (entropy(lg[:, -1]) < threshold) if it < n_max - 1 else active  # entropy [b], nats
            state["logits"] = keep(now, lg, state["logits"])
            for c in range(sched.C):
                k_new, v_new = slots[c].new
                coda_kv[c] = (keep(now, k_new, coda_kv[c][0] if coda_kv[c] else None),
                              keep(now, v_new, coda_kv[c][1] if coda_kv[c] else None))
            iters = torch.where(now, torch.full_like(iters, it + 1), iters)
            h_exit[0] = keep(now, h, h_exit[0])
            state["active"] = active & ~now

        h = sched.prelude(h, prelude_layer)
        h_exit[0] = h
        h = sched.loop(h, loop_layer, self._e, n_max, decide)
        decide(n_max - 1, h)  # the last iteration run: every token still running exits here
        self._propagate(h_exit[0], cos, sin, cache, range(n_max, sched.R))  # beyond a fixed exit_after
        for c, st in enumerate(sched.coda_steps()):
            cache.update(coda_kv[c][0], coda_kv[c][1], st.executed)
        if state["logits"] is None:  # pragma: no cover - n_max >= 1 always sets it
            raise RuntimeError("no read-out")
        return state["logits"], iters


def _attention_mask(attention_mask, b, s, past, device):
    """Boolean [b, 1, s, past+s]: causal AND key is not padding; a row with no visible key (a padding
    query before any token) attends to itself so SDPA stays finite (its output is unused)."""
    L = past + s
    causal = torch.ones(s, L, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = causal[None, None] & attention_mask[:, None, None, :L].bool()
    diag = torch.arange(s, device=device)
    mask[:, :, diag, past + diag] = True
    return mask


__all__ = ["LoopMoEForCausalLM", "LoopMoETextModel", "LoopMoEPreTrainedModel", "LoopMoECausalLMOutput"]
