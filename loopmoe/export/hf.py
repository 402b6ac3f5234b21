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
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from typing import Any

import torch

from loopmoe.model import core

log = logging.getLogger(__name__)

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(os.path.dirname(HERE), "model")
# remote-code files of an export -> their source: the shared maths and the execution order are the
# training model's own files (modeling_loopmoe.py imports them relatively under these names)
REMOTE_FILES = {"configuration_loopmoe.py": os.path.join(HERE, "configuration_loopmoe.py"),
                "modeling_loopmoe.py": os.path.join(HERE, "modeling_loopmoe.py"),
                "loopmoe_core.py": os.path.join(MODEL_DIR, "core.py"),
                "loopmoe_schedule.py": os.path.join(MODEL_DIR, "schedule.py")}
AUTO_MAP = {"AutoConfig": "configuration_loopmoe.LoopMoEConfig",
            "AutoModelForCausalLM": "modeling_loopmoe.LoopMoEForCausalLM"}
EXPORT_META = "loopmoe_export.json"
SPM_COPY = "sentencepiece.model"
DEFAULT_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}  # data_tools/train_tokenizer.py defaults

# ---------------------------------------------------------------------------------------------------
# Parameter names. Training: docs/model.md "Parameter names". HF (remote code): modeling_loopmoe.py.

# (training suffix inside a block, remote-code suffix inside model.layers.{u}); qkv is split separately.
_BLOCK_MAP = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn.proj.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.router.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.experts.w1", "mlp.experts.gate_up_proj"),
    ("ffn.experts.w2", "mlp.experts.down_proj"),
    ("ffn.shared.w1.weight", "mlp.shared_expert.gate_proj.weight"),
    ("ffn.shared.w3.weight", "mlp.shared_expert.up_proj.weight"),
    ("ffn.shared.w2.weight", "mlp.shared_expert.down_proj.weight"),
    ("ffn.w1.weight", "mlp.gate_proj.weight"),
    ("ffn.w3.weight", "mlp.up_proj.weight"),
    ("ffn.w2.weight", "mlp.down_proj.weight"),
    ("adaln.token.weight", "adaln.token_proj.weight"),
    ("adaln.mod.weight", "adaln.modulation.weight"),
    ("adaln.mod.bias", "adaln.modulation.bias"),
]
_TOP_MAP = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
            ("head.weight", "lm_head.weight"), ("iter_embed.fc1.weight", "model.iter_embed.fc1.weight"),
            ("iter_embed.fc1.bias", "model.iter_embed.fc1.bias"), ("iter_embed.fc2.weight", "model.iter_embed.fc2.weight"),
            ("iter_embed.fc2.bias", "model.iter_embed.fc2.bias")]
_BLOCK_RE = re.compile(r"^(prelude|loop|coda)\.(\d+)\.(.+)$")


def unique_index(mc, part: str, i: int) -> int:
    """prelude.i / loop.i / coda.i -> position in model.layers (prelude, loop, coda order)."""
    return {"prelude": 0, "loop": mc.n_prelude, "coda": mc.n_prelude + mc.n_loop}[part] + i


def unique_name(mc, u: int) -> str:
    if u < mc.n_prelude:
        return f"prelude.{u}"
    if u < mc.n_prelude + mc.n_loop:
        return f"loop.{u - mc.n_prelude}"
    return f"coda.{u - mc.n_prelude - mc.n_loop}"


def split_qkv(w: torch.Tensor, mc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused qkv [(H + 2KV) hd, d], grouped by kv head ([q_1..q_{H/KV}, k, v] per group) -> q, k, v."""
    return core.split_qkv_weight(w, mc.n_kv_heads, mc.n_heads // mc.n_kv_heads, mc.head_dim)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mc) -> torch.Tensor:
    return core.fuse_qkv_weight(q, k, v, mc.head_dim)


def _stock_block_map(arch: str) -> list[tuple[str, str, str]]:
    """(training suffix, stock suffix, transform) for the FFN of a stock architecture; transform "T" =
    transpose the last two dims (stacked experts: ours x @ W [E, d, 2h], theirs F.linear [E, 2h, d])."""
    common = [(a, b, "") for a, b in _BLOCK_MAP if a.startswith(("attn", "ffn_norm"))]
    if arch == "llama":
        return common + [(a, b, "") for a, b in _BLOCK_MAP if a.startswith("ffn.w")]
    if arch == "mixtral":
        return common + [("ffn.router.weight", "mlp.gate.weight", ""),
                         ("ffn.experts.w1", "mlp.experts.gate_up_proj", "T"),
                         ("ffn.experts.w2", "mlp.experts.down_proj", "T")]
    if arch == "granitemoeshared":
        return common + [("ffn.router.weight", "block_sparse_moe.router.weight", ""),
                         ("ffn.experts.w1", "block_sparse_moe.experts.gate_up_proj", "T"),
                         ("ffn.experts.w2", "block_sparse_moe.experts.down_proj", "T"),
                         ("ffn.shared.w2.weight", "shared_mlp.output_linear.weight", "")]
    raise ValueError(arch)


def training_to_hf(sd: dict[str, torch.Tensor], mc, arch: str = "loopmoe") -> dict[str, torch.Tensor]:
    """Training state dict -> the HF model's state dict (remote ``loopmoe`` or a stock ``arch``)."""
    out: dict[str, torch.Tensor] = {}
    block_map = ([(a, b, "") for a, b in _BLOCK_MAP] if arch == "loopmoe" else _stock_block_map(arch))
    for name, t in sd.items():
        top = dict(_TOP_MAP).get(name)
        if top is not None:
            out[top] = t
            continue
        m = _BLOCK_RE.match(name)
        if not m:
            raise KeyError(f"unexpected training parameter {name!r}")
        u = unique_index(mc, m.group(1), int(m.group(2)))
        pre, rest = f"model.layers.{u}.", m.group(3)
        if rest == "attn.qkv.weight":
            q, k, v = split_qkv(t, mc)
            out[pre + "self_attn.q_proj.weight"], out[pre + "self_attn.k_proj.weight"] = q, k
            out[pre + "self_attn.v_proj.weight"] = v
            continue
        if arch == "granitemoeshared" and rest in ("ffn.shared.w1.weight", "ffn.shared.w3.weight"):
            if rest.endswith("w1.weight"):  # input_linear = [gate; up]
                out[pre + "shared_mlp.input_linear.weight"] = torch.cat(
                    [t, sd[f"{m.group(1)}.{m.group(2)}.ffn.shared.w3.weight"]], dim=0)
            continue
        if arch != "loopmoe" and rest == "ffn.router.bias":
            if bool(t.ne(0).any()):
                raise ValueError(f"{name} is non-zero: a stock architecture cannot apply the selection bias")
            continue
        for a, b, how in block_map:
            if rest == a:
                out[pre + b] = t.transpose(-1, -2).contiguous() if how == "T" else t
                break
        else:
            raise KeyError(f"no {arch} mapping for training parameter {name!r}")
    return out


def hf_to_training(hsd: dict[str, torch.Tensor], mc, arch: str = "loopmoe") -> dict[str, torch.Tensor]:
    """Inverse of ``training_to_hf`` (the router bias is zero for stock architectures)."""
    out: dict[str, torch.Tensor] = {}
    inv_top = {b: a for a, b in _TOP_MAP}
    block_map = ([(a, b, "") for a, b in _BLOCK_MAP] if arch == "loopmoe" else _stock_block_map(arch))
    inv_block = {b: (a, how) for a, b, how in block_map}
    layer_re = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in hsd.items():
        if name in inv_top:
            out[inv_top[name]] = t
            continue
        m = layer_re.match(name)
        if not m:
            raise KeyError(f"unexpected {arch} parameter {name!r}")
        u, rest = int(m.group(1)), m.group(2)
        pre = unique_name(mc, u) + "."
        pm = re.match(r"self_attn\.([qkv])_proj\.weight$", rest)
        if pm:
            qkv.setdefault(u, {})[pm.group(1)] = t
            continue
        if rest == "shared_mlp.input_linear.weight":
            gate, up = t.chunk(2, dim=0)
            out[pre + "ffn.shared.w1.weight"], out[pre + "ffn.shared.w3.weight"] = gate.clone(), up.clone()
            continue
        if rest not in inv_block:
            raise KeyError(f"no mapping back for {arch} parameter {name!r}")
        a, how = inv_block[rest]
        out[pre + a] = t.transpose(-1, -2).contiguous() if how == "T" else t
    for u, parts in qkv.items():
        out[unique_name(mc, u) + ".attn.qkv.weight"] = fuse_qkv(parts["q"], parts["k"], parts["v"], mc)
    if arch in ("mixtral", "granitemoeshared"):
        for u in range(mc.n_unique_layers):
            out[f"{unique_name(mc, u)}.ffn.router.bias"] = torch.zeros(mc.n_experts)
    if mc.tie_embeddings and "head.weight" not in out:
        out["head.weight"] = out["embed.weight"]
    return out


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
# Tokenizer

_TOKENIZER_PROBES = [
    "", " ", "  ", "    ", "\n", "\t", "Hello world", " leading space", "  two leading", "trailing  ",
    "a  b   c    d", "def f(x):\n    return x  + 12345\n", "if x:\n\tpass\n        y = 2\n", "0.5e-10 1,234,567",
    "ünïcödé 日本語 한국어 🚀 \u200b", "x=[1,2,3];y={'a': None}", "The Python standard library's `os.path`.",
    "Question: What is 2 + 2?\nAnswer: 4", "   \n   \n", "▁literal metaspace▁▁", "<<>> </ >",
]


def spm_special_ids(spm_path: str) -> dict[str, int | None]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_path)
    get = lambda i: i if i >= 0 else None  # noqa: E731
    return {"unk": get(sp.unk_id()), "bos": get(sp.bos_id()), "eos": get(sp.eos_id()), "pad": get(sp.pad_id())}


def build_tokenizer(spm_path: str, model_max_length: int = 4096):
    """A ``PreTrainedTokenizerFast`` (tokenizers BPE) encoding exactly like the sentencepiece BPE model.

    sentencepiece (our train_tokenizer.py settings): optional precompiled normaliser, a dummy "▁" prefix,
    spaces -> "▁", words split before a "▁" that follows a non-space (runs of spaces stay one word with
    the next word when ``allow_whitespace_only_pieces``), BPE by piece score, bytes for unknown
    characters. Checked against sentencepiece on probe strings; raises if any differs."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    proto = pb.ModelProto()
    with open(spm_path, "rb") as f:
        proto.ParseFromString(f.read())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != pb.TrainerSpec.BPE:
        raise ValueError(f"{spm_path}: only sentencepiece BPE models are converted (this one is "
                         f"{pb.TrainerSpec.ModelType.Name(ts.model_type)})")
    if ts.treat_whitespace_as_suffix or not ts.split_by_whitespace:
        raise ValueError(f"{spm_path}: treat_whitespace_as_suffix / split_by_whitespace=false are not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: p.score for p in proto.pieces if p.type in (pb.ModelProto.SentencePiece.NORMAL,
                                                                   pb.ModelProto.SentencePiece.USER_DEFINED)}
    merges = []
    for piece, score in normal.items():  # every split of a piece into two pieces is a merge, ranked by score
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in normal and right in normal:
                merges.append((score, vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2], m[3]))
    unk = proto.pieces[ts.unk_id].piece
    tok = Tokenizer(BPE(vocab=vocab, merges=[(m[4], m[5]) for m in merges], unk_token=unk, fuse_unk=True,
                        byte_fallback=ts.byte_fallback))
    norms = []
    if ns.precompiled_charsmap:
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norms.append(normalizers.Prepend("▁"))
    norms.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norms)
    word = "▁*[^▁]+|▁+" if ts.allow_whitespace_only_pieces else "▁[^▁]*|[^▁]+"
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(word), behavior="isolated")
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)

    ids = spm_special_ids(spm_path)
    piece = lambda i: proto.pieces[i].piece if i is not None else None  # noqa: E731
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=piece(ids["unk"]), bos_token=piece(ids["bos"]),
        eos_token=piece(ids["eos"]), pad_token=piece(ids["pad"]), padding_side="left",
        model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    sp = spm.SentencePieceProcessor(model_file=spm_path)
    for s in _TOKENIZER_PROBES:
        a, b = sp.encode(s), hf_tok.encode(s, add_special_tokens=False)
        if a != b:
            raise RuntimeError(f"tokenizer conversion of {spm_path} differs from sentencepiece on {s!r}: "
                               f"{a} vs {b}; report this (the export is not written with a wrong tokenizer)")
    return hf_tok


# ---------------------------------------------------------------------------------------------------
# Export


def export(model, cfg, out: str, tokenizer: str | None = None, dtype: str = "float32",
           max_shard_size: str | int = "2GB", arch: str = "auto", source: str | None = None) -> dict:
    """Write the HF folder ``out`` for a training model + Config; returns the export summary."""
    from transformers import GenerationConfig

    mc = cfg.model
    if mc.capacity_factor > 0:
        log.warning("model.capacity_factor=%s: the export is dropless (no token is dropped at inference), so "
                    "logits differ where the training forward would drop tokens", mc.capacity_factor)
    tok_path = tokenizer or (cfg.data.tokenizer_model if cfg.data.tokenizer_model and
                             os.path.isfile(cfg.data.tokenizer_model) else None)
    ids = spm_special_ids(tok_path) if tok_path else dict(DEFAULT_IDS)
    if tok_path:
        import sentencepiece as spm

        n = spm.SentencePieceProcessor(model_file=tok_path).vocab_size()
        if n > mc.vocab_size:
            raise ValueError(f"{tok_path} has {n} pieces, more than the model's vocab_size {mc.vocab_size}: "
                             "wrong tokenizer for this checkpoint?")
    if not tok_path:
        log.warning("no tokenizer (pass --tokenizer PATH.model): ids bos/eos/pad default to %s", DEFAULT_IDS)
    hf_tok = build_tokenizer(tok_path, model_max_length=mc.max_seq_len) if tok_path else None  # checked first
    sd = model.state_dict()
    chosen, why = choose_arch(mc, sd, arch)
    hf = build_hf_model(model, mc, ids, chosen)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    hf = hf.to(torch_dtype)
    hf.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                                            pad_token_id=ids["pad"])
    os.makedirs(out, exist_ok=True)
    for stale in os.listdir(out):  # a re-export must not leave old shards or remote code behind
        if ((stale.startswith("model") and (stale.endswith(".safetensors") or stale.endswith(".index.json")))
                or stale in REMOTE_FILES):
            os.remove(os.path.join(out, stale))
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
        shutil.copyfile(tok_path, os.path.join(out, SPM_COPY))
    from loopmoe.config import to_dict

    summary = {"arch": chosen, "why": why, "dtype": dtype, "source": source, "tokenizer": tok_path,
               "special_ids": ids, "add_bos": False,
               "executed_layers": mc.n_executed_layers, "unique_layers": mc.n_unique_layers,
               "training_config": to_dict(cfg)}
    with open(os.path.join(out, EXPORT_META), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def export_checkpoint(checkpoint: str, out: str, tag: str | None = None, **kw) -> dict:
    from loopmoe.train.checkpoint import load_trained_model, resolve_checkpoint

    model, cfg = load_trained_model(checkpoint, tag)
    return export(model, cfg, out, source=os.path.abspath(resolve_checkpoint(checkpoint, tag)), **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loopmoe.export.hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    ap.add_argument("--tag", help="step directory inside --checkpoint (default: latest)")
    ap.add_argument("--out", required=True, help="output folder (created; old weight shards in it are replaced)")
    ap.add_argument("--tokenizer", help="sentencepiece .model (default: data.tokenizer_model of the checkpoint's config)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="weight dtype written (default: %(default)s, lossless from fp32 master weights)")
    ap.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default: %(default)s)")
    ap.add_argument("--arch", choices=("auto", "remote", "llama", "mixtral", "granitemoeshared"), default="auto",
                    help="auto: a stock transformers class where one is exact, else the remote-code class")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = export_checkpoint(args.checkpoint, args.out, args.tag, tokenizer=args.tokenizer, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, arch=args.arch)
    print(f"exported {summary['source']} -> {args.out}")
    print(f"  architecture: {summary['arch']} ({summary['why']})")
    print(f"  dtype {summary['dtype']}; tokenizer: {summary['tokenizer'] or 'none'}; special ids {summary['special_ids']}")
    load = ("AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)" if summary["arch"] == "loopmoe"
            else "AutoModelForCausalLM.from_pretrained(out)")
    print(f"  load: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
