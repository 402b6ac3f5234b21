"""Apply parallelism to a plain LoopMoEModel from outside (torchtitan style).

    layout = validate_layout(cfg, world)                    # loopmoe/parallel/layout.py
    init_distributed(tp, pp, ..., ep=layout.ep)             # process groups (+ DeepSpeed expert groups)
    model = build_model(cfg, layout)                        # TP linears, EP expert slice, SP marks
    module = parallelize(model, cfg, layout)                # what the DeepSpeed engine wraps

What each parallelism needs and where it is done:

- TP (megatron-core): the model builds Column/RowParallelLinear itself when parallel_state says TP > 1.
  DeepSpeed learns about TP through ``MegatronMPU`` (groups.py), passed to ``deepspeed.initialize``:
  gradient norms count TP-sharded parameters on every rank and replicated ones on TP rank 0.
- SP (megatron-core): parameters outside the TP linears see only a sequence shard and carry
  ``param.sequence_parallel = True``; ``parallelize`` registers a gradient hook on each that sums its
  gradient over the TP group. The hook is a tensor hook on the leaf, so it runs once per backward with
  the gradient already accumulated over every use of the parameter (a loop layer's R iterations
  included), before DeepSpeed's own post-accumulation hooks (ZeRO-2) see it.
- EP (DeepSpeed): the experts are sharded and exchanged by all-to-all in the model (moe.py); the
  groups are made by groups.create_expert_groups. DeepSpeed's engine only hands ZeRO the expert groups
  when it finds ``isinstance(module, deepspeed.moe.layer.MoE)``: ``parallelize`` re-classes each of our
  MoE modules as a subclass of both (DeepSpeed's ``__init__`` is never run; the engine reads only
  ``num_experts`` and calls ``set_deepspeed_parallelism``, which we make a no-op).
- PP (megatron-core schedules): the model is cut into a PipelineStage (pipeline.py) for this rank's
  stage, with the megatron TransformerConfig the schedules read.
- FP8 (Transformer Engine or torchao): ``prepare_fp8`` (fp8.py) checks the route and swaps torchao's
  Float8Linear in; TE's autocast wraps each micro-batch's forward in the engine (fp8.fp8_autocast).
- DP / ZeRO-1/2 (DeepSpeed): expert parameters are in their own optimizer groups
  (optim.py: split_params_into_different_moe_groups_for_optimizer) and are reduced over the
  expert-data-parallel group.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from loopmoe.parallel.layout import Layout, stage_ranges
from loopmoe.parallel.fp8 import prepare_fp8


@functools.cache
def _deepspeed_visible(cls: type) -> type:
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
        """The engine calls this on every MoE; our groups exist already (groups.create_expert_groups)."""

    return type(cls.__name__, (cls, DeepSpeedMoE), {
        "set_deepspeed_parallelism": set_deepspeed_parallelism,
        "__doc__": f"{cls.__doc__ or cls.__name__} (seen by DeepSpeed's engine as a deepspeed.moe.layer.MoE)",
    })


def make_moe_visible_to_deepspeed(model: nn.Module) -> int:
    """Re-class our MoE modules so ``isinstance(m, deepspeed.moe.layer.MoE)`` holds; returns how many."""
    from loopmoe.model.moe import MoE

    n = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.__class__ = _deepspeed_visible(type(m)) if type(m) is MoE else type(m)
            m.num_experts = m.n_experts  # read by the engine
            m.num_local_experts = m.n_local
            m.expert_group_name = f"ep_size_{m.ep_size}"
            n += 1
    return n


def register_sequence_parallel_hooks(module: nn.Module) -> int:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group (megatron's
    finalize_model_grads does the same for its models). Returns how many parameters got a hook."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    n = 0
    for p in module.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            p.register_hook(hook)
            n += 1
    return n


def stage_config(cfg, layout: Layout):
    """megatron's TransformerConfig for the pipeline schedules (hidden size, SP, p2p dtype)."""
    from loopmoe.model.layers import megatron_config

    config = megatron_config(cfg.model, layout.sequence_parallel)
    config.pipeline_dtype = torch.bfloat16 if cfg.train.precision in ("bf16", "fp8") else torch.float32
    config.variable_seq_lengths = False
    return config


def parallelize(model: nn.Module, cfg, layout: Layout) -> nn.Module:
    """Wire SP, EP and PP onto a model built for ``layout`` (see build_model); returns the module the
    engine trains: the model itself, or this rank's PipelineStage."""
    # precision=fp8: refuse what cannot run here, convert torchao's Float8Linears, log the FP8 layers;
    # before the pipeline cut, so every stage holds the converted layers
    model = prepare_fp8(model, cfg)
    if layout.ep > 1:
        make_moe_visible_to_deepspeed(model)
    module = model
    if layout.pp > 1:
        from megatron.core import parallel_state as ps

        from loopmoe.parallel.pipeline import PipelineStage

        lo, hi = stage_ranges(cfg.model, layout.pp_split)[ps.get_pipeline_model_parallel_rank()]
        module = PipelineStage(model, lo, hi, stage_config(cfg, layout))
    if layout.sequence_parallel:
        register_sequence_parallel_hooks(module)
    return module


def backward_loss(out, layout: Layout) -> torch.Tensor:
    """The loss to back-propagate (PP = 1): the model's loss, with the MoE auxiliary losses averaged
    over the TP ranks under sequence parallelism (each TP rank routes its own sequence shard and the
    gradients of those shards are summed over TP, so each shard's aux loss is weighted 1/TP)."""
    if layout.sequence_parallel and out.aux_loss is not None:
        return out.loss - (1.0 - 1.0 / layout.tp) * out.aux_loss
    return out.loss
