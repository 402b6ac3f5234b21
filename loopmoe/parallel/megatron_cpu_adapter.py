"""The one CPU adapter for megatron-core 0.16.1 (applied only where CUDA is absent; a no-op on GPUs).

megatron-core assumes CUDA in a few places that our CPU tests and laptop runs reach:

| where (megatron-core 0.16.1)                               | what it does                               | replaced by                         |
|------------------------------------------------------------|--------------------------------------------|-------------------------------------|
| pipeline_parallel/schedules.py                             | ``torch.zeros([], ..., device="cuda")``    | ``cuda_to_cpu()``: device -> "cpu"  |
| pipeline_parallel/p2p_communication.py                     | ``device=torch.cuda.current_device()``     | ``current_device() -> "cpu"``       |
| pipeline_parallel/p2p_communication.py                     | ``torch.cuda.synchronize()``               | a no-op                             |
| tensor_parallel/mappings.py (sequence-parallel gathers)    | ``device=torch.cuda.current_device()``     | ``current_device() -> "cpu"``       |
| dist_checkpointing (torch_dist save/load)                  | ``torch.cuda.current_device/synchronize``  | the same two stubs                  |

``install()`` sets the two ``torch.cuda`` stubs process-wide (idempotent) and ``cuda_to_cpu()`` is a
``TorchFunctionMode`` that rewrites a ``device`` argument of "cuda" (or a CUDA index) to "cpu" for the
code run inside it (the pipeline schedule). tests/test_parallel.py::test_cpu_adapter checks each line
of the table and that nothing is patched when CUDA is present.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def needed() -> bool:
    return not torch.cuda.is_available()


def install() -> bool:
    """Stub ``torch.cuda.current_device`` (-> "cpu") and ``torch.cuda.synchronize`` (no-op) when CUDA is
    absent. Returns whether the stubs are active."""
    global _installed
    if not needed():
        return False
    if not _installed:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *args, **kwargs: None
        _installed = True
    return True


def _is_cuda(dev) -> bool:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True  # a CUDA ordinal
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_to_cpu():
    """Run megatron code that allocates on "cuda" on the CPU (only when CUDA is absent)."""
    if not needed():
        yield
        return
    install()
    with _CudaToCpu():
        yield
