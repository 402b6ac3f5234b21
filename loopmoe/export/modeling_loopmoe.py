"""Hugging Face model of an exported LoopMoE checkpoint (``AutoModelForCausalLM`` + ``trust_remote_code``).

Self-contained: imports only torch, transformers and the files exported beside it (never the ``loopmoe``
training package): ``modeling_loopmoe_layers.py`` (the layers), ``loopmoe_core.py`` (the shared maths,
a copy of loopmoe/model/core.py) and ``loopmoe_schedule.py`` (the execution order, a copy of
loopmoe/model/schedule.py). So it computes
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

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_loopmoe import LoopMoEConfig
from .loopmoe_core import entropy, masked_ce
from .loopmoe_schedule import LoopSchedule
from .modeling_loopmoe_layers import (CacheSlot, LoopMoEBlock, LoopMoEExperts, LoopMoEIterAdaLN,
                                      LoopMoEIterEmbed, LoopMoERMSNorm, LoopMoERouter, cache_length, rope_cos_sin)

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
        past = cache_length(cache)
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
            return layers[st.layer](h, cos, sin, mask, CacheSlot(cache, st.executed), e_k)

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
                self.model.layers[st.layer].propagate_kv(h_exit, cos, sin, CacheSlot(cache, st.executed), e_k)

    def _e(self, it: int):
        return self.model.iter_embed(it) if self.model.iter_embed is not None else None

    def _readout(self, h, cos, sin, mask, cache, commit: bool):
        """coda + norm + head; returns (logits, the coda layers' slots)."""
        layers, slots = self.model.layers, []

        def run_layer(st, h, e_k):
            slots.append(CacheSlot(cache, st.executed, commit))
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
            return layers[st.layer](h, cos, sin, mask, CacheSlot(cache, st.executed), e_k)

        def loop_layer(st, h, e_k):
            active, slot = state["active"], CacheSlot(cache, st.executed)
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
