"""The routing metrics live in loopmoe/model/routing_metrics.py (validation during training uses them too,
and training sits below analysis); this name is kept for the analysis scripts and notebooks."""
from loopmoe.model.routing_metrics import *  # noqa: F401,F403
