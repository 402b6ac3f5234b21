"""The peak TFLOP/s per device that MFU is measured against.

* ``logging.peak_tflops`` > 0: that figure, as stated.
* a GPU: the chip's dense (no sparsity) bf16 datasheet peak by device name, whatever ``train.precision``
  is: fp32, bf16 and fp8 runs are all measured against it (the convention of Megatron-LM and
  torchtitan), so MFU compares across precisions and FP8's gain shows as a higher MFU / a speed-up over
  the bf16 run, never as a different denominator.
* the CPU: measured once at start-up, the best of a few dense fp32 1024^3 matrix products (~0.2 s) on
  the threads training uses. It is what this process's cores can reach, not a datasheet figure.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# (substrings of torch.cuda.get_device_name(), dense bf16 TFLOP/s); first match wins, so the more specific
# names come first. Datasheet figures; those given "with sparsity" are halved.
GPU_PEAKS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.0),  # H200 SXM (and GH200): the H100 SXM compute
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.0),
    (("H100",), 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    (("A100",), 312.0),
]


@dataclass(frozen=True)
class Peak:
    tflops: float  # per device; 0 = unknown (MFU not reported)
    source: str  # where the figure comes from, for the log


def gpu_peak(name: str) -> Peak:
    """The dense bf16 datasheet peak of the GPU called ``name`` (0 when unknown)."""
    for keys, bf16 in GPU_PEAKS:
        if all(k in name for k in keys):
            return Peak(bf16, f"{name}: dense bf16 datasheet peak")
    return Peak(0.0, f"{name}: peak unknown, set logging.peak_tflops for MFU")


def measure_cpu_peak(n: int = 1024, min_reps: int = 3, budget_s: float = 0.2) -> float:
    """Best dense fp32 ``n x n @ n x n`` rate in TFLOP/s: one warm-up, then at least ``min_reps`` products
    and until ``budget_s`` has passed."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    torch.mm(a, b)  # warm-up: thread pool and allocator
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best / 1e12


def resolve_peak(stated: float, precision: str | None = None, device: str | None = None) -> Peak:
    """The stated peak, else the GPU's dense bf16 peak by name, else the CPU's, measured. ``precision``
    never changes the figure; for fp8 the source says so. ``device``: "cuda" or "cpu"; default: the GPU
    when one is visible."""
    if stated > 0:
        return Peak(stated, "logging.peak_tflops")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        peak = gpu_peak(torch.cuda.get_device_name())
    else:
        peak = Peak(measure_cpu_peak(), f"CPU, measured: best dense fp32 1024^3 matmul on {torch.get_num_threads()} "
                                        "thread(s)")
    if precision == "fp8" and peak.tflops > 0:  # said once, so nobody reads FP8 MFU against an FP8 peak
        peak = Peak(peak.tflops, peak.source + "; train.precision=fp8 is measured against it too: FP8's gain "
                                               "shows as a speed-up")
    return peak
