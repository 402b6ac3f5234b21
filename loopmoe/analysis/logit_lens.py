"""Entropy, Jensen-Shannon divergence and the logit-lens view at exit boundaries.

For every exit boundary k (see early_exit.ExitPlan) with read-out distribution P_k and the final
distribution P_final of the same token:

    JSD(P, Q) = 1/2 KL(P || M) + 1/2 KL(Q || M),  M = (P + Q) / 2     (nats; at most ln 2)
    normalised JSD = JSD / ln 2                                         (in [0, 1]: bits)

A token counts as "converged" at boundary k when its normalised JSD to the final output is below a
threshold (0.5 by default). Also reported: top-1 agreement with the final output and the LM loss of
the read-out (the loss an exit there would give).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from loopmoe.model.core import entropy, token_ce  # noqa: F401  (their home is the model core)

LN2 = math.log(2.0)


def jsd(logits_p: torch.Tensor, logits_q: torch.Tensor, normalised: bool = True) -> torch.Tensor:
    """[..., V], [..., V] logits -> [...] Jensen-Shannon divergence of the two softmaxes.

    normalised=True divides by ln 2 (bits, in [0, 1]); otherwise nats (in [0, ln 2]).
    """
    lp = F.log_softmax(logits_p.float(), dim=-1)
    lq = F.log_softmax(logits_q.float(), dim=-1)
    lm = torch.logaddexp(lp, lq) - LN2  # log of the mixture (P + Q) / 2
    p, q = lp.exp(), lq.exp()
    # xlogy-style: terms with p = 0 contribute 0 (p * (lp - lm) with lp = -inf would be nan)
    kl_pm = torch.where(p > 0, p * (lp - lm), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (lq - lm), torch.zeros_like(q)).sum(-1)
    out = (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)
    return out / LN2 if normalised else out


class LensAccumulator:
    """Sums over batches of the per-boundary logit-lens quantities (weighted by the loss mask)."""

    def __init__(self, names: list[str], converged_jsd: float = 0.5):
        self.names, self.thr = names, converged_jsd
        self.sums = {n: {"jsd": 0.0, "converged": 0.0, "top1_agree": 0.0, "ce": 0.0, "entropy": 0.0}
                     for n in names}
        self.jsd_values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.tokens = 0.0

    def add(self, readouts: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor) -> None:
        """readouts: logits [b, s, V] at each boundary, the last is the final output."""
        final = readouts[-1]
        m = mask.float()
        self.tokens += m.sum().item()
        top_final = final.argmax(-1)
        for name, lg in zip(self.names, readouts):
            d = jsd(lg, final)
            s = self.sums[name]
            s["jsd"] += (d * m).sum().item()
            s["converged"] += ((d < self.thr).float() * m).sum().item()
            s["top1_agree"] += ((lg.argmax(-1) == top_final).float() * m).sum().item()
            s["ce"] += (token_ce(lg, labels) * m).sum().item()
            s["entropy"] += (entropy(lg) * m).sum().item()
            self.jsd_values[name].append(d[mask.bool()].flatten())

    def result(self) -> list[dict]:
        rows = []
        for name in self.names:
            s = self.sums[name]
            t = max(self.tokens, 1.0)
            rows.append({"boundary": name, "jsd": s["jsd"] / t, "converged": s["converged"] / t,
                         "top1_agree": s["top1_agree"] / t, "loss": s["ce"] / t, "ppl": math.exp(s["ce"] / t),
                         "entropy": s["entropy"] / t})
        return rows
