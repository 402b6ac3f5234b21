"""The AdamW state of one parameter, out of (and back into) DeepSpeed's optimizers, for every optimizer our
configs can give (read against DeepSpeed 0.19.8, ``DeepSpeedEngine._do_optimizer_sanity_check``):

| ZeRO | fp32 run                            | bf16 run (grad_accum_dtype fp32, engine.deepspeed_config)     |
|------|-------------------------------------|---------------------------------------------------------------|
| 0    | the client's torch AdamW, unwrapped | refused by parallel/layout.py (no fp32-accumulating optimizer) |
| 1    | ``DeepSpeedZeroOptimizer``          | ``BF16_Optimizer``                                            |
| 2    | ``DeepSpeedZeroOptimizer``          | ``DeepSpeedZeroOptimizer`` (fp32 gradient partition)          |

The two wrappers keep the fp32 master weights in flat per-group partitions and the AdamW moments in their
base optimizer's state for those partitions; DeepSpeed links every parameter to its fragment of them, and
its public helpers (``deepspeed.utils.safe_get_full_optimizer_state`` and friends) put a parameter's full
state together (an all-reduce over the parameter's partition group: the data-parallel group, or the
expert-data-parallel group for expert parameters) or write this rank's fragment back. Any other wrapper
(e.g. ``FP16_Optimizer``) raises ``UnsupportedOptimizer``: a checkpoint must never hold empty moments.

DeepSpeed is imported inside the functions, as everywhere in loopmoe: importing the checkpoint module (the
export and evaluation tools do) must not start DeepSpeed's accelerator detection.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_OPT_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter moments


class UnsupportedOptimizer(RuntimeError):
    """DeepSpeed picked an optimizer wrapper whose state this module cannot read or write."""


# ---------------------------------------------------------------------------------------------------
# Which optimizer DeepSpeed gave us


def _wrappers() -> tuple[type, type]:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer, BF16_Optimizer


def is_partitioned(opt) -> bool:
    """True for DeepSpeed's wrappers with flat fp32 partitions (ZeRO-1/2, BF16_Optimizer); False for a plain
    torch optimizer (ZeRO-0, fp32); UnsupportedOptimizer for anything else."""
    if isinstance(opt, _wrappers()):
        return True
    if isinstance(opt, torch.optim.Optimizer):
        return False
    raise UnsupportedOptimizer(
        f"checkpoint: DeepSpeed's optimizer {type(opt).__name__} is not handled (only a plain torch optimizer, "
        "DeepSpeedZeroOptimizer and BF16_Optimizer are); its Adam state cannot be saved or loaded. Use "
        "train.zero_stage=1 or 2 (see loopmoe/train/zero_state.py)")


def _base_optimizer(opt):
    return opt.optimizer if is_partitioned(opt) else opt


def _groups(opt) -> list[tuple[list[torch.nn.Parameter], torch.Tensor]]:
    """(the low-precision parameters, this rank's flat fp32 partition) per parameter group of a wrapper
    (public attributes of DeepSpeed 0.19.8: ``bit16_groups`` / ``single_partition_of_fp32_groups`` in
    ZeRO-1/2, ``bf16_groups`` / ``fp32_groups_flat_partition`` in BF16_Optimizer)."""
    if isinstance(opt, _wrappers()[1]):
        return list(zip(opt.bf16_groups, opt.fp32_groups_flat_partition))
    return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups))


def link_state(opt, step: float | None = None) -> None:
    """Make the base optimizer's AdamW state exist for every flat partition (zeros at ``step``, what AdamW's
    lazy init would make, when the optimizer has not stepped yet; ``step=None`` = 0) and point every
    parameter's fragment at it (DeepSpeed links them only after the wrapper's first step, and forgets the
    link when it rebuilds its mappings): once before reading or writing many parameters' states (it walks
    every partition). A plain optimizer needs nothing."""
    if not is_partitioned(opt):
        return
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    state = opt.optimizer.state
    for params, flat in _groups(opt):
        st = state[flat]
        if "step" not in st:
            st["step"] = torch.tensor(float(step or 0.0), dtype=torch.float32)
            for k in _OPT_KEYS:
                st[k] = torch.zeros_like(flat)
        lazy_init_hp_params_optimizer_state(params, flat, state)


# ---------------------------------------------------------------------------------------------------
# Optimizer state per parameter


def _get_state(opt, p, key: str | None) -> torch.Tensor:
    """The full fp32 state ``key`` (None = master weight) of parameter ``p`` on this rank (collective for a
    wrapper: every rank of the partition group calls it in the same order). A wrapper's state must be
    linked first (``link_state``, once for all parameters)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if not is_partitioned(opt):
        if key is None:
            return p.detach().float().clone()
        st = opt.state.get(p, {})
        return st[key].float().clone() if key in st else torch.zeros_like(p, dtype=torch.float32)
    full = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if full is None:
        raise UnsupportedOptimizer(f"checkpoint: a parameter of shape {tuple(p.shape)} is not in "
                                   f"{type(opt).__name__}'s partitions; its state cannot be read")
    return full.float().view_as(p)


def _set_state(opt, p, key: str | None, value: torch.Tensor, step: float) -> None:
    """Write the full fp32 state ``key`` (None = master weight) of ``p``: this rank's fragment under a
    wrapper (no collective, after ``link_state(opt, step)``: a fresh optimizer's AdamW state is created at
    ``step`` there, every partition at once, so the ones holding no fragment here agree), the whole tensor
    for a plain optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if not is_partitioned(opt):
        if key is None:
            return  # the plain optimizer's master weight is the parameter itself
        st = opt.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(step, dtype=torch.float32)
            for k in _OPT_KEYS:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st[key].copy_(value.view_as(p))
        return
    value = value.to(device=p.device, dtype=torch.float32)
    if key is None:
        safe_set_full_fp32_param(p, value)
    else:
        safe_set_full_optimizer_state(p, value, key)


def refresh_master(opt) -> None:
    """After the parameters were overwritten without master weights (an fp32 checkpoint, weights only): a
    wrapper's fp32 partitions are copied back from them; a plain optimizer has no separate master."""
    if is_partitioned(opt):
        opt.refresh_fp32_params()


def finish_load(opt, step: float) -> None:
    """Every AdamW state (also partitions holding no loaded fragment on this rank) at the loaded ``step``."""
    for st in _base_optimizer(opt).state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step), dtype=torch.float32)
    if is_partitioned(opt):
        link_state(opt, step)


def _optimizer_step(opt) -> float:
    steps = {float(s["step"]) for s in _base_optimizer(opt).state.values() if "step" in s}
    if len(steps) > 1:
        log.warning("checkpoint: optimizer states have different step counts %s; saving the largest", steps)
    return max(steps, default=0.0)
