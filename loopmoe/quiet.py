"""A quiet, honest start for the entry points (pretrain_loopmoe.py, python -m loopmoe.generate, ...).

megatron-core warns "Transformer Engine and Apex are not installed" once per module that imports them
(four blocks before the first step) and DeepSpeed logs that it fell back to its CPU accelerator. Each
entry point calls ``quiet_start()`` BEFORE it imports megatron-core or DeepSpeed; it

* ignores only those named, known messages, matched by text AND by the library module that issues them
  (``KNOWN_WARNINGS``), so any other warning from any library still shows;
* drops the one DeepSpeed log record (a ``logging.Filter`` on its "DeepSpeed" logger; every other
  DeepSpeed record still goes through);
* says instead, once per process on rank 0, one line per missing optional accelerator library and what
  its absence means for this run (``missing_libraries``).

Nothing is muted globally: no ``simplefilter("ignore")``, no logger level changed.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

# (message regex, category, issuing-module regex). Each is a fallback notice about a missing optional
# library that ``missing_libraries`` reports in one line instead, or a deprecation megatron-core raises
# about its own default (cuda_graph_scope="full": we use no CUDA graphs).
KNOWN_WARNINGS: list[tuple[str, type[Warning], str]] = [
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core\."),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron\.core\."),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
]

# DeepSpeed's accelerator auto-detection record; replaced by the "no CUDA GPU" line below.
DEEPSPEED_CPU_RECORD = "Setting accelerator to CPU"

# import name, display name, what its absence means for a LoopMoE run.
OPTIONAL_LIBRARIES: list[tuple[str, str, str]] = [
    ("transformer_engine", "Transformer Engine",
     "no FP8 through Transformer Engine (train.fp8_backend=te) and no model.linear_backend=te; the "
     "megatron/torch linears are used (pip install 'loopmoe[fp8]' on a Hopper GPU; FP8 through torchao: "
     "train.fp8_backend=torchao)"),
    ("apex", "NVIDIA Apex",
     "megatron-core uses its torch fallbacks for fused multi-tensor ops; LoopMoE does not need Apex "
     "(its optimizer is torch AdamW under DeepSpeed, its norms and gradient clipping are its own)"),
]

_done = False


class _DropRecord(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install_filters() -> None:
    """The targeted warning filters and the DeepSpeed log filter (idempotent)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # logging.getLogger returns the same object DeepSpeed configures at import (it adds handlers and a
    # level, and keeps filters), so the filter can be installed before DeepSpeed is imported.
    ds = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropRecord) for f in ds.filters):
        ds.addFilter(_DropRecord(DEEPSPEED_CPU_RECORD))


def missing_libraries() -> list[str]:
    """One line per optional accelerator library that is not importable here."""
    return [f"{name} not installed: {meaning}" for mod, name, meaning in OPTIONAL_LIBRARIES
            if importlib.util.find_spec(mod) is None]


def _env_rank() -> int:
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def quiet_start(report: bool = True, device_line: bool = False, stream=None) -> None:
    """Install the filters, then (``report``, rank 0, once per process) print the missing-library lines.

    ``device_line``: also say when no CUDA GPU is visible (the training entry point, where DeepSpeed's own
    line about it is dropped)."""
    global _done
    install_filters()
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        report = False  # the help text alone
    if not report or _done or _env_rank() != 0:
        return
    _done = True
    out = stream or sys.stderr
    for line in missing_libraries():
        print(f"loopmoe: {line}", file=out)
    if device_line:
        import torch

        if not torch.cuda.is_available():
            print("loopmoe: no CUDA GPU visible to torch: this run uses the CPU (DeepSpeed's CPU accelerator, "
                  "gloo); check CUDA_VISIBLE_DEVICES and the driver if a GPU was expected", file=out)
    out.flush()
