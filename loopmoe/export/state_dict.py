"""The state-dict adapter: training parameter names <-> Hugging Face names (remote-code LoopMoE and the
stock architectures), with the fused qkv split and fused back. Pure renaming and reshaping; no model."""
from __future__ import annotations

import re

import torch

from loopmoe.model import core

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
