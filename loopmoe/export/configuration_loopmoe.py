"""Hugging Face config of an exported LoopMoE model (loaded with ``trust_remote_code=True``).

Self-contained: imports only ``transformers``, never the ``loopmoe`` training package, so whoever has
the exported folder can load it. Field meanings follow the training ``ModelConfig`` (docs/model.md);
the names of the standard fields follow transformers (``hidden_size`` = d_model, ...).

``num_hidden_layers`` is the number of EXECUTED layers, P + R*K + C: the KV cache holds one entry per
executed layer (a loop layer has one entry per iteration), and transformers sizes its caches by it.
"""
from __future__ import annotations

from transformers import PretrainedConfig


class LoopMoEConfig(PretrainedConfig):
    model_type = "loopmoe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 64000,
        hidden_size: int = 256,  # d_model
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 64,
        n_prelude: int = 1,  # P unique layers before the loop
        n_loop: int = 1,  # K shared layers in the loop block (0 = Vanilla MoE / plain stack)
        n_coda: int = 1,  # C unique layers after the loop
        loop_iters: int = 2,  # R: iterations of the loop block
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        ffn: str = "moe",  # "moe" or "dense"
        dense_hidden: int = 1024,
        n_experts: int = 8,
        expert_hidden: int = 256,
        num_experts_per_tok: int = 2,  # top-k routed experts per token
        n_shared_experts: int = 1,
        router_score: str = "topk_then_softmax",  # or "softmax_then_topk"
        aux_free_bias: bool = False,  # the router's selection bias was trained (it is always applied)
        adaln: str = "both",  # IterAdaLN: both | iter | token | none
        adaln_rank: int = 64,
        adaln_gate: str = "one_plus",  # one_plus | zero
        input_reinjection: bool = False,
        exit_after: int | None = None,  # run only this many loop iterations (1..R) for every token
        exit_entropy_threshold: float | None = None,  # per-token exit when the read-out entropy (nats) < this
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = 3,
        **kwargs,
    ):
        kwargs.pop("num_hidden_layers", None)  # derived below
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.n_prelude, self.n_loop, self.n_coda, self.loop_iters = n_prelude, n_loop, n_coda, loop_iters
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.ffn = ffn
        self.dense_hidden = dense_hidden
        self.n_experts, self.expert_hidden, self.num_experts_per_tok = n_experts, expert_hidden, num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.router_score = router_score
        self.aux_free_bias = aux_free_bias
        self.adaln, self.adaln_rank, self.adaln_gate = adaln, adaln_rank, adaln_gate
        self.input_reinjection = input_reinjection
        self.exit_after = exit_after
        self.exit_entropy_threshold = exit_entropy_threshold
        self.num_hidden_layers = n_prelude + (loop_iters * n_loop if n_loop else 0) + n_coda
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def n_iters(self) -> int:
        """R, or 1 when there is no loop."""
        return self.loop_iters if self.n_loop else 1
