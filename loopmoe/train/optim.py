"""AdamW parameter groups and learning-rate schedules (warm-up + cosine, and WSD)."""
from __future__ import annotations

import math

import torch
from torch import nn

from loopmoe.config import OptimConfig

# Parameters that never get weight decay: norms (their gains), biases, embeddings and the IterAdaLN
# modulation (its output bias acts as the gains of the loop's norms; decaying it would pull every
# iteration back towards the plain shared layer).
_NO_DECAY_KEYS = ("norm", "embed", "adaln", "iter_embed")


def wants_weight_decay(name: str, param: torch.Tensor) -> bool:
    if param.ndim < 2 or name.endswith(".bias"):
        return False
    return not any(k in name for k in _NO_DECAY_KEYS)


def is_adaln(name: str) -> bool:
    """An IterAdaLN parameter: a loop layer's ``adaln`` module or the shared ``iter_embed`` MLP."""
    return ".adaln." in f".{name}" or name.startswith("iter_embed.")


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups (decay / no decay), then split again into DeepSpeed's MoE groups so that ZeRO
    reduces expert gradients over the expert-data-parallel group only."""
    decay, no_decay, adaln = [], [], []
    own_adaln = cfg.adaln_lr_scale != 1.0 or cfg.adaln_weight_decay != 0.0  # else: the two usual groups
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if own_adaln and is_adaln(name):
            adaln.append(p)
        else:
            (decay if wants_weight_decay(name, p) else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if adaln:
        # IterAdaLN's own group (an ablation knob): lr x adaln_lr_scale (the schedule scales each group's
        # base lr, so the ratio holds at every step); weight decay on its matrices only, never biases.
        mats = [p for p in adaln if p.ndim >= 2]
        vecs = [p for p in adaln if p.ndim < 2]
        groups += [{"name": "adaln", "params": mats, "weight_decay": cfg.adaln_weight_decay,
                    "lr": cfg.lr * cfg.adaln_lr_scale},
                   {"name": "adaln_no_decay", "params": vecs, "weight_decay": 0.0, "lr": cfg.lr * cfg.adaln_lr_scale}]
    groups = [g for g in groups if g["params"]]
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``.

    cosine:   linear warm-up, then cosine from lr to min_lr over the remaining steps.
    wsd:      linear warm-up, stable at lr, then a sqrt cool-down to min_lr over the last decay_steps
              (default 20% of the run): lr - (lr - min_lr) * sqrt(progress).
    constant: linear warm-up, then lr.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    decay = cfg.decay_steps or max(int(0.2 * total), 1)
    start = total - decay
    if step < start:
        return cfg.lr
    progress = min((step - start + 1) / decay, 1.0)
    return cfg.lr - (cfg.lr - cfg.min_lr) * math.sqrt(progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A LambdaLR (state_dict-able, so it is checkpointed and resumed with the run)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, total_steps, cfg) / cfg.lr)
