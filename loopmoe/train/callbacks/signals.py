"""SIGTERM / SIGUSR1 -> checkpoint at the end of the current step, then stop.

Slurm sends SIGUSR1 ahead of the time limit (``--signal=B:USR1@120``) and SIGTERM on preemption. The
handler only sets a flag; the loop all-reduces it so every rank stops at the same step.
"""
from __future__ import annotations

import logging
import signal

from loopmoe.train.loop import Callback

log = logging.getLogger(__name__)


SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []  # signals that arrived during start-up, before the loop's handler existed


def catch_early_signals() -> None:
    """Call first thing in main(): a SIGUSR1/SIGTERM during start-up (imports, model build, index build,
    checkpoint load) is remembered instead of killing the process, and honoured at the first step."""
    for s in SIGNALS:
        signal.signal(s, lambda signum, _frame: _early.append(signum))


class StopOnSignal(Callback):
    priority = 40  # first: its handlers are installed before anything else starts
    signals = SIGNALS

    def on_train_start(self, trainer) -> None:
        if _early:
            log.warning("received %s during start-up: will checkpoint and stop after the first step",
                        signal.Signals(_early[0]).name)
            trainer.state.stop_requested = True

        def handler(signum, _frame):
            log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
            trainer.state.stop_requested = True

        self._previous = {s: signal.signal(s, handler) for s in self.signals}

    def on_train_end(self, trainer) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
