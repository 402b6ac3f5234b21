"""Inside the training package, the exported model's ``.loopmoe_core`` is loopmoe/model/core.py: hf.py copies
that file under this name into every remote-code export, so modeling_loopmoe.py imports it the same way
in both places. This file is never exported."""
from loopmoe.model.core import *  # noqa: F401,F403
