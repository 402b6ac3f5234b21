"""The AdamW state of one parameter, out of (and back into) DeepSpeed's optimizers: under ZeRO-1/2 each
parameter's fragment of the flat fp32 partition (``param._hp_mapping``) is summed over the partition group
(zeros elsewhere) into the parameter's full state; loading writes each rank's fragment back."""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_OPT_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter moments

# ---------------------------------------------------------------------------------------------------
# Optimizer state per parameter, out of (and back into) DeepSpeed


def _is_zero(opt) -> bool:
    return hasattr(opt, "single_partition_of_fp32_groups")


def _base_optimizer(opt):
    return opt.optimizer if _is_zero(opt) else opt


def _zero_fragment(opt, p, key: str | None):
    """(view of this rank's fragment in the flat state or master, its [start, numel] in the flat param,
    the partition group) for a ZeRO-1/2 parameter, or None when this rank holds none of it."""
    m = getattr(p, "_hp_mapping", None)
    if m is None:
        return None
    flat = opt.single_partition_of_fp32_groups[m.param_group_index]
    src = flat if key is None else opt.optimizer.state[flat][key]
    hp = m.hp_fragment_address
    return src.narrow(0, hp.start, hp.numel), m.lp_fragment_address


def _partition_group(opt, p):
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups as dsg
    from megatron.core import parallel_state as ps

    if is_moe_param(p):
        return dsg._get_expert_data_parallel_group(p.group_name)
    return ps.get_data_parallel_group()


def _get_state(opt, p, key: str | None) -> torch.Tensor:
    """The full fp32 state ``key`` (None = master weight) of parameter ``p`` on this rank (collective under
    ZeRO: every rank of the partition group calls it in the same order)."""
    if not _is_zero(opt):
        if key is None:
            return p.detach().float().clone()
        st = opt.state.get(p, {})
        return st[key].float().clone() if key in st else torch.zeros_like(p, dtype=torch.float32)
    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    frag = _zero_fragment(opt, p, key)
    if frag is not None:
        src, lp = frag
        full.narrow(0, lp.start, lp.numel).copy_(src)
    group = _partition_group(opt, p)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(full, group=group)
    return full.view_as(p)


def _set_state(opt, p, key: str | None, value: torch.Tensor, step: float) -> None:
    if not _is_zero(opt):
        if key is None:
            return  # the plain optimizer's master weight is the parameter itself
        st = opt.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(step, dtype=torch.float32)
            for k in _OPT_KEYS:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st[key].copy_(value.view_as(p))
        return
    m = getattr(p, "_hp_mapping", None)
    if m is None:
        return
    flat = opt.single_partition_of_fp32_groups[m.param_group_index]
    st = opt.optimizer.state[flat]
    if "step" not in st:  # a fresh engine: create AdamW's state for the flat partition
        st["step"] = torch.tensor(step, dtype=torch.float32)
        for k in _OPT_KEYS:
            st[k] = torch.zeros_like(flat)
    dst, lp = _zero_fragment(opt, p, key)
    dst.copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))


def _optimizer_step(opt) -> float:
    steps = {float(s["step"]) for s in _base_optimizer(opt).state.values() if "step" in s}
    if len(steps) > 1:
        log.warning("checkpoint: optimizer states have different step counts %s; saving the largest", steps)
    return max(steps, default=0.0)
