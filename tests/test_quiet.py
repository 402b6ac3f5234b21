"""loopmoe/quiet.py mutes only the named library notices it replaces, nothing else."""
from __future__ import annotations

import io
import logging
import warnings

from loopmoe import quiet


def _shown(message: str, module: str, category=UserWarning) -> bool:
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet.install_filters()  # inserted in front of "always": they decide first
        warnings.warn_explicit(message, category, "x.py", 1, module=module, registry={})
    return bool(seen)


def test_only_the_named_megatron_warnings_are_filtered():
    te = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."
    assert not _shown(te, "megatron.core.optimizer")
    assert not _shown("full scope is deprecated. Use empty cuda_graph_scope", "megatron.core.transformer.transformer_config")
    assert _shown(te, "loopmoe.train.engine")  # the same text from elsewhere still shows
    assert _shown("something else went wrong", "megatron.core.optimizer")  # other megatron warnings show
    assert _shown(te, "megatron.core.optimizer", DeprecationWarning)  # category is part of the match


def test_deepspeed_logger_drops_only_the_cpu_accelerator_record():
    quiet.install_filters()
    quiet.install_filters()  # idempotent: one filter
    ds = logging.getLogger("DeepSpeed")
    assert sum(isinstance(f, quiet._DropRecord) for f in ds.filters) == 1
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("ZeRO stage 3 needs more memory")
    finally:
        ds.removeHandler(handler)
    assert buf.getvalue() == "ZeRO stage 3 needs more memory\n"


def test_missing_libraries_one_line_each(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    lines = quiet.missing_libraries()
    assert [ln.split(" not installed:")[0] for ln in lines] == ["Transformer Engine", "NVIDIA Apex"]
    assert all(len(ln.split(": ", 1)[1]) > 20 for ln in lines)  # each says what it means for the run
