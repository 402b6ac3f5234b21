"""The MFU peak per device (loopmoe/train/peak.py): datasheet figures by GPU name, measured on the CPU."""
from __future__ import annotations

import math

import pytest
import torch

from loopmoe.train.peak import gpu_peak, measure_cpu_peak, resolve_peak


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
])
def test_gpu_datasheet_peaks_by_name(name, tflops):
    peak = gpu_peak(name)
    assert peak.tflops == tflops
    assert name in peak.source and "dense bf16" in peak.source


def test_unknown_gpus_say_so():
    unknown = gpu_peak("NVIDIA GeForce RTX 3090")
    assert unknown.tflops == 0.0 and "logging.peak_tflops" in unknown.source


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8"])
def test_every_precision_is_measured_against_the_bf16_peak(monkeypatch, precision):
    """Megatron-LM / torchtitan convention: an FP8 run's MFU uses the bf16 peak (989 on an H100 SXM, not the
    FP8 1979), so FP8's gain shows as a speed-up; the fp8 source says so."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    peak = resolve_peak(0.0, precision, device="cuda")
    assert peak.tflops == 989.0
    assert ("speed-up" in peak.source) == (precision == "fp8")


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
