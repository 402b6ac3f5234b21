"""Activation recompute (``train.recompute``): trade backward compute for activation memory.

    y = checkpointed(fn, *args)   # fn(*args); its activations are dropped and recomputed in backward

Modes (Megatron's --recompute-granularity full|selective, torchtitan's activation_checkpoint.mode):
  none       every activation kept for backward.
  full       every EXECUTED layer recomputed: only its input is kept. A loop layer is checkpointed once
             per iteration (the call, not the module, is wrapped), so a loop of one layer run R times
             keeps R inputs and recomputes R times; wrapping modules would wrap it once or not at all.
  selective  inside every executed layer only the FFN (the MoE: router, dispatch, experts, shared
             experts; or the dense SwiGLU) and the attention core (SDPA) are recomputed; norms,
             projections and the residual stream are kept.

Uses torch's non-reentrant checkpoint (``use_reentrant=False``): it keeps the RNG state, accepts any
input/output structure (the MoE returns a Routing record) and works with gloo/nccl collectives inside
(TP all-reduces, EP all-to-alls), because every rank recomputes the same layers in the same order.
Recompute is only used when autograd records (training); inference and KV-cache decoding run plainly.

A layer holding Transformer Engine modules (``model.linear_backend=te``) is checkpointed by TE's own
``te.distributed.checkpoint`` (non-reentrant too): it re-enters the forward's FP8 autocast and recipe
for the recompute and keeps TE from updating its FP8 scaling state a second time, which torch's
checkpoint would do outside the autocast (``train.precision=fp8``).

Forward side effects must not run twice: ``is_recomputing()`` is true while a recompute runs, so the
router's aux-free load accumulation skips it (loopmoe/model/moe.py).
"""
from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "full", "selective")

_depth = 0  # > 0 while torch re-runs a checkpointed forward (in backward)


def is_recomputing() -> bool:
    return _depth > 0


@contextlib.contextmanager
def _recomputing():
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def _contexts():  # (context of the first forward, context of the recompute)
    return contextlib.nullcontext(), _recomputing()


def is_te_module(m: nn.Module) -> bool:
    """A Transformer Engine module (or a subclass, like layers.py's wrappers), told by its class's module
    name so that TE is never imported here."""
    return any(c.__module__.startswith("transformer_engine.") for c in type(m).__mro__)


def holds_te_modules(fn) -> bool:
    """``fn`` is (a bound method of) a module containing TE modules; False whenever TE is not loaded."""
    if "transformer_engine" not in sys.modules:
        return False
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    return isinstance(owner, nn.Module) and any(is_te_module(m) for m in owner.modules())


def checkpointed(fn, *args):
    """``fn(*args)`` with its activations recomputed in backward; a plain call when grad is off."""
    if not torch.is_grad_enabled():
        return fn(*args)
    if holds_te_modules(fn):
        return _te_checkpoint(fn, *args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


def _te_checkpoint(fn, *args):
    """TE's checkpoint (``context_fn`` and ``use_reentrant`` since TE 2.8): FP8 autocast and recipe of the
    forward re-entered for the recompute, no second FP8 scaling update. No RNG tracker: no dropout here."""
    import transformer_engine.pytorch as te

    return te.distributed.checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
