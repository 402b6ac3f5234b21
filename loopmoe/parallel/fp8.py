"""FP8 training (``train.precision=fp8``): the one place it is switched on.

    model = prepare_fp8(model, cfg)   # after build_model, before parallelize and the engine: checks the
                                      # route can run here (else raises saying why), converts (torchao),
                                      # logs which layers run in FP8
    with fp8_autocast(cfg):           # around the forward of every micro-batch (DP step, pipeline stage)
        out = model(tokens, labels=labels, loss_mask=loss_mask)

Everything else (weights, norms, attention core, router, embedding, LM head, gradients) is bf16 under
DeepSpeed as for ``precision=bf16``; only the GEMMs of the layers named at start-up run in FP8.

Two routes (``train.fp8_backend``; config.py refuses fp8 where neither can apply):

- ``te`` (default; what the Slurm presets would use): ``model.linear_backend=te`` builds ``te.Linear``
  for the block linears (attention qkv/proj, shared and dense FFN) and ``te.GroupedLinear`` for the
  routed experts (loopmoe/model/layers.py). Their GEMMs run in FP8 inside TE's autocast with the recipe
  of ``train.fp8_recipe`` (DelayedScaling by default; Float8CurrentScaling, MXFP8BlockScaling), the
  amax reduction group spanning the tensor- AND data-parallel ranks (megatron's
  ``get_amax_reduction_group(tp_only_amax_red=False)``), as Megatron-LM does: every rank then scales a
  layer's tensors alike. Recompute uses TE's own checkpoint (loopmoe/model/recompute.py).
- ``torchao``: ``model.linear_backend=torch`` builds plain ``nn.Linear``; the block linears whose
  widths are multiples of 16 become torchao ``Float8Linear`` (dynamic tensorwise or rowwise scaling:
  no scaling state, so no autocast and plain torch recompute). The routed experts stay bf16: torchao
  0.18's FP8 grouped GEMM (``prototype.moe_training``) wants each expert's weight column-major
  ([E, K, N] with strides (K*N, 1, K)) and Triton kernels on CUDA, while ``moe.Experts`` keeps w1
  [E, d, 2h] row-major (the checkpoint layout) and DeepSpeed's ZeRO re-lays parameters into flat
  contiguous buffers. torchao's FP8 GEMM is ``torch._scaled_mm``: it runs on CUDA (sm89+, e.g. H100)
  and, in torch 2.13, on the CPU (tests/test_fp8.py trains with it there).

MFU is always against the chip's dense bf16 peak (loopmoe/train/peak.py); FP8's gain is a speed-up.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter

import torch
from torch import nn

from loopmoe.config import Config, fp8_recipe_name
from loopmoe.model.recompute import is_te_module

log = logging.getLogger(__name__)

FLOAT8_ALIGN = 16  # torch._scaled_mm: both widths of an FP8 GEMM operand multiples of 16
FP8_BLOCKS = (".attn.", ".ffn.")  # the block linears converted on the torchao route (as TE's route)
EXPERTS_BF16 = ("routed experts stay bf16 on the torchao route: torchao 0.18's FP8 grouped GEMM needs "
                "column-major expert weights and CUDA Triton kernels (see loopmoe/parallel/fp8.py)")


def fp8_enabled(cfg: Config) -> bool:
    return cfg.train.precision == "fp8"


# ---------------------------------------------------------------------------------------------------
# Can FP8 run here? (said plainly, never a silent bf16 run)


def fp8_unavailable_reason(cfg: Config, probe: bool = True) -> str | None:
    """Why ``precision=fp8`` cannot run in this process, or None when it can (or FP8 is off).
    ``probe=False`` leaves out the checks against the GPU itself (TE's recipe check, the compute capability;
    they initialise CUDA on the current device): for a preflight that runs before each rank has chosen its
    device. ``prepare_fp8`` runs them all."""
    if not fp8_enabled(cfg):
        return None
    if cfg.train.fp8_backend == "te":
        return _te_unavailable_reason(fp8_recipe_name(cfg.train), probe)
    return _torchao_unavailable_reason(probe)


def _te_unavailable_reason(recipe: str, probe: bool) -> str | None:
    if not torch.cuda.is_available():
        return ("train.fp8_backend=te: no CUDA device is visible; Transformer Engine's FP8 GEMMs need a Hopper "
                "(or newer) GPU. On the CPU use train.fp8_backend=torchao with model.linear_backend=torch")
    try:
        import transformer_engine.pytorch as te
    except ImportError as e:
        return (f"train.fp8_backend=te: transformer_engine is not importable ({e}); install it on the GPU "
                "machine with pip install '.[fp8]', or use train.fp8_backend=torchao")
    if not probe:
        return None
    try:
        with _te_autocast(te, te_recipe(recipe), None):  # TE checks the recipe against the device on entry
            pass
    except (AssertionError, RuntimeError, ValueError, AttributeError) as e:
        return (f"train.fp8_recipe={recipe!r}: Transformer Engine cannot run it on "
                f"{torch.cuda.get_device_name()}: {e}")
    return None


def _torchao_unavailable_reason(probe: bool) -> str | None:
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        return (f"train.fp8_backend=torchao: torchao is not importable ({e}); pip install -c constraints.txt "
                "'.[fp8-torchao]'")
    if probe and torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        return (f"train.fp8_backend=torchao: {torch.cuda.get_device_name()} has no FP8 tensor cores "
                "(torch._scaled_mm needs sm89+, e.g. H100); use train.precision=bf16")
    return None


def require_fp8(cfg: Config) -> None:
    """Raise RuntimeError saying why, when ``precision=fp8`` cannot run here."""
    reason = fp8_unavailable_reason(cfg)
    if reason is not None:
        raise RuntimeError(f"train.precision=fp8 cannot run here: {reason}")


# ---------------------------------------------------------------------------------------------------
# Start-up: conversion (torchao) and the log of what runs in FP8


def prepare_fp8(model: nn.Module, cfg: Config) -> nn.Module:
    """The model ready for FP8 training (unchanged when FP8 is off): raises if FP8 cannot run here,
    converts the block linears on the torchao route, logs which layers run in FP8. Call it on the
    plain model (build_model), before parallelize and the DeepSpeed engine."""
    if not fp8_enabled(cfg):
        return model
    require_fp8(cfg)
    recipe = fp8_recipe_name(cfg.train)
    if cfg.train.fp8_backend == "torchao":
        convert_to_float8(model, recipe)
    names = fp8_layers(model)
    if not names:
        raise RuntimeError(f"train.precision=fp8 ({cfg.train.fp8_backend}, {recipe}): no layer of the model runs "
                           "in FP8 (no TE module / Float8Linear found); check model.linear_backend")
    log.info("FP8 (%s, recipe %s): %d layers run their GEMMs in FP8: %s", cfg.train.fp8_backend, recipe,
             len(names), summarize(names))
    if cfg.train.fp8_backend == "torchao" and cfg.model.ffn == "moe":
        log.warning("FP8: %s", EXPERTS_BF16)
    _warn_looped_delayed(cfg, recipe)
    return model


def _warn_looped_delayed(cfg: Config, recipe: str) -> None:
    """A loop layer runs loop_iters times per micro-batch forward, so inside one autocast region."""
    if cfg.train.fp8_backend == "te" and recipe == "delayed" and cfg.model.is_looped:
        log.warning("FP8: the loop layers run %d times inside each micro-batch's fp8_autocast; Transformer Engine "
                    "documents for delayed scaling (reduce_amax) that a module must not run more than once in one "
                    "autocast region (later calls override its amax before the reduction). "
                    "train.fp8_recipe=current scales every call from its own tensor", cfg.model.loop_iters)


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """torchao's module_filter_fn: the block linears (attention, shared and dense FFN) whose widths are
    multiples of 16; embedding, LM head, router, IterAdaLN and the iteration MLP stay bf16."""
    in_block = any(b in f".{fqn}." for b in FP8_BLOCKS)
    aligned = module.in_features % FLOAT8_ALIGN == 0 and module.out_features % FLOAT8_ALIGN == 0
    return in_block and aligned


def convert_to_float8(model: nn.Module, recipe: str) -> list[str]:
    """Swap the block nn.Linear layers of ``model`` for torchao Float8Linear (in place); returns the
    names of the block linears left in bf16 because a width is not a multiple of 16 (logged)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=float8_filter)
    skipped = [n for n, m in model.named_modules()
               if type(m) is nn.Linear and any(b in f".{n}." for b in FP8_BLOCKS)]
    if skipped:
        log.warning("FP8 (torchao): %d block linears stay bf16, a width not a multiple of %d: %s", len(skipped),
                    FLOAT8_ALIGN, summarize(skipped))
    return skipped


def fp8_layers(model: nn.Module) -> list[str]:
    """Names of the modules whose GEMMs run in FP8: TE modules (outermost only) or torchao Float8Linear."""
    names = []
    for name, m in model.named_modules():
        if _is_float8_linear(m) or (is_te_module(m) and not any(name.startswith(n + ".") for n in names)):
            names.append(name)
    return names


def _is_float8_linear(m: nn.Module) -> bool:
    return any(c.__name__ == "Float8Linear" and c.__module__.startswith("torchao.") for c in type(m).__mro__)


def summarize(names: list[str]) -> str:
    """'attn.qkv x4, ffn.shared.w1 x4' for 'prelude.0.attn.qkv', 'loop.1.attn.qkv', ... (short for big models)."""
    kinds = Counter(_strip_layer(n) for n in names)
    return ", ".join(f"{k} x{c}" for k, c in kinds.items())


def _strip_layer(name: str) -> str:
    parts = name.split(".")  # prelude.0.attn.qkv -> attn.qkv
    return ".".join(parts[2:]) if len(parts) > 2 and parts[1].isdigit() else name


# ---------------------------------------------------------------------------------------------------
# The autocast of a micro-batch forward (TE route)


def fp8_autocast(cfg: Config):
    """Context manager for one micro-batch forward: TE's FP8 autocast with the config's recipe and the
    tensor+data-parallel amax group on the te route; a nullcontext when FP8 is off or on the torchao
    route (Float8Linear scales itself)."""
    if not fp8_enabled(cfg) or cfg.train.fp8_backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    return _te_autocast(te, te_recipe(fp8_recipe_name(cfg.train)), amax_reduction_group())


def _te_autocast(te, recipe, group):
    """TE >= 2.9 names it ``te.autocast(recipe=, amax_reduction_group=)``; 2.8 has only ``fp8_autocast``
    (deprecated since, with the same meaning)."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


@functools.cache
def te_recipe(name: str):
    """TE's recipe object for ``train.fp8_recipe`` (one per run: TE keys its amax buffers by recipe).
    HYBRID = E4M3 forward, E5M2 gradients (Megatron-LM's --fp8-format hybrid); MXFP8 is E4M3 throughout."""
    from transformer_engine.common import recipe as r

    classes = {"delayed": "DelayedScaling", "current": "Float8CurrentScaling", "mxfp8": "MXFP8BlockScaling"}
    cls = getattr(r, classes[name], None)
    if cls is None:
        raise AttributeError(f"the installed Transformer Engine has no recipe.{classes[name]}")
    if name == "mxfp8":
        return cls(fp8_format=r.Format.E4M3)
    return cls(fp8_format=r.Format.HYBRID)  # delayed: TE's defaults, amax_history_len=1024, max over it


def amax_reduction_group():
    """The tensor + data-parallel group (megatron-core 0.16.1's ``get_amax_reduction_group``; no context
    parallelism here), or None before megatron's groups exist (one process)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return ps.get_amax_reduction_group(with_context_parallel=False, tp_only_amax_red=False)
