"""Console line, JSONL file, TensorBoard scalars and a progress bar (rank 0 only).

Throughput: tokens/s over the logging interval; TFLOP/s = training FLOPs per token (3 x forward, the
convention in loopmoe/flops.py) x tokens/s per device; MFU = that / the peak per device, the chip's dense
bf16 peak at every precision (loopmoe/train/peak.py): an FP8 run's MFU over its bf16 twin's is FP8's speed-up.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from loopmoe.train.loop import Callback

log = logging.getLogger(__name__)


def default_peak_tflops(precision: str, stated: float = 0.0) -> float:
    """The MFU peak per device (loopmoe/train/peak.py): stated, the GPU's dense bf16 peak by name (for every
    precision, fp8 included: FP8's gain is a speed-up, not a smaller MFU), or measured on the CPU; logged."""
    from loopmoe.train.peak import resolve_peak

    peak = resolve_peak(stated, precision)
    if peak.tflops > 0:
        log.info("MFU peak: %.4g TFLOP/s per device (%s)", peak.tflops, peak.source)
    else:
        log.warning("MFU not reported: %s", peak.source)
    return peak.tflops


def scalars(rec: dict) -> dict[str, float]:
    """A metrics record as the scalar sinks name it: numbers only, no ``step``, bare names under ``train/``."""
    return {(k if "/" in k else f"train/{k}"): v for k, v in rec.items()
            if k != "step" and isinstance(v, (int, float))}


class TensorBoardSink:
    """Scalars of each record under RUN_DIR/tensorboard (names without a section go under ``train/``)."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, run_dir: str) -> "TensorBoardSink | None":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: TensorBoard scalars are off (pip install tensorboard)")
            return None
        return cls(SummaryWriter(os.path.join(run_dir, "tensorboard")))

    def log(self, rec: dict, step: int) -> None:
        for name, value in scalars(rec).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def memory_record() -> dict[str, float]:
    """GPU: the peaks of PyTorch's allocations (mem_gib) and of the caching allocator's segments
    (mem_reserved_gib; their gap is the fragmentation the estimator's --fragmentation margin covers, see
    docs/memory.md). CPU: the process's resident set (mem_gib), no reserved figure."""
    if torch.cuda.is_available():
        return {"mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
    import psutil

    return {"mem_gib": psutil.Process().memory_info().rss / 2**30}


def memory_text(rec: dict) -> str:
    """The console's memory field: 'mem 30.12 / 33.40 GiB (alloc / reserved)' on a GPU, 'mem 1.20 GiB' else."""
    if "mem_reserved_gib" in rec:
        return f"mem {rec['mem_gib']:.2f} / {rec['mem_reserved_gib']:.2f} GiB (alloc / reserved)"
    return f"mem {rec['mem_gib']:.2f} GiB"


def eta_text(seconds: float) -> str:
    """'1h05m', '4m10s', '12s': the time left at the current pace, for piped logs (no progress bar there)."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class MetricsLogger(Callback):
    priority = 20  # after the callbacks that record metrics (validation), before the checkpoint
    def __init__(self, run_dir: str, train_flops_per_token: float, peak_tflops: float, tensorboard: bool,
                 progress_bar: bool, sinks: list | None = None):
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.n_devices = dist.get_world_size() if dist.is_initialized() else 1
        self.flops_per_token = train_flops_per_token
        self.peak = peak_tflops
        self.jsonl_path = os.path.join(run_dir, "metrics.jsonl")
        # scalar sinks beside metrics.jsonl, each with .log(record, step) and .close(): TensorBoard, W&B
        tb = TensorBoardSink.open(run_dir) if self.is_main and tensorboard else None
        self.sinks = ([tb] if tb is not None else []) + list(sinks or [])
        self.bar = None
        self.want_bar = progress_bar and self.is_main and sys.stderr.isatty()
        self._interval_tokens = 0.0
        self._interval_steps = 0  # steps since the last line: time per step and the ETA come from them
        self._interval_start = time.perf_counter()

    def on_train_start(self, trainer) -> None:
        if self.want_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.cfg.train.steps, initial=trainer.state.step, desc="train", unit="step")
        self._interval_start = time.perf_counter()

    def on_step_end(self, trainer, metrics) -> None:
        self._interval_tokens += metrics["tokens"]
        self._interval_steps += 1
        step = trainer.state.step
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        # step 1 always: the first line (and the LR curve's first point) comes at once, not log_interval later
        is_log_step = step % trainer.cfg.train.log_interval == 0 or step in (1, trainer.cfg.train.steps)
        has_val = any(k.startswith("val/") for k in metrics)
        if not (is_log_step or has_val):
            return
        elapsed = time.perf_counter() - self._interval_start
        tok_s = self._interval_tokens / max(elapsed, 1e-9)
        step_s = elapsed / max(self._interval_steps, 1)  # wall time per step over the interval (as Megatron's elapsed time per iteration)
        self._interval_tokens, self._interval_steps, self._interval_start = 0.0, 0, time.perf_counter()
        tflops = self.flops_per_token * tok_s / self.n_devices / 1e12
        rec = {"step": step, **{k: v for k, v in metrics.items() if k != "tokens"}, "tokens_per_s": tok_s,
               "s_per_step": step_s, "eta_s": step_s * (trainer.cfg.train.steps - step),
               "tflops_per_device": tflops, "consumed_samples": trainer.state.consumed_samples}
        if self.peak > 0:
            rec["mfu"] = tflops / self.peak
            rec["peak_tflops"] = self.peak  # stated, by GPU name, or measured on the CPU (loopmoe/train/peak.py)
        rec.update(memory_record())
        if not self.is_main:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for sink in self.sinks:
            sink.log(rec, step)
        mc = trainer.cfg.model  # loss = lm + lb_loss_coef * aux + z_loss_coef * z: the line shows each term's weight
        line = (f"step {step:>6}/{trainer.cfg.train.steps} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
                f"aux {rec['lb_loss']:.3f}*{mc.lb_loss_coef:g} z {rec['z_loss']:.3f}*{mc.z_loss_coef:g} | "
                f"lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | {step_s * 1e3:,.0f} ms/step, ETA {eta_text(rec['eta_s'])} | "
                f"{tok_s:,.0f} tok/s | {tflops:.3g} TFLOP/s"
                + (f" | MFU {rec['mfu']:.1%} (peak {self.peak:.3g})" if "mfu" in rec else " | MFU n/a (peak unknown)")
                + f" | {memory_text(rec)}")
        if has_val:
            exits = " ".join(f"exit{k[len('val/loss_exit'):]} {v:.4f}" for k, v in rec.items() if k.startswith("val/loss_exit"))
            line += f"\n  validation: loss {rec['val/loss']:.4f}" + (f" | per exit: {exits}" if exits else "")
            div = [f"L{k.split('_l')[-1]} {v:.2f}" for k, v in rec.items() if k.startswith("val/divergence_l")]
            if div:
                line += " | routing divergence " + ", ".join(div)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
