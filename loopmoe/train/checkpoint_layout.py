"""What each local tensor of a rank is saved as in a checkpoint: its global key, global shape, shard offsets
(TP dim, EP expert dim) and replica id, so that every layout and every linear backend writes and reads the
same keys (the table in checkpoint.py). Transformer Engine's per-expert ``GroupedLinear`` weights
(``fc1.weight{e}`` [2h, d]) are placed as their expert's (transposed) slice of the stacked ``w1`` [E, d, 2h]
the torch/megatron backends hold (``ExpertSlot``); TE's extra state (FP8 scaling history) is one megatron
``ShardedObject`` per module and per (TP, EP) rank.

Plain code over ``module.named_parameters()``: no file I/O here (checkpoint.py saves and loads)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Where each local tensor sits in the global one


class _Placement:
    """Global placement of one parameter (or buffer) of this rank: TP / EP shard axis and replica id.
    ``slot``: a per-expert weight, placed as its expert's slice of the stacked tensor (see ExpertSlot)."""

    def __init__(self, name: str, t: torch.Tensor, slot: "ExpertSlot | None" = None):
        from deepspeed.moe.utils import is_moe_param
        from deepspeed.utils import groups as dsg
        from megatron.core import parallel_state as ps

        self.offsets: list[tuple[int, int, int]] = []
        tp_rank = ps.get_tensor_model_parallel_rank()
        if getattr(t, "tensor_model_parallel", False):
            assert slot is None, f"{name}: a per-expert weight split by TP is not supported"
            assert getattr(t, "partition_stride", 1) == 1, f"{name}: strided TP partitions are not supported"
            self.offsets.append((t.partition_dim, tp_rank, ps.get_tensor_model_parallel_world_size()))
            tp_replica = 0
        else:
            tp_replica = tp_rank
        self.ep_rank, self.ep = 0, 1
        if isinstance(t, torch.nn.Parameter) and is_moe_param(t):  # an EP shard of the expert dimension
            g = t.group_name
            self.ep_rank, self.ep = dsg._get_expert_parallel_rank(g), dsg._get_expert_parallel_world_size(g)
            self.replica_id = (tp_replica, dsg._get_expert_data_parallel_rank(g))
        else:
            self.replica_id = (tp_replica, ps.get_data_parallel_rank())
        if slot is not None:  # [1, in, out] at its global expert index
            self.offsets.append((0, slot.global_index(self.ep_rank), slot.n_local * self.ep))
        elif self.ep > 1:
            self.offsets.append((0, self.ep_rank, self.ep))

    def sharded(self, key: str, data: torch.Tensor):
        from megatron.core.dist_checkpointing import ShardedTensor

        return ShardedTensor.from_rank_offsets(key, data, *self.offsets, replica_id=self.replica_id)


# ---------------------------------------------------------------------------------------------------
# Per-expert weights (TE GroupedLinear) <-> the stacked checkpoint layout; the table of what is saved


@dataclass(frozen=True)
class ExpertSlot:
    """A per-expert weight [out, in] (``weight{e}`` of TE's GroupedLinear) as one slice of the stacked tensor
    that the checkpoint holds: moe.Experts's ``w1`` [E, d, 2h] / ``w2`` [E, h, d], i.e. [E, in, out]."""

    stacked: str  # the stacked tensor's name, e.g. "loop.0.ffn.experts.w1"
    local: int  # e: the expert's index on this rank
    n_local: int  # experts on this rank

    def global_index(self, ep_rank: int) -> int:
        return ep_rank * self.n_local + self.local

    @staticmethod
    def to_stacked(t: torch.Tensor) -> torch.Tensor:  # [out, in] -> [1, in, out]
        return t.detach().t().unsqueeze(0).contiguous()

    @staticmethod
    def from_stacked(t: torch.Tensor) -> torch.Tensor:  # [1, in, out] -> [out, in]
        return t[0].t().contiguous()


_WEIGHT_E = re.compile(r"weight(\d+)")


def expert_slots(module) -> dict[str, ExpertSlot]:
    """{parameter name: slot} for every module that declares ``stacked_experts = {child: stacked name}``
    (layers.py's TE experts): the child's parameters ``weight0 .. weight{n-1}`` ([out, in] each) are the n
    local experts of the stacked tensor ``<module>.<stacked name>``."""
    slots = {}
    for mname, m in module.named_modules():
        prefix = f"{mname}." if mname else ""
        for child, stacked in getattr(m, "stacked_experts", {}).items():
            idx = sorted(int(g.group(1)) for n, _ in getattr(m, child).named_parameters(recurse=False)
                         if (g := _WEIGHT_E.fullmatch(n)))
            assert idx == list(range(len(idx))), f"{prefix}{child}: per-expert weights {idx}"
            for e in idx:
                slots[f"{prefix}{child}.weight{e}"] = ExpertSlot(f"{prefix}{stacked}", e, len(idx))
    return slots


@dataclass
class CkptEntry:
    """One parameter or persistent buffer of this rank in the checkpoint: ``name`` in the module, ``key`` in the
    checkpoint (a stacked tensor's for a per-expert weight), where this rank's piece sits (megatron's rank
    offsets (axis, index, pieces)), and whether the piece is stored transposed with a leading expert axis."""

    name: str
    tensor: torch.Tensor
    key: str
    place: _Placement
    slot: ExpertSlot | None = None

    @property
    def transpose(self) -> bool:
        return self.slot is not None

    @property
    def offsets(self) -> list[tuple[int, int, int]]:
        return self.place.offsets

    def to_ckpt(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.slot is None else self.slot.to_stacked(t)

    def from_ckpt(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.slot is None else self.slot.from_stacked(t)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(self.to_ckpt(self.tensor).shape) if self.slot else tuple(self.tensor.shape)

    @property
    def global_shape(self) -> tuple[int, ...]:
        shape = list(self.local_shape)
        for axis, _, pieces in self.offsets:
            shape[axis] *= pieces
        return tuple(shape)

    def sharded(self, prefix: str, data: torch.Tensor):
        return self.place.sharded(prefix + self.key, self.to_ckpt(data))


def checkpoint_table(module) -> list[CkptEntry]:
    """What the checkpoint holds of this rank's ``module``: its state dict's parameters and persistent buffers
    (full model names; tied names twice, as the state dict has them), less what state-dict hooks make up (the
    TE experts' stacked views) and extra states (objects, see extra_state_objects), plus the per-expert
    weights those hooks hide, each as its slice of the stacked tensor."""
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    slots = expert_slots(module)
    table = []
    for name, t in module.state_dict(keep_vars=True).items():
        if name in slots:
            continue
        if name in params or name in buffers:
            t = params.get(name, t)
            table.append(CkptEntry(name, t, name, _Placement(name, t)))
    for name, slot in slots.items():
        t = params[name]
        table.append(CkptEntry(name, t, slot.stacked, _Placement(name, t, slot), slot))
    return table


def _has_extra_state(m: torch.nn.Module) -> bool:
    return type(m).get_extra_state is not torch.nn.Module.get_extra_state


def extra_state_objects(module) -> dict[str, object]:
    """{``model.<module>._extra_state``: megatron ShardedObject} for every module with an extra state (TE's
    FP8 scaling history; megatron's linears drop theirs, layers.py). Per TP x EP rank (the FP8 state follows
    the rank's own shard and tokens): global shape (tp, ep), this rank's offset; replicated over the data-
    parallel ranks that hold the same weights (expert-data-parallel for experts)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject

    objs = {}
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for mname, m in module.named_modules():
        if not _has_extra_state(m):
            continue
        p = next(m.parameters(), None)
        place = _Placement(mname, p if p is not None else torch.empty(0))
        key = f"model.{mname}._extra_state" if mname else "model._extra_state"
        objs[key] = ShardedObject(key, m.get_extra_state(), (tp, place.ep), (tp_rank, place.ep_rank),
                                  replica_id=place.replica_id[1])
    return objs


def restore_extra_states(module, loaded: dict, skipped: list[str]) -> None:
    for mname, m in module.named_modules():
        key = f"model.{mname}._extra_state" if mname else "model._extra_state"
        if key in loaded:
            m.set_extra_state(loaded[key])
    if skipped:
        log.warning("checkpoint: no extra state for %d module(s) at this TP/EP layout (saved by another backend "
                    "or layout), e.g. %s: they keep their fresh state (TE: the FP8 scaling history restarts)",
                    len(skipped), skipped[0])


def present_objects(objs: dict, ckpt_dir: str) -> tuple[dict, list[str]]:
    """(the objects the checkpoint holds for this rank, keys of those it does not)."""
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    if not objs:
        return objs, []
    have = set(load_sharded_metadata(ckpt_dir))  # unique keys: <key>/shard_<off>_<shape>
    return ({k: o for k, o in objs.items() if o.unique_key in have},
            [k for k, o in objs.items() if o.unique_key not in have])
