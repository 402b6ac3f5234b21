"""Wrap the model in a DeepSpeed engine: ZeRO stage, precision, clipping and batch sizes from our config.

The JSON in ds_configs/ holds what only DeepSpeed knows about (ZeRO buckets, overlap); the keys our config
owns (batch sizes, clipping, precision) are filled in here so the two can never disagree.
"""
from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn

from loopmoe.config import Config, ConfigError
from loopmoe.parallel.fp8 import fp8_autocast
from loopmoe.train.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


def deepspeed_config(cfg: Config, dp_size: int) -> dict:
    try:
        with open(cfg.train.ds_config) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"train.ds_config={cfg.train.ds_config!r}: file not found (see ds_configs/)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg.train.ds_config}: not valid JSON: {e}") from None
    ds.pop("_comment", None)
    for owned in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(f"{cfg.train.ds_config}: remove {owned!r}; it comes from the run config "
                              "(train.micro_batch, train.grad_accum, optim.*, train.precision)")
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds["train_batch_size"] = cfg.train.micro_batch * cfg.train.grad_accum * dp_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    if cfg.train.zero_stage >= 0:
        ds.setdefault("zero_optimization", {})["stage"] = cfg.train.zero_stage
    if cfg.train.precision in ("bf16", "fp8"):  # FP8 runs its matmuls in TE or torchao (loopmoe/parallel/fp8.py), the rest in bf16
        _bf16_settings(ds)
    return ds


def _bf16_settings(ds: dict) -> None:
    """bf16 weights and activations, fp32 gradients: the same on the CPU (DeepSpeed's CPU accelerator has
    bf16, torch has bf16 kernels there) as on a GPU. Read against DeepSpeed 0.19.8 (engine.py
    ``_do_optimizer_sanity_check``, bf16_optimizer.py, zero/stage_1_and_2.py):

    - ``data_types.grad_accum_dtype=fp32``: the micro-batch gradients are summed in fp32. With it ZeRO-1
      picks ``BF16_Optimizer`` (fp32 gradient buffers, fp32 master partitions) and ZeRO-2 keeps
      ``DeepSpeedZeroOptimizer`` with an fp32 gradient partition; ZeRO-0 has no such optimizer (refused
      in parallel/layout.py).
    - ``communication_data_type=fp32``: the data-parallel reduction runs in fp32 too (DeepSpeed's
      default under bf16 casts the gradients to bf16 for the all-reduce / reduce-scatter).
    - ``bf16.immediate_grad_update``: BF16_Optimizer adds each parameter's bf16 gradient into its fp32
      buffer as soon as autograd has accumulated it, and drops the bf16 one. Without it the adding
      happens in ``backward_epilogue``, and the bf16 gradients are cleared only by a backward prologue
      that DeepSpeed hooks onto tensor outputs of the forward; our model returns a dataclass, so the
      bf16 gradient of micro-batch 1 would be added again at micro-batch 2 (measured: grad norm 2.02
      instead of 1.28 at 2 micro-batches). It also makes the pipeline schedule (which runs the backward
      itself, not through the engine) accumulate in fp32.

    The JSON may set other values for the two data-type keys; ``bf16`` is ours (the engine refuses it).
    """
    ds["bf16"] = {"enabled": True, "immediate_grad_update": True}
    ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("communication_data_type", "fp32")


def build_engine(model: nn.Module, cfg: Config, layout):
    """Returns (engine, optimizer, scheduler) for the module ``parallelize`` returned.

    DeepSpeed sees megatron's groups through ``MegatronMPU`` (TP/PP/DP) and the expert groups through
    the MoE modules ``parallelize`` made visible (EP). With ZeRO 0 the engine's gradient clipping is
    replaced by ``clip_grad_norm_`` below: DeepSpeed's averages the norms of EP ranks (their expert
    shards differ) instead of summing their squares. With PP the engine is used for the DP reduction
    and the optimizer step only (pipeline_step); the schedule runs the forward and backward.
    """
    import types

    import deepspeed

    from loopmoe.parallel.groups import MegatronMPU

    _check_expert_parallel(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    mpu = MegatronMPU()
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, layout.dp),
        mpu=mpu, dist_init_required=False)
    if engine.zero_optimization_stage() == 0:
        engine.clip_fp32_gradients = types.MethodType(
            lambda eng: setattr(eng, "_global_grad_norm", clip_grad_norm_(eng.module, eng.gradient_clipping())),
            engine)
    log.info("deepspeed: ZeRO stage %d, %s (%s), micro-batch %d x accumulation %d x DP %d (%s)",
             engine.zero_optimization_stage(), cfg.train.precision, type(engine.optimizer).__name__,
             cfg.train.micro_batch, cfg.train.grad_accum, layout.dp, layout.describe())
    return engine, optimizer, scheduler


def _check_expert_parallel(model: nn.Module) -> None:
    """Expert parameters marked for DeepSpeed's expert-data-parallel groups need the MoE modules made
    visible to the engine (parallelize); with EP=1 they are ordinary data-parallel parameters, so the
    marks are dropped."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE
    from deepspeed.moe.utils import is_moe_param

    visible = any(isinstance(m, DeepSpeedMoE) for m in model.modules())
    for name, p in model.named_parameters():
        if is_moe_param(p):
            if getattr(p, "group_name", "") == "ep_size_1":
                del p.allreduce, p.group_name
            elif not visible:
                raise RuntimeError(f"{name}: expert-parallel parameters but the model was not parallelized; "
                                   "call loopmoe.parallel.parallelize.parallelize(model, cfg, layout) first")


@torch.no_grad()
def global_grad_norm(module: nn.Module) -> torch.Tensor:
    """L2 norm of the whole model's gradient, after the data-parallel reduction: TP-sharded parameters
    counted on every TP rank, replicated ones on TP rank 0, summed over TP x PP (megatron's model-parallel
    group); expert parameters (different on every EP rank) also summed over the expert-parallel group."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups as dsg
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    dev = next(module.parameters()).device
    dense = torch.zeros((), dtype=torch.float64, device=dev)
    experts: dict[str, torch.Tensor] = {}
    for p in module.parameters():
        if p.grad is None or not (tp_rank == 0 or getattr(p, "tensor_model_parallel", False)):
            continue
        sq = p.grad.detach().double().pow(2).sum()
        if is_moe_param(p):
            experts[p.group_name] = experts.get(p.group_name, torch.zeros((), dtype=torch.float64, device=dev)) + sq
        else:
            dense += sq
    for name in sorted(experts):
        dist.all_reduce(experts[name], group=dsg._get_expert_parallel_group(name))
        dense += experts[name]
    dist.all_reduce(dense, group=ps.get_model_parallel_group())
    return dense.sqrt().float()


def clip_grad_norm_(module: nn.Module, max_norm: float) -> torch.Tensor:
    norm = global_grad_norm(module)
    if max_norm > 0:
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        if coef < 1.0:
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return norm


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stops and the last good checkpoint is kept."""


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise TrainingDiverged on every rank if the loss is not finite on any rank (collective)."""
    import torch.distributed as dist

    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        bad = bad.to(dev)
        dist.all_reduce(bad)
    if bad.item() > 0:  # before the optimizer step: no NaN reaches the weights or the optimizer state
        raise TrainingDiverged(f"loss is {value} at step {step}; stopping. The last good checkpoint is "
                               "kept: lower optim.lr or raise optim.warmup_steps and resume.")


def make_step(engine, cfg: Config, layout=None, stage=None):
    """The optimizer step the loop calls as ``step_fn(batches, step, pre_optim_step) -> sums``: [loss,
    lm_loss, lb_loss, z_loss] summed over the micro-batches. ``stage`` (a PipelineStage) selects the
    pipeline step, else the data-parallel one."""
    if stage is not None:
        return lambda batches, step, pre=None: pipeline_step(engine, stage, batches, cfg, step, pre)
    return lambda batches, step, pre=None: dp_step(engine, batches, cfg, layout, step, pre)


def dp_step(engine, batches, cfg: Config, layout, step: int, pre_optim_step=None) -> torch.Tensor:
    """One optimizer step without PP: grad_accum micro-batches through the DeepSpeed engine (it reduces
    the gradients and steps the optimizer at the accumulation boundary only). A non-finite loss raises
    TrainingDiverged before the optimizer step."""
    from loopmoe.parallel.parallelize import backward_loss

    # loss, lm_loss, lb_loss, z_loss summed over micro-batches, on the loss's device: one host read per
    # step (the finiteness check of the sum), not one per micro-batch
    sums = torch.zeros(4)
    for i in range(cfg.train.grad_accum):
        batch = next(batches)
        with fp8_autocast(cfg):  # TE's FP8 autocast on the te route, else a no-op
            out = engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
        sums = sums.to(out.loss.device) + torch.stack([out.loss.detach(), out.lm_loss.detach(),
                                                       out.lb_loss.detach(), out.z_loss.detach()]).float()
        if i == cfg.train.grad_accum - 1:  # before the last backward and the optimizer step
            check_finite(sums[0], step)  # non-finite iff some micro-batch's loss is
        engine.backward(backward_loss(out, layout) if layout is not None else out.loss)
        if i == cfg.train.grad_accum - 1 and pre_optim_step is not None:
            pre_optim_step()
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
    return sums.cpu()


def pipeline_step(engine, stage, batches, cfg: Config, step: int, pre_optim_step=None) -> torch.Tensor:
    """One optimizer step under PP: megatron's 1F1B schedule over grad_accum micro-batches, then
    DeepSpeed's data-parallel reduction (ZeRO 0: its bucketed all-reduce; ZeRO 1: reduce to the
    partition owners) and step. Returns this rank's metric sums (see pipeline_forward_backward);
    a non-finite loss raises TrainingDiverged before the optimizer step."""
    from loopmoe.parallel.pipeline import pipeline_forward_backward

    opt = engine.optimizer
    if hasattr(opt, "clear_backward_seen_flag"):
        opt.clear_backward_seen_flag()
    sums = pipeline_forward_backward(stage, batches, cfg.train.grad_accum, cfg.train.micro_batch, cfg.data.seq_len,
                                     autocast=lambda: fp8_autocast(cfg))
    check_finite(sums[0], step)
    engine.set_gradient_accumulation_boundary(True)
    # ZeRO-1's DeepSpeedZeroOptimizer reduces to the partition owners; BF16_Optimizer (ZeRO-1 under bf16)
    # has no reduce_gradients and all-reduces its fp32 buffers in the engine's fallback, as
    # DeepSpeedEngine.allreduce_gradients (0.19.8) chooses
    if engine.zero_optimization_stage() == 1 and hasattr(opt, "reduce_gradients"):
        opt.reduce_gradients(pipeline_parallel=True)
    else:
        engine.buffered_allreduce_fallback()
    if pre_optim_step is not None:
        pre_optim_step()
    engine.step()
    return sums
