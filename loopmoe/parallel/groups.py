"""Process groups: megatron-core's parallel_state (TP, PP, DP) + DeepSpeed's expert groups inside it,
and the ``mpu`` adapter DeepSpeed's engine and ZeRO read them through.

Rank order (megatron-core's default "tp-cp-ep-dp-pp", CP = 1 and megatron's own EP unused):

    rank = tp_rank + TP * (dp_rank + DP * pp_rank)

Expert groups (DeepSpeed's ``ep_size_{EP}``, built here before the model so the model's MoE finds them):
an expert-parallel group is EP consecutive ranks of one megatron data-parallel group (same TP rank,
same stage); the expert-data-parallel group is the DP/EP ranks of that DP group holding the same
experts. Unlike DeepSpeed's own TP>1 layout, TP peers are NOT in the expert-data-parallel group: our
experts see the same tokens on every TP rank (or, under sequence parallelism, different tokens whose
expert gradients the SP hook sums over TP, like every other sequence-parallel parameter), so ZeRO's
"divide by DP, sum over expert-DP" gives exactly the data-parallel mean.
"""
from __future__ import annotations

import datetime

import torch.distributed as dist


def _ps():
    from megatron.core import parallel_state as ps

    return ps


def dp_group_ranks(world: int, tp: int, pp: int) -> list[list[int]]:
    """Every megatron data-parallel group's global ranks (same tp rank and stage), in creation order."""
    dp = world // (tp * pp)
    return [[t + tp * (d + dp * s) for d in range(dp)] for s in range(pp) for t in range(tp)]


def expert_group_ranks(world: int, tp: int, pp: int, ep: int) -> tuple[list[list[int]], list[list[int]]]:
    """(expert-parallel groups, expert-data-parallel groups) as global rank lists."""
    ep_groups, edp_groups = [], []
    for ranks in dp_group_ranks(world, tp, pp):
        ep_groups += [ranks[i:i + ep] for i in range(0, len(ranks), ep)]
        edp_groups += [ranks[j::ep] for j in range(ep)]
    return ep_groups, edp_groups


def create_expert_groups(ep: int, timeout: datetime.timedelta | None = None) -> None:
    """Register DeepSpeed's "ep_size_{ep}" expert and expert-data-parallel groups (collective: every
    rank calls it, after megatron's parallel_state). Idempotent. ``timeout`` bounds their collectives (None:
    torch's default, 30 minutes; init_distributed passes parallel.timeout_minutes)."""
    from deepspeed.utils import groups as dsg

    name = f"ep_size_{ep}"
    if name in dsg._get_expert_parallel_group_dict():
        return
    ps = _ps()
    world = dist.get_world_size()
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    mine = dist.get_process_group_ranks(ps.get_data_parallel_group())
    all_dp = dp_group_ranks(world, tp, pp)
    if mine not in all_dp:  # megatron changed its default order: refuse rather than mis-group
        raise RuntimeError(f"megatron's data-parallel group {mine} is not one of {all_dp} (rank order tp-dp-pp)")
    rank = dist.get_rank()
    ep_groups, edp_groups = expert_group_ranks(world, tp, pp, ep)
    for ranks in ep_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dsg._EXPERT_PARALLEL_GROUP[name], dsg._EXPERT_PARALLEL_GROUP_RANKS[name] = g, ranks
    for ranks in edp_groups:
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dsg._EXPERT_DATA_PARALLEL_GROUP[name], dsg._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = g, ranks


def destroy_expert_groups() -> None:
    """Forget DeepSpeed's expert groups (tests that re-initialise parallel_state with another layout)."""
    from deepspeed.utils import groups as dsg

    for d in (dsg._EXPERT_PARALLEL_GROUP, dsg._EXPERT_PARALLEL_GROUP_RANKS, dsg._EXPERT_DATA_PARALLEL_GROUP,
              dsg._EXPERT_DATA_PARALLEL_GROUP_RANKS):
        d.clear()


class MegatronMPU:
    """megatron-core's parallel_state as DeepSpeed's ``mpu`` (Megatron-DeepSpeed's conventions):
    "model parallel" rank/size = the TENSOR-parallel ones (ZeRO and clipping count replicated parameters
    on TP rank 0 only), the model-parallel GROUP = TP x PP (gradient norms are summed over every stage)."""

    def __init__(self):
        self.ps = _ps()

    # tensor parallel
    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    # "model parallel" in DeepSpeed's sense
    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    # pipeline
    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    # data parallel
    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()
