"""Helpers shared by the analysis and experiment reports."""
from __future__ import annotations

import json
import math
import os


def jsonable(o):
    """JSON-safe copy: inf/nan floats as strings, tuple keys as strings."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, float) and (math.isinf(o) or math.isnan(o)):
        return str(o)
    return o


def threshold_label(t, spec: str = ".4g") -> str:
    """An exit threshold for a table or a plot: None -> "none", inf -> "inf", else ``format(t, spec)``."""
    if t is None:
        return "none"
    if t == math.inf:
        return "inf"
    return format(t, spec)


def write_report(out: str, stem: str, data: dict, heading: str, markdown: str) -> None:
    """``out/stem.json`` (jsonable ``data``) and ``out/stem.md`` (``# heading`` + ``markdown``)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(jsonable(data), f, indent=1)
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write(f"# {heading}\n\n" + markdown + "\n")
