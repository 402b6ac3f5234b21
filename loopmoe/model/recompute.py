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

Forward side effects must not run twice: ``is_recomputing()`` is true while a recompute runs, so the
router's aux-free load accumulation skips it (loopmoe/model/moe.py).
"""
from __future__ import annotations

import contextlib

import torch
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


def checkpointed(fn, *args):
    """``fn(*args)`` with its activations recomputed in backward; a plain call when grad is off."""
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
