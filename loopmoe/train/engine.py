"""Wrap the model in a DeepSpeed engine: ZeRO stage, precision, clipping and batch sizes from our config.

The JSON in ds_configs/ holds what only DeepSpeed knows about (ZeRO buckets, overlap); the keys our config
owns (batch sizes, clipping, precision) are filled in here so the two can never disagree.
"""
from __future__ import annotations

import json
import logging

import torch
from torch import nn

from loopmoe.config import Config, ConfigError
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
    if cfg.train.precision in ("bf16", "fp8"):  # FP8 runs its matmuls in TE, the rest in bf16
        if not torch.cuda.is_available():
            raise ConfigError(f"train.precision={cfg.train.precision!r} needs a GPU; use train.precision=fp32 on the CPU")
        ds["bf16"] = {"enabled": True}
    return ds


def build_engine(model: nn.Module, cfg: Config, dp_size: int, mpu=None):
    """Returns (engine, optimizer, scheduler). ``mpu`` is megatron-core's parallel_state adapter (TP>1)."""
    import deepspeed

    _check_expert_parallel(model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, dp_size), mpu=mpu,
        dist_init_required=False)
    log.info("deepspeed: ZeRO stage %d, micro-batch %d x accumulation %d x DP %d", engine.zero_optimization_stage(),
             cfg.train.micro_batch, cfg.train.grad_accum, dp_size)
    return engine, optimizer, scheduler


def _check_expert_parallel(model: nn.Module) -> None:
    """Expert parameters marked for DeepSpeed's expert-data-parallel groups need an engine that knows the
    MoE layers; with EP=1 they are ordinary data-parallel parameters, so the marks are dropped."""
    from deepspeed.moe.utils import is_moe_param

    for name, p in model.named_parameters():
        if is_moe_param(p):
            if getattr(p, "group_name", "") != "ep_size_1":
                raise NotImplementedError(
                    f"{name}: expert parallelism (parallel.ep > 1) is not wired into the DeepSpeed engine yet; "
                    "train with parallel.ep=1")
            del p.allreduce, p.group_name
