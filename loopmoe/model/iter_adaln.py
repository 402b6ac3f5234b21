"""IterAdaLN: modulation of the loop layers' norms by the iteration index and the token state.

For loop layer j at iteration k (0-based here) with token state x [b, s, d] and rank r (spec sec. 3):

    e_k  = MLP_iter(sinusoid(k))                      # [r], one MLP shared by all loop layers
    u    = SiLU(e_k + W_h^j RMSNorm(x))               # [b, s, r]  (W_h^j: r x d)
    [shift_a, scale_a, gate_a, shift_f, scale_f, gate_f] = W_m^j u + b^j    # 6 x [b, s, d]
    x    = x + (1 + gate_a) * Attn(RMSNorm(x) * (1 + scale_a) + shift_a)
    x    = x + (1 + gate_f) * FFN (RMSNorm(x) * (1 + scale_f) + shift_f)   # the router sees this input

W_m^j and b^j are zero-initialised, so at initialisation every iteration computes exactly the plain
shared layer. At step 0 only W_m / b receive gradient (u is multiplied by W_m = 0, so W_h and
MLP_iter get zero gradient until W_m moves); after one optimiser step all of them learn.

Switches (ModelConfig): ``adaln`` = "both" (as above), "iter" (u = SiLU(e_k): one modulation per
iteration, shared by all tokens), "token" (u = SiLU(W_h RMSNorm(x)): no iteration signal), "none"
(no IterAdaLN: plain shared layers). ``adaln_gate`` = "one_plus" (above) or "zero" (pure adaLN-Zero,
``x + gate * f``): with zero-init gates every loop layer is then the identity at initialisation, i.e.
the loop contributes nothing until the gates grow.
"""
from __future__ import annotations

import torch
from torch import nn

from loopmoe.model import core
from loopmoe.model.core import modulate, sinusoid  # noqa: F401  (their home is core)


def _unit_init(lin: nn.Linear, std: float | None = None) -> None:
    """Variance-preserving init (std 1/sqrt(fan_in), ``adaln_init=unit``, the default): e_k and
    W_h RMSNorm(x) are O(1), so both signals reach u with comparable weight at any width (with
    std=init_std=0.02 the iteration signal was ~1e-3 and the iterations stayed almost identical for
    many steps). ``adaln_init=small`` passes ``std`` = init_std instead (the ablation of issue 17);
    both draw the same random numbers, so the two inits differ only by a scale."""
    nn.init.normal_(lin.weight, 0.0, lin.in_features ** -0.5 if std is None else std)
    if lin.bias is not None:
        nn.init.zeros_(lin.bias)


class IterEmbed(nn.Module):
    """e_k = MLP_iter(sinusoid(k)) in R^r; one instance, shared by every loop layer (``iter_embed``)."""

    def __init__(self, rank: int, init_std: float | None = None):
        super().__init__()
        self.freq_dim = 2 * ((rank + 1) // 2)
        self.fc1 = nn.Linear(self.freq_dim, rank)
        self.fc2 = nn.Linear(rank, rank)
        _unit_init(self.fc1, init_std)
        _unit_init(self.fc2, init_std)

    def forward(self, k: int) -> torch.Tensor:
        return core.iter_embedding(k, self.fc1, self.fc2)  # [r]


class IterAdaLN(nn.Module):
    """Per loop layer (``loop.{j}.adaln``): token projection W_h and zero-init modulation W_m, b."""

    def __init__(self, d_model: int, rank: int, mode: str, gate: str, eps: float, init_std: float | None = None):
        super().__init__()
        if mode not in ("both", "iter", "token"):
            raise ValueError(f"IterAdaLN mode {mode!r}: use both, iter or token (or adaln=none: no module)")
        if gate not in ("one_plus", "zero"):
            raise ValueError(f"model.adaln_gate={gate!r}: use one_plus or zero")
        self.mode, self.gate_mode = mode, gate
        if mode in ("both", "token"):
            self.norm = nn.RMSNorm(d_model, eps=eps, elementwise_affine=False)
            self.token = nn.Linear(d_model, rank, bias=False)  # W_h: r x d
            _unit_init(self.token, init_std)
        self.mod = nn.Linear(rank, 6 * d_model)  # W_m: 6d x r, b: 6d -- zero-initialised
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)

    def forward(self, x: torch.Tensor, e_k: torch.Tensor | None) -> list[torch.Tensor]:
        """x [b, s, d], e_k [r] or None -> [shift_a, scale_a, gate_a, shift_f, scale_f, gate_f], each
        [b, s, d] (or [d] in "iter" mode, broadcast over tokens)."""
        return core.adaln_modulation(x, e_k, self.mode, getattr(self, "norm", None),
                                     getattr(self, "token", None), self.mod)

    def gate(self, g: torch.Tensor) -> torch.Tensor:
        return core.adaln_gate(g, self.gate_mode)

