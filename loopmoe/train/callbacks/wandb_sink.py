"""Weights & Biases beside TensorBoard (rank 0): the same scalars, under the same names (train/..., val/...).

On when ``logging.wandb_project`` is set. The run id is kept in ``<run_dir>/wandb_run_id``, so a requeued
job (same run_dir, resumed from its checkpoint) continues the SAME W&B run (``id=..., resume="allow"``)
instead of starting a new one. ``WANDB_MODE=offline`` writes the run under ``<run_dir>/wandb/`` without a
network (``wandb sync`` uploads it later). wandb is optional: ``pip install 'loopmoe[wandb]'``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import string

from loopmoe.config import Config, ConfigError, to_dict
from loopmoe.train.callbacks.metrics import scalars

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


def check_wandb(cfg: Config) -> None:
    """At start-up, before heavy work: W&B asked for but not installed is a config error."""
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"logging.wandb_project={cfg.logging.wandb_project!r} but wandb is not installed: "
                          "pip install 'loopmoe[wandb]' (or leave logging.wandb_project empty)")


def run_id(run_dir: str) -> str:
    """The W&B run id of this run directory: read back after a requeue, else new (written atomically)."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            rid = f.read().strip()
        if rid:
            return rid
    rid = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id alphabet
    os.makedirs(run_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(rid + "\n")
    os.replace(path + ".tmp", path)
    return rid


class WandbSink:
    """A MetricsLogger sink: ``log(record, step)`` and ``close()``."""

    def __init__(self, cfg: Config):
        import wandb

        lg = cfg.logging
        rid = run_id(lg.run_dir)
        self.run = wandb.init(project=lg.wandb_project, entity=lg.wandb_entity or None,
                              name=lg.wandb_run_name or os.path.basename(os.path.normpath(lg.run_dir)),
                              id=rid, resume="allow", dir=lg.run_dir, config=to_dict(cfg))
        log.info("wandb: run %s (project %s, %s mode), files in %s", rid, lg.wandb_project,
                 self.run.settings.mode, self.run.dir)

    def log(self, rec: dict, step: int) -> None:
        self.run.log(scalars(rec), step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_sinks(cfg: Config, is_main: bool) -> list:
    """[WandbSink] on rank 0 when logging.wandb_project is set, else []."""
    return [WandbSink(cfg)] if cfg.logging.wandb_project and is_main else []
