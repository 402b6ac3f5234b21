"""Save every ``checkpoint.interval`` steps, at the end, and when a signal asked the run to stop."""
from __future__ import annotations

import yaml

from loopmoe.config import to_dict
from loopmoe.train.checkpoint import Checkpointer
from loopmoe.train.loop import Callback


class CheckpointEvery(Callback):
    priority = 10  # last: it saves the state every other callback has updated

    def __init__(self, checkpointer: Checkpointer):
        self.ckpt = checkpointer
        self._saved_step = -1

    def _save(self, trainer) -> None:
        s = trainer.state
        client = {"step": s.step, "consumed_samples": s.consumed_samples, "config": to_dict(trainer.cfg)}
        self.ckpt.save(trainer.engine, s.step, client, config_yaml=yaml.safe_dump(to_dict(trainer.cfg), sort_keys=False))
        self._saved_step = s.step

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.state.step % trainer.cfg.checkpoint.interval == 0 or trainer.state.stop_requested:
            self._save(trainer)

    def on_train_end(self, trainer) -> None:
        if self._saved_step != trainer.state.step:
            self._save(trainer)
