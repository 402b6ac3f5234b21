"""Hugging Face folder -> training checkpoint (the reverse of ``loopmoe.export.hf``).

    python -m loopmoe.export.to_training --hf hf/demo --out runs/from_hf/checkpoints [--step 1000]

Reads a folder written by ``python -m loopmoe.export.hf`` (or a fine-tuned copy of one: remote-code
``loopmoe`` or the stock Llama / Mixtral / GraniteMoeShared exports) through transformers and writes

    OUT/step_XXXXXXXX/config.yaml                    the training Config (from loopmoe_export.json when
                                                     present, the architecture from config.json)
    OUT/step_XXXXXXXX/mp_rank_00_model_states.pt     {"module": state dict, ...}: the DeepSpeed-style weights
                                                     file load_trained_model still reads (not dist/)
    OUT/latest                                       names that step directory

which ``loopmoe.train.checkpoint.load_trained_model(OUT)`` loads. It is a weights-only checkpoint (no
optimizer or scheduler state, no ZeRO files, no RNG states): resuming training from it needs a
"load module only" start in the trainer.
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import json
import math
import os
import sys

import torch

from loopmoe.export.hf import EXPORT_META, HF_TO_MODEL_FIELDS, hf_to_training

STOCK = ("llama", "mixtral", "granitemoeshared")


def _training_config(hf_dir: str):
    """The Config saved at export time (or defaults), to be overridden by the HF config's architecture."""
    from loopmoe.config import Config

    meta_path = os.path.join(hf_dir, EXPORT_META)
    if not os.path.exists(meta_path):
        return Config.from_dict({}), None
    with open(meta_path) as f:
        meta = json.load(f)
    return Config.from_dict(meta["training_config"], f"{meta_path}: training_config"), meta


def model_config_from_hf(config, mc):
    """Overwrite the architecture fields of ModelConfig ``mc`` from a transformers config (in place)."""
    mt = config.model_type
    if mt == "loopmoe":
        for hf_name, ours in HF_TO_MODEL_FIELDS.items():
            setattr(mc, ours, getattr(config, hf_name))
        return mc
    if mt not in STOCK:
        raise ValueError(f"model_type {mt!r}: only loopmoe and the stock exports {STOCK} convert back")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if rope.get("rope_type", "default") != "default" or theta is None:
        raise ValueError(f"rope {rope}: only plain RoPE converts back")
    n_layers = config.num_hidden_layers
    if mc.n_unique_layers != n_layers or not (mc.n_loop == 0 or (mc.loop_iters == 1 and mc.adaln == "none")):
        mc.n_prelude, mc.n_loop, mc.n_coda, mc.loop_iters = n_layers, 0, 0, 1  # a plain stack
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mc.vocab_size, mc.d_model = config.vocab_size, config.hidden_size
    mc.n_heads, mc.n_kv_heads, mc.head_dim = config.num_attention_heads, config.num_key_value_heads, head_dim
    mc.max_seq_len, mc.rope_theta, mc.norm_eps = config.max_position_embeddings, float(theta), config.rms_norm_eps
    mc.tie_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "attention_bias", False):
        raise ValueError("only SwiGLU (silu) blocks without attention biases convert back")
    if mt == "llama":
        if getattr(config, "mlp_bias", False):
            raise ValueError("Llama with mlp_bias does not convert back")
        mc.ffn, mc.dense_hidden = "dense", config.intermediate_size
        return mc
    mc.ffn, mc.n_experts, mc.top_k = "moe", config.num_local_experts, config.num_experts_per_tok
    mc.expert_hidden, mc.router_score, mc.aux_free_bias = config.intermediate_size, "topk_then_softmax", False
    if mt == "mixtral":
        if getattr(config, "sliding_window", None):
            raise ValueError("Mixtral with a sliding window does not convert back")
        mc.n_shared_experts = 0
        return mc
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if getattr(config, name) != 1.0:
            raise ValueError(f"GraniteMoeShared with {name}={getattr(config, name)} (not 1) does not convert back")
    if not math.isclose(config.attention_multiplier, 1.0 / math.sqrt(head_dim), rel_tol=1e-6):
        raise ValueError("GraniteMoeShared with attention_multiplier != 1/sqrt(head_dim) does not convert back")
    shared = config.shared_intermediate_size
    if shared % config.intermediate_size:
        raise ValueError(f"shared_intermediate_size {shared} is not a multiple of intermediate_size")
    mc.n_shared_experts = shared // config.intermediate_size
    return mc


def to_training(hf_dir: str, out: str, step: int | None = None) -> str:
    """Write the training checkpoint for ``hf_dir`` under ``out``; returns the step directory."""
    from transformers import AutoModelForCausalLM

    from loopmoe.config import save_config, validate
    from loopmoe.model import LoopMoEModel
    from loopmoe.train.checkpoint import LATEST, step_tag

    cfg, meta = _training_config(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32)
    arch = hf.config.model_type
    model_config_from_hf(hf.config, cfg.model)
    validate(cfg)
    sd = hf_to_training({k: v.detach().cpu() for k, v in hf.state_dict().items()}, cfg.model, arch)

    mc = cfg.model
    backend, mc.linear_backend = mc.linear_backend, "torch"
    with torch.device("meta"):
        check = LoopMoEModel(mc)
    mc.linear_backend = backend
    expected = set(check.state_dict())
    if set(sd) != expected:
        raise RuntimeError(f"converted weights do not match the training model: missing {sorted(expected - set(sd))}, "
                           f"unexpected {sorted(set(sd) - expected)}")
    for k, t in check.state_dict().items():
        if tuple(t.shape) != tuple(sd[k].shape):
            raise RuntimeError(f"{k}: shape {tuple(sd[k].shape)}, the training model has {tuple(t.shape)}")

    if step is None:
        step = 0
        src = (meta or {}).get("source") or ""
        base = os.path.basename(str(src).rstrip("/"))
        if base.startswith("step_") and base[5:].isdigit():
            step = int(base[5:])
    step_dir = os.path.join(out, step_tag(step))
    os.makedirs(step_dir, exist_ok=True)
    save_config(cfg, os.path.join(step_dir, "config.yaml"))
    buffers = [k for k in sd if k.endswith("ffn.router.bias")]
    states = {"module": {k: v.contiguous() for k, v in sd.items()}, "buffer_names": buffers, "optimizer": None,
              "lr_scheduler": None, "global_steps": step, "global_samples": 0, "skipped_steps": 0,
              "dp_world_size": 1, "mp_world_size": 1, "step": step, "consumed_samples": 0,
              "converted_from": os.path.abspath(hf_dir)}
    torch.save(states, os.path.join(step_dir, "mp_rank_00_model_states.pt"))
    with open(os.path.join(out, LATEST), "w") as f:
        f.write(step_tag(step))
    return step_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loopmoe.export.to_training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face folder (written by loopmoe.export.hf)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (step_* dir + latest)")
    ap.add_argument("--step", type=int, help="step number of the written step_* dir (default: the exported step)")
    args = ap.parse_args(argv)
    step_dir = to_training(args.hf, args.out, args.step)
    print(f"wrote {step_dir} (weights only); load with loopmoe.train.checkpoint.load_trained_model({args.out!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
