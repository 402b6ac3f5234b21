"""Routing divergence between loop iterations and expert-load imbalance (spec section 5).

For one loop layer, S1 and S2 are the routed top-k expert sets of each token on two passes.
overlap o = |S1 n S2| in 0..k. Under independent uniform routing (S2 a uniformly random k-subset of
the E experts, whatever S1 is) o is hypergeometric:

    P(o = x) = C(k, x) C(E - k, k - x) / C(E, k),   E[o] = k^2 / E.

normalised divergence = (k - E[o]) / (k - k^2/E): 0 = same routing on both passes, 1 = as if random
(it can exceed 1 when passes avoid each other's experts). Because a trained router does not use the
experts uniformly, ``permutation_overlap`` gives a second, load-aware chance level: the overlap of a
token's S1 with ANOTHER token's S2 (a random pairing), i.e. the overlap expected from the two passes'
expert loads alone with no per-token relation. See docs/analysis.md.
"""
from __future__ import annotations

import itertools
from math import comb

import torch


def overlap(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """[T, k], [T, k] expert ids -> [T] number of experts in both sets."""
    return (s1.unsqueeze(2) == s2.unsqueeze(1)).any(dim=2).sum(dim=1)


def chance_overlap_pmf(k: int, n_experts: int) -> list[float]:
    """Hypergeometric P(o = x), x = 0..k: overlap of two independent uniformly random k-subsets of E."""
    total = comb(n_experts, k)
    return [comb(k, x) * comb(n_experts - k, k - x) / total for x in range(k + 1)]


def chance_overlap_mean(k: int, n_experts: int) -> float:
    return k * k / n_experts


def normalised_divergence(mean_overlap: float, k: int, n_experts: int, chance: float | None = None) -> float:
    """(k - E[o]) / (k - chance); chance defaults to k^2/E. NaN when k == E (every set is all experts)."""
    chance = chance_overlap_mean(k, n_experts) if chance is None else chance
    if k >= n_experts or k - chance <= 0:
        return float("nan")
    return (k - mean_overlap) / (k - chance)


def divergence_stats(s1: torch.Tensor, s2: torch.Tensor, n_experts: int) -> dict[str, float]:
    """Per-token overlap statistics of two passes' top-k sets ([T, k] each).

    Keys: mean_overlap, chance_overlap (k^2/E), identical (o = k), disjoint (o = 0), partial,
    jaccard (mean of o / (2k - o)), divergence (normalised, see module doc), overlap_{x} (the observed
    histogram, fraction of tokens with o = x) and chance_{x} (the hypergeometric pmf).
    """
    k = s1.shape[1]
    o = overlap(s1, s2).float()  # [T]
    chance = chance_overlap_mean(k, n_experts)
    hist = torch.bincount(o.long(), minlength=k + 1).float() / max(o.numel(), 1)  # [k+1]
    out = {
        "mean_overlap": o.mean().item(),
        "chance_overlap": chance,
        "identical": (o == k).float().mean().item(),
        "disjoint": (o == 0).float().mean().item(),
        "partial": ((o > 0) & (o < k)).float().mean().item(),
        "jaccard": (o / (2 * k - o)).mean().item(),
        "divergence": normalised_divergence(o.mean().item(), k, n_experts),
    }
    out.update({f"overlap_{i}": hist[i].item() for i in range(k + 1)})
    out.update({f"chance_{i}": p for i, p in enumerate(chance_overlap_pmf(k, n_experts))})
    return out


def permutation_overlap(s1: torch.Tensor, s2: torch.Tensor, n_perm: int = 4, seed: int = 0) -> float:
    """Load-aware chance level: mean |S1(t) n S2(pi(t))| over random token permutations pi.

    Keeps both passes' expert loads exactly and breaks only the per-token correspondence, so it is the
    overlap two passes with these loads would show if a token's second routing ignored its first.
    """
    g = torch.Generator().manual_seed(seed)
    vals = [overlap(s1, s2[torch.randperm(s2.shape[0], generator=g)]).float().mean().item() for _ in range(n_perm)]
    return sum(vals) / len(vals)


def load_imbalance(load: torch.Tensor) -> float:
    """max / mean tokens per expert (1 = perfectly balanced)."""
    load = load.float()
    return (load.max() / load.mean().clamp_min(1e-9)).item()


def unique_counts(sets: list[torch.Tensor]) -> torch.Tensor:
    """[T] number of distinct experts each token visits across the passes ([T, k] each)."""
    allsets = torch.cat(sets, dim=1)  # [T, R*k]
    srt = allsets.sort(dim=1).values
    return 1 + (srt[:, 1:] != srt[:, :-1]).sum(dim=1)


def unique_experts_per_token(sets: list[torch.Tensor]) -> float:
    """Mean number of distinct experts a token visits across all passes ([T, k] each)."""
    return unique_counts(sets).float().mean().item()


def chance_unique_experts(k: int, n_experts: int, n_passes: int) -> float:
    """E[distinct experts] over ``n_passes`` independent uniform k-subsets: E (1 - (1 - k/E)^R)."""
    return n_experts * (1.0 - (1.0 - k / n_experts) ** n_passes)


def chance_unique_pmf(k: int, n_experts: int, n_passes: int) -> list[float]:
    """P(distinct = u), u = 0..min(E, R k), for ``n_passes`` independent uniform k-subsets (exact, by
    the Markov chain on the number of experts seen so far: a new subset adds x new experts with the
    hypergeometric probability C(E - u, x) C(u, k - x) / C(E, k))."""
    top = min(n_experts, n_passes * k)
    p = [0.0] * (top + 1)
    p[k] = 1.0  # after the first pass
    total = comb(n_experts, k)
    for _ in range(n_passes - 1):
        q = [0.0] * (top + 1)
        for u, pu in enumerate(p):
            if pu == 0.0:
                continue
            for x in range(0, k + 1):
                if u + x <= top:
                    q[u + x] += pu * comb(n_experts - u, x) * comb(u, k - x) / total
        p = q
    return p


def pairs(n_passes: int) -> list[tuple[int, int]]:
    """All iteration pairs (i, j), i < j (0-based)."""
    return list(itertools.combinations(range(n_passes), 2))
