"""Routing divergence between loop iterations and expert-load imbalance (spec section 5).

For one loop layer, S1 and S2 are the routed top-k expert sets of each token on two passes.
overlap o = |S1 n S2| in 0..k; by chance (independent uniform routing) E[o] = k^2 / E.
normalised divergence = (k - E[o]) / (k - k^2/E): 0 = same routing on both passes, 1 = as if random.
"""
from __future__ import annotations

import torch


def overlap(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """[T, k], [T, k] expert ids -> [T] number of experts in both sets."""
    return (s1.unsqueeze(2) == s2.unsqueeze(1)).any(dim=2).sum(dim=1)


def divergence_stats(s1: torch.Tensor, s2: torch.Tensor, n_experts: int) -> dict[str, float]:
    k = s1.shape[1]
    o = overlap(s1, s2).float()  # [T]
    chance = k * k / n_experts
    hist = torch.bincount(o.long(), minlength=k + 1).float() / o.numel()  # [k+1]
    out = {
        "mean_overlap": o.mean().item(),
        "chance_overlap": chance,
        "identical": (o == k).float().mean().item(),
        "disjoint": (o == 0).float().mean().item(),
        "partial": ((o > 0) & (o < k)).float().mean().item(),
        "jaccard": (o / (2 * k - o)).mean().item(),
        "divergence": (k - o.mean().item()) / (k - chance) if k < n_experts else float("nan"),
    }
    out.update({f"overlap_{i}": hist[i].item() for i in range(k + 1)})
    return out


def load_imbalance(load: torch.Tensor) -> float:
    """max / mean tokens per expert (1 = perfectly balanced)."""
    load = load.float()
    return (load.max() / load.mean().clamp_min(1e-9)).item()


def unique_experts_per_token(sets: list[torch.Tensor]) -> float:
    """Mean number of distinct experts a token visits across all passes ([T, k] each)."""
    allsets = torch.cat(sets, dim=1)  # [T, R*k]
    srt = allsets.sort(dim=1).values
    return (1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)).float().mean().item()
