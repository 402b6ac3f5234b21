"""Export a training checkpoint to a Hugging Face folder (safetensors, config, tokenizer, generation config).

    python -m loopmoe.export.hf --checkpoint runs/demo/checkpoints --out hf/demo
    python -m loopmoe.export.hf --checkpoint runs/demo/checkpoints/step_00000200 --out hf/demo \\
        --tokenizer data/tokenizer/spm.model --dtype bfloat16 --max-shard-size 2GB

The checkpoint is read with ``loopmoe.train.checkpoint.load_trained_model`` (the full, unsharded model
and its Config). What is written (docs/export.md):

* LoopMoE and dense looped models: ``config.json`` (model_type ``loopmoe``, ``auto_map`` for
  AutoConfig / AutoModelForCausalLM) + ``configuration_loopmoe.py`` + ``modeling_loopmoe.py`` copied
  in: load with ``trust_remote_code=True``; they import only torch and transformers.
* Models without a loop whose block a stock transformers class computes exactly (``--arch auto``):
  dense -> ``LlamaForCausalLM``; MoE with top-k-then-softmax routing and no trained selection bias ->
  ``MixtralForCausalLM`` (no shared expert) or ``GraniteMoeSharedForCausalLM`` (ungated shared
  experts, n_heads * head_dim == d_model; all Granite multipliers 1, attention multiplier
  1/sqrt(head_dim)). Everything else uses the remote-code class; the reason is printed and stored in
  ``loopmoe_export.json`` (docs/export.md has the table).
* ``model*.safetensors`` (+ ``model.safetensors.index.json`` when sharded), ``generation_config.json``,
  ``loopmoe_export.json`` (source checkpoint, the full training config, the architecture decision).
* The tokenizer: ``tokenizer.json`` + ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast`` built
  from the sentencepiece model and checked to encode identically to it), and the original model as
  ``sentencepiece.model``. No BOS/EOS is added when encoding: the training data has none at document
  starts (data_tools/preprocess.py appends EOS after each document).

Files: state_dict.py (parameter names both ways), tokenizer.py (the tokenizer), this file (the
architecture decision, the export itself and its command line).
"""
from __future__ import annotations

if __name__ == "__main__":  # a quiet start, before megatron-core or DeepSpeed is imported (loopmoe/quiet.py)
    from loopmoe.quiet import quiet_start

    quiet_start()

import argparse
import json
import logging
import math
import os
import shutil
import sys
from typing import Any

import torch

from loopmoe.export.state_dict import (fuse_qkv, hf_to_training, split_qkv, training_to_hf,  # noqa: F401
                                       unique_index, unique_name)
from loopmoe.export.tokenizer import _TOKENIZER_PROBES, build_tokenizer, json_tokenizer, spm_special_ids  # noqa: F401

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(os.path.dirname(HERE), "model")
# remote-code files of an export -> their source: the shared maths and the execution order are the
# training model's own files (modeling_loopmoe.py imports them relatively under these names)
REMOTE_FILES = {"configuration_loopmoe.py": os.path.join(HERE, "configuration_loopmoe.py"),
                "modeling_loopmoe.py": os.path.join(HERE, "modeling_loopmoe.py"),
                "modeling_loopmoe_layers.py": os.path.join(HERE, "modeling_loopmoe_layers.py"),
                "loopmoe_core.py": os.path.join(MODEL_DIR, "core.py"),
                "loopmoe_schedule.py": os.path.join(MODEL_DIR, "schedule.py")}
AUTO_MAP = {"AutoConfig": "configuration_loopmoe.LoopMoEConfig",
            "AutoModelForCausalLM": "modeling_loopmoe.LoopMoEForCausalLM"}
EXPORT_META = "loopmoe_export.json"
SPM_COPY = "sentencepiece.model"
DEFAULT_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}  # data_tools/train_tokenizer.py defaults

# ---------------------------------------------------------------------------------------------------
# Configs and the architecture decision


def hf_config_kwargs(mc, ids: dict[str, int | None]) -> dict[str, Any]:
    """LoopMoEConfig keyword arguments from a training ModelConfig."""
    return dict(
        vocab_size=mc.vocab_size, hidden_size=mc.d_model, num_attention_heads=mc.n_heads,
        num_key_value_heads=mc.n_kv_heads, head_dim=mc.head_dim, n_prelude=mc.n_prelude, n_loop=mc.n_loop,
        n_coda=mc.n_coda, loop_iters=mc.loop_iters, max_position_embeddings=mc.max_seq_len,
        rope_theta=float(mc.rope_theta), rms_norm_eps=mc.norm_eps, ffn=mc.ffn, dense_hidden=mc.dense_hidden,
        n_experts=mc.n_experts, expert_hidden=mc.expert_hidden, num_experts_per_tok=mc.top_k,
        n_shared_experts=mc.n_shared_experts, router_score=mc.router_score, aux_free_bias=mc.aux_free_bias,
        adaln=mc.adaln, adaln_rank=mc.adaln_rank, adaln_gate=mc.adaln_gate,
        input_reinjection=mc.input_reinjection, tie_word_embeddings=mc.tie_embeddings,
        bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"),
    )


# Training ModelConfig fields carried by LoopMoEConfig (the reverse converter reads them back).
HF_TO_MODEL_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim", "n_prelude": "n_prelude", "n_loop": "n_loop",
    "n_coda": "n_coda", "loop_iters": "loop_iters", "max_position_embeddings": "max_seq_len",
    "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "ffn": "ffn", "dense_hidden": "dense_hidden",
    "n_experts": "n_experts", "expert_hidden": "expert_hidden", "num_experts_per_tok": "top_k",
    "n_shared_experts": "n_shared_experts", "router_score": "router_score", "aux_free_bias": "aux_free_bias",
    "adaln": "adaln", "adaln_rank": "adaln_rank", "adaln_gate": "adaln_gate",
    "input_reinjection": "input_reinjection", "tie_word_embeddings": "tie_embeddings",
}


def is_plain_stack(mc) -> bool:
    """Every layer runs once with its own weights and no modulation (no loop, or R=1 without IterAdaLN)."""
    return mc.n_loop == 0 or (mc.loop_iters == 1 and mc.adaln == "none")


def choose_arch(mc, sd: dict[str, torch.Tensor], requested: str = "auto") -> tuple[str, str]:
    """("loopmoe" | "llama" | "mixtral" | "granitemoeshared", why). Stock only where it is exact."""
    arch, why = _stock_choice(mc, sd)
    if requested == "remote":
        return "loopmoe", "remote-code class requested (--arch remote)"
    if requested not in ("auto", arch):
        raise ValueError(f"--arch {requested} does not compute this model exactly ({why}); use auto or remote")
    if arch != "loopmoe":
        try:
            stock_config(arch, mc, DEFAULT_IDS)
        except Exception as e:  # e.g. transformers' own shape checks (Llama wants d_model % n_heads == 0)
            return "loopmoe", f"{arch} would fit but transformers refuses its config ({e}); remote code used"
    return arch, why


def _stock_choice(mc, sd) -> tuple[str, str]:
    if not is_plain_stack(mc):
        return "loopmoe", ("looped model (a shared block iterated loop_iters times, IterAdaLN): no stock "
                           "transformers class runs a layer more than once")
    if mc.ffn == "dense":
        why = ("dense, no loop: LlamaForCausalLM computes exactly this block (pre-norm RMSNorm, GQA with "
               "rotate-half RoPE, no biases, SwiGLU)")
        arch = "llama"
    else:
        biased = [k for k, t in sd.items() if k.endswith("ffn.router.bias") and bool(t.ne(0).any())]
        if biased:
            return "loopmoe", (f"the aux-loss-free selection bias is non-zero ({len(biased)} routers): selection "
                               "is top-k of logits + bias with softmax gates over the unbiased logits; no stock "
                               "class does that (DeepSeek-V3/GLM4-MoE add their bias to sigmoid scores)")
        if mc.router_score != "topk_then_softmax":
            return "loopmoe", ("router_score=softmax_then_topk (gates not renormalised): only Qwen2Moe "
                               "(norm_topk_prob=False) has it, and its shared expert is sigmoid-gated (exact "
                               "only by a zero gate and a doubled down-projection; not done)")
        if mc.n_shared_experts == 0:
            arch, why = "mixtral", ("MoE without shared experts, no loop: MixtralForCausalLM (softmax, top-k, "
                                    "renormalise == softmax over the top-k logits)")
        else:
            arch, why = "granitemoeshared", (
                "MoE with ungated shared experts, no loop: GraniteMoeSharedForCausalLM (top-k of logits, softmax "
                "over them, shared SwiGLU without gate; embedding/residual/logit multipliers 1, attention "
                "multiplier 1/sqrt(head_dim)). Qwen2Moe gates its shared expert by a sigmoid, OLMoE/Qwen3-MoE "
                "have QK-norm, Mixtral has no shared expert")
            if mc.n_heads * mc.head_dim != mc.d_model:
                return "loopmoe", ("GraniteMoeShared would fit, but transformers 4.x builds it only with "
                                   "n_heads * head_dim == d_model; remote code keeps the export loadable there")
    return arch, why


def stock_config(arch: str, mc, ids: dict[str, int | None]):
    import transformers as tf

    common = dict(
        vocab_size=mc.vocab_size, hidden_size=mc.d_model, num_attention_heads=mc.n_heads,
        num_key_value_heads=mc.n_kv_heads, head_dim=mc.head_dim, num_hidden_layers=mc.n_unique_layers,
        max_position_embeddings=mc.max_seq_len, rms_norm_eps=mc.norm_eps, rope_theta=float(mc.rope_theta),
        tie_word_embeddings=mc.tie_embeddings, hidden_act="silu", bos_token_id=ids.get("bos"),
        eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"), attention_dropout=0.0)
    if arch == "llama":
        return tf.LlamaConfig(**common, intermediate_size=mc.dense_hidden, attention_bias=False, mlp_bias=False)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=mc.expert_hidden, num_local_experts=mc.n_experts,
                                num_experts_per_tok=mc.top_k, router_jitter_noise=0.0, sliding_window=None)
    if arch == "granitemoeshared":
        return tf.GraniteMoeSharedConfig(
            **common, intermediate_size=mc.expert_hidden, shared_intermediate_size=mc.n_shared_experts * mc.expert_hidden,
            num_local_experts=mc.n_experts, num_experts_per_tok=mc.top_k, attention_bias=False,
            embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
            attention_multiplier=1.0 / math.sqrt(mc.head_dim))
    raise ValueError(arch)


def build_hf_model(model, mc, ids: dict[str, int | None], arch: str):
    """An in-memory HF model with the training model's weights (fp32, eval mode)."""
    sd = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
          for k, v in model.state_dict().items()}
    hsd = training_to_hf(sd, mc, arch)
    if arch == "loopmoe":
        from loopmoe.export.configuration_loopmoe import LoopMoEConfig
        from loopmoe.export.modeling_loopmoe import LoopMoEForCausalLM

        config = LoopMoEConfig(**hf_config_kwargs(mc, ids))
        config.auto_map = dict(AUTO_MAP)
        hf = LoopMoEForCausalLM(config)
    else:
        import transformers as tf

        config = stock_config(arch, mc, ids)
        cls = {"llama": tf.LlamaForCausalLM, "mixtral": tf.MixtralForCausalLM,
               "granitemoeshared": tf.GraniteMoeSharedForCausalLM}[arch]
        hf = cls(config)
    missing, unexpected = hf.load_state_dict(hsd, strict=False)
    missing = [k for k in missing if not (mc.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{arch}: weights do not line up (missing {missing}, unexpected {unexpected}); the "
                           "installed transformers may name its parameters differently")
    return hf.eval()


# ---------------------------------------------------------------------------------------------------
# Export


class ExportError(ValueError):
    """The export cannot start (an output folder that is not empty...); the message says the fix."""


def check_out(out: str, overwrite: bool) -> None:
    """A non-empty ``out`` is replaced only when asked: an export of 1,000 steps must not be lost to one of
    60 without a word."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out {out}: a file, not a folder; choose another --out")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ExportError(f"--out {out} is not empty ({len(os.listdir(out))} entries); pass --overwrite to replace "
                          f"it (the old export stays until the new one is complete), or choose another --out")


def publish_folder(work: str, out: str) -> None:
    """``work`` (complete) becomes ``out``: the old folder is moved aside, the new one renamed in, the old
    one deleted. At every moment ``out`` is the old export or the new one (a window of two renames
    where it is absent), never a mixture."""
    old = None
    if os.path.isdir(out):
        old = _sibling(out, "old")
        os.rename(out, old)
    os.rename(work, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sibling(out: str, what: str) -> str:
    """A hidden name beside ``out`` (same file system: the renames are atomic)."""
    parent, name = os.path.split(os.path.abspath(out.rstrip(os.sep)))
    return os.path.join(parent, f".{name}.{what}-{os.getpid()}")


def export(model, cfg, out: str, tokenizer: str | None = None, dtype: str = "float32",
           max_shard_size: str | int = "2GB", arch: str = "auto", source: str | None = None,
           overwrite: bool = False) -> dict:
    """Write the HF folder ``out`` for a training model + Config; returns the export summary. The folder is
    written under a temporary name beside ``out`` and renamed when complete: a failed export leaves the
    previous one intact. A non-empty ``out`` needs ``overwrite``."""
    check_out(out, overwrite)
    work = _sibling(out, "tmp")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        summary = _export_into(model, cfg, work, tokenizer, dtype, max_shard_size, arch, source)
        publish_folder(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _export_into(model, cfg, out: str, tokenizer: str | None, dtype: str, max_shard_size: str | int, arch: str,
                 source: str | None) -> dict:
    """The export itself, into the empty folder ``out``."""
    from transformers import GenerationConfig

    mc = cfg.model
    if mc.capacity_factor > 0:
        log.warning("model.capacity_factor=%s: the export is dropless (no token is dropped at inference), so "
                    "logits differ where the training forward would drop tokens", mc.capacity_factor)
    tok_path = tokenizer or (cfg.data.tokenizer_model if cfg.data.tokenizer_model and
                             os.path.isfile(cfg.data.tokenizer_model) else None)
    from loopmoe.data.tokenizer import TextTokenizer

    text_tok = TextTokenizer(tok_path) if tok_path else None  # a sentencepiece .model or a tokenizer.json
    tok_json = text_tok is not None and text_tok.is_json
    ids = (spm_special_ids(tok_path) if not tok_json else
           {"unk": text_tok.unk_id, "bos": text_tok.bos_id, "eos": text_tok.eos_id, "pad": text_tok.pad_id}
           ) if tok_path else dict(DEFAULT_IDS)
    if tok_path:
        n = text_tok.vocab_size
        if n > mc.vocab_size:
            raise ValueError(f"{tok_path} has {n} pieces, more than the model's vocab_size {mc.vocab_size}: "
                             "wrong tokenizer for this checkpoint?")
    if not tok_path:
        log.warning("no tokenizer (pass --tokenizer PATH.model): ids bos/eos/pad default to %s", DEFAULT_IDS)
    if tok_json:  # already a Hugging Face tokenizer: wrapped as it is, with its special tokens named
        hf_tok = json_tokenizer(text_tok, model_max_length=mc.max_seq_len)
    else:
        hf_tok = build_tokenizer(tok_path, model_max_length=mc.max_seq_len) if tok_path else None  # checked first
    sd = model.state_dict()
    chosen, why = choose_arch(mc, sd, arch)
    hf = build_hf_model(model, mc, ids, chosen)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hf = hf.to(torch_dtype)
    hf.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                            pad_token_id=ids["pad"])
    hf.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    if chosen == "loopmoe":
        for name, src in REMOTE_FILES.items():
            shutil.copyfile(src, os.path.join(out, name))
        with open(os.path.join(out, "config.json")) as f:  # auto_map must be there (some versions drop it)
            conf = json.load(f)
        if conf.get("auto_map") != AUTO_MAP:
            conf["auto_map"] = dict(AUTO_MAP)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(conf, f, indent=2, sort_keys=True)
    if hf_tok is not None:
        hf_tok.save_pretrained(out)
        tc_path = os.path.join(out, "tokenizer_config.json")
        with open(tc_path) as f:  # the portable class name (transformers 5 writes "TokenizersBackend")
            tc = json.load(f)
        tc.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
        with open(tc_path, "w") as f:
            json.dump(tc, f, indent=2, sort_keys=True)
        if not tok_json:
            shutil.copyfile(tok_path, os.path.join(out, SPM_COPY))
    from loopmoe.config import to_dict

    summary = {"arch": chosen, "why": why, "dtype": dtype, "source": source, "tokenizer": tok_path,
               "special_ids": ids, "add_bos": False,
               "executed_layers": mc.n_executed_layers, "unique_layers": mc.n_unique_layers,
               "training_config": to_dict(cfg)}
    with open(os.path.join(out, EXPORT_META), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def export_checkpoint(checkpoint: str, out: str, tag: str | None = None, overwrite: bool = False, **kw) -> dict:
    from loopmoe.train.checkpoint import load_trained_model, resolve_checkpoint

    check_out(out, overwrite)  # before the (slow) checkpoint load
    model, cfg = load_trained_model(checkpoint, tag)
    return export(model, cfg, out, source=os.path.abspath(resolve_checkpoint(checkpoint, tag)),
                  overwrite=overwrite, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loopmoe.export.hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    ap.add_argument("--tag", help="step directory inside --checkpoint (default: latest)")
    ap.add_argument("--out", required=True, help="output folder (created; a non-empty one only with --overwrite)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace a non-empty --out (the old export stays until the new one is complete)")
    ap.add_argument("--tokenizer", help="sentencepiece .model or tokenizer.json (default: data.tokenizer_model of the checkpoint's config)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="weight dtype written (default: %(default)s, lossless from fp32 master weights)")
    ap.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default: %(default)s)")
    ap.add_argument("--arch", choices=("auto", "remote", "llama", "mixtral", "granitemoeshared"), default="auto",
                    help="auto: a stock transformers class where one is exact, else the remote-code class")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = export_checkpoint(args.checkpoint, args.out, args.tag, overwrite=args.overwrite,
                                    tokenizer=args.tokenizer, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    arch=args.arch)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {summary['source']} -> {args.out}")
    print(f"  architecture: {summary['arch']} ({summary['why']})")
    print(f"  dtype {summary['dtype']}; tokenizer: {summary['tokenizer'] or 'none'}; special ids {summary['special_ids']}")
    load = ("AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)" if summary["arch"] == "loopmoe"
            else "AutoModelForCausalLM.from_pretrained(out)")
    print(f"  load: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
