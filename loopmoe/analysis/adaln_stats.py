"""What IterAdaLN does in a trained model: how large its two signals and its modulations are, per loop
layer and iteration (the "why does it hurt" question of the toy comparison, issue 17).

    rows = adaln_stats(model, batches)   # one dict per (loop layer, iteration)

Per row: ``e_rms`` = RMS of the iteration embedding e_k, ``h_rms`` = RMS of the token projection
W_h RMSNorm(x) (the two terms that are added inside u = SiLU(e_k + W_h RMSNorm(x))), the RMS of the
six modulations (shift / scale / gate for attention and FFN), and ``token_share``: the part of the scale
and gate modulations' energy that varies from token to token (1 - |mean over tokens|^2 / mean |.|^2),
0 when a modulation is one vector per iteration ("iter" mode), near 1 when it is mostly per-token.
Read by hooks on the loop layers' ``adaln`` modules; the forward itself is unchanged.
"""
from __future__ import annotations

import torch

NAMES = ("shift_a", "scale_a", "gate_a", "shift_f", "scale_f", "gate_f")


def _rms(t: torch.Tensor) -> float:
    return t.float().pow(2).mean().sqrt().item()


@torch.no_grad()
def adaln_stats(model, batches) -> list[dict]:
    cfg = model.cfg
    if cfg.adaln == "none" or not cfg.n_loop:
        return []
    R = cfg.loop_iters
    acc: dict[tuple[int, int], dict[str, float]] = {}
    handles = []
    for j, blk in enumerate(model.loop):
        calls = {"n": 0}

        def hook(mod, args, out, j=j, calls=calls):
            x, e_k = args[0], args[1] if len(args) > 1 else None
            it = calls["n"] % R  # loop layers run R times per forward, in iteration order
            calls["n"] += 1
            a = acc.setdefault((j, it), {"n": 0})
            a["n"] += 1
            if e_k is not None:
                a["e_rms"] = a.get("e_rms", 0.0) + _rms(e_k)
            if getattr(mod, "token", None) is not None:
                a["h_rms"] = a.get("h_rms", 0.0) + _rms(mod.token(mod.norm(x)))
            energy, varying = 0.0, 0.0
            for name, m in zip(NAMES, out):
                a[name] = a.get(name, 0.0) + _rms(m)
                if name.startswith(("scale", "gate")):
                    ms = m.float().pow(2).mean().item()
                    flat = m.float().reshape(-1, m.shape[-1])  # [T, d] (or [1, d] in iter mode)
                    energy += ms
                    varying += ms - flat.mean(0).pow(2).mean().item()
            a["token_share"] = a.get("token_share", 0.0) + (varying / energy if energy > 0 else 0.0)

        handles.append(blk.adaln.register_forward_hook(hook))
    try:
        for bt in batches:
            model(bt["tokens"])  # [b, s] -> the hooks see every loop layer R times
    finally:
        for h in handles:
            h.remove()
    rows = []
    for (j, it), a in sorted(acc.items()):
        n = a.pop("n")
        rows.append({"loop_layer": j, "iteration": it + 1, **{k: v / n for k, v in a.items()}})
    return rows


def markdown(rows_by_run: dict[str, list[dict]]) -> str:
    """One table: every run's rows."""
    if not rows_by_run:
        return ""
    L = ["| run | loop layer | iteration | RMS e_k | RMS W_h x | scale_a | gate_a | scale_f | gate_f "
         "| per-token share |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run, rows in rows_by_run.items():
        for r in rows:
            e = f"{r['e_rms']:.3f}" if "e_rms" in r else "-"
            h = f"{r['h_rms']:.3f}" if "h_rms" in r else "-"
            L.append(f"| `{run}` | {r['loop_layer']} | {r['iteration']} | {e} | {h} | {r['scale_a']:.3f} | "
                     f"{r['gate_a']:.3f} | {r['scale_f']:.3f} | {r['gate_f']:.3f} | {r['token_share']:.2f} |")
    return "\n".join(L)
