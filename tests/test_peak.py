"""The MFU peak per device (loopmoe/train/peak.py): datasheet figures by GPU name, measured on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from loopmoe.train.peak import gpu_peak, measure_cpu_peak, resolve_peak


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
    ("NVIDIA H100 80GB HBM3", "fp8", 1979.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 PCIe", "fp8", 1513.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200", "fp8", 1979.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 312.0),  # the bf16 peak is the reference for every precision
])
def test_gpu_datasheet_peaks_by_name(name, precision, tflops):
    peak = gpu_peak(name, precision)
    assert peak.tflops == tflops
    assert name in peak.source and ("FP8" if precision == "fp8" else "bf16") in peak.source


def test_a100_has_no_fp8_peak_and_unknown_gpus_say_so():
    a100 = gpu_peak("NVIDIA A100-SXM4-40GB", "fp8")
    assert a100.tflops == 312.0 and "no FP8" in a100.source
    unknown = gpu_peak("NVIDIA GeForce RTX 3090", "bf16")
    assert unknown.tflops == 0.0 and "logging.peak_tflops" in unknown.source


def test_stated_peak_wins_and_cpu_peak_is_measured():
    assert resolve_peak(123.0, "bf16").tflops == 123.0
    peak = resolve_peak(0.0, "fp32", device="cpu")  # the measured branch, on any machine
    assert "CPU, measured" in peak.source and f"{torch.get_num_threads()} thread" in peak.source
    # A 2-core CPU does some GFLOP/s; no CPU does 100 TFLOP/s of fp32.
    assert math.isfinite(peak.tflops) and 1e-4 < peak.tflops < 100


def test_measured_peak_is_a_best_of_matmul_rate():
    """2 n^3 FLOPs over the fastest product: a 64^3 product on one repetition is still a positive rate."""
    rate = measure_cpu_peak(n=64, min_reps=1, budget_s=0.0)
    assert rate > 0 and math.isfinite(rate)
