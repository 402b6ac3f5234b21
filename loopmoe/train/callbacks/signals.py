"""SIGINT (Ctrl-C) / SIGTERM / SIGUSR1 -> checkpoint at the end of the current step, then stop.

Slurm sends SIGUSR1 ahead of the time limit (``--signal=B:USR1@120``) and SIGTERM on preemption; a user
presses Ctrl-C. The handler only sets a flag; the loop all-reduces it so every rank stops at the same step,
the checkpoint callback saves that step, and pretrain_loopmoe.py prints "stopped at step N; rerun the
same command to resume" (no traceback). What reaches a rank on Ctrl-C, per launcher:

* ``python``: the terminal sends SIGINT to the foreground process group, i.e. the trainer.
* ``torchrun``: its workers run in their own sessions (torch 2.13 ``SubprocessHandler``,
  ``start_new_session=True``): the terminal's SIGINT reaches torchrun only, which sends SIGINT once to each
  worker and SIGKILLs them ``--shutdown-timeout`` (default 30) seconds later; a save longer than that
  needs a larger ``--shutdown-timeout``. torchrun itself then prints its own ``SignalException``.
* ``srun``: one Ctrl-C prints the tasks' state, two within a second send SIGINT to the tasks (then
  SIGTERM, SIGKILL after ``KillWait``); ``srun --quit-on-interrupt`` forwards the first.
* ``mpirun``: forwards SIGINT/SIGTERM to the ranks before killing them.

A second SIGINT exits at once (exit code 130, one line, no traceback, no checkpoint): a save in progress
is left under ``checkpoint.dir/.tmp/``, which is never read, and ``latest`` still names the last complete
step. A SIGINT during start-up (before the first step: imports, model build, checkpoint load) has nothing
to save: it raises ``Interrupted`` (a BaseException, so no library's ``except Exception`` swallows it) and
pretrain_loopmoe.py exits 130 with one line. SIGTERM/SIGUSR1 during start-up are remembered and honoured
after the first step (Slurm's warning must not kill the job before it can checkpoint). A SIGINT that
arrives ignored (``nohup``, a shell's ``&``) stays ignored.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

from loopmoe.train.loop import Callback

log = logging.getLogger(__name__)


SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_early: list[int] = []  # SIGTERM/SIGUSR1 that arrived during start-up, before the loop's handler existed
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)


class Interrupted(BaseException):
    """Ctrl-C during start-up: nothing was trained yet, so nothing is saved."""


def exit_now(why: str) -> None:
    """Leave at once, without unwinding: no traceback, no atexit handler or library finaliser that could
    block on a peer. Files half written are only under checkpoint.dir/.tmp/ (see Checkpointer.save)."""
    print(f"{why}; exiting now without a checkpoint (the last complete one is what `latest` names)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def _early_handler(signum, _frame) -> None:
    if signum == signal.SIGINT:
        raise Interrupted()
    _early.append(signum)


def _ignored(s: int) -> bool:
    """SIGINT ignored by whoever started us (``nohup``, a shell's background job ``&``): it stays ignored,
    as POSIX asks of a program that handles it."""
    return s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN


def catch_early_signals() -> None:
    """Call first thing in main(): a SIGUSR1/SIGTERM during start-up (imports, model build, index build,
    checkpoint load) is remembered instead of killing the process, and honoured at the first step; a
    SIGINT raises Interrupted (main() turns it into one line and exit code 130)."""
    for s in SIGNALS:
        if not _ignored(s):
            signal.signal(s, _early_handler)


class StopOnSignal(Callback):
    """The handler only notes the signal (``pending``); ``pre_optim_step`` (inside every step, at the same
    point on every rank, before the loop packs the stop flag into its all-reduce) hands it to the loop. A
    handler that set the loop's flag itself could fire after that all-reduce (the loop then overwrites it:
    the signal is lost on that rank) or during the callbacks (that rank alone would break out of the loop
    while its peers wait in the next step's collective)."""

    priority = 40  # first: its handlers are installed before anything else starts
    signals = SIGNALS

    def __init__(self) -> None:
        self.received: str | None = None  # the first signal's name (pretrain_loopmoe.py's exit code)
        self.pending = False  # a signal the loop has not been told of yet

    def on_train_start(self, trainer) -> None:
        if _early:  # before the first step's all-reduce: the loop's flag may be set directly
            log.warning("received %s during start-up: will checkpoint and stop after the first step",
                        signal.Signals(_early[0]).name)
            trainer.state.stop_requested = True
            self.received = signal.Signals(_early[0]).name

        def handler(signum, _frame):
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and self.received == "SIGINT":
                exit_now(f"received a second SIGINT during step {trainer.state.step + 1}")
            # Noted before the log call: a second Ctrl-C may land inside it (handlers run between bytecodes).
            self.received = "SIGINT" if signum == signal.SIGINT else (self.received or name)
            self.pending = True
            if signum == signal.SIGINT:
                log.warning("received SIGINT: will checkpoint at the end of the step under way (or the next) and "
                            "stop (Ctrl-C again: exit at once without saving)")
            else:
                log.warning("received %s: will checkpoint at the end of the step under way (or the next) and stop",
                            name)

        self._previous = {s: signal.signal(s, handler) for s in self.signals if not _ignored(s)}

    def pre_optim_step(self, trainer) -> None:
        if self.pending:  # the loop all-reduces this at the end of the step: every rank stops at the same one
            trainer.state.stop_requested = True

    def on_train_end(self, trainer) -> None:
        # The final save runs after this hook (the checkpoint callback is last): where start-up's handlers
        # were the previous ones, ours stay, so a Ctrl-C during that save still checkpoints / exits at once.
        # Elsewhere (a Trainer inside a test) the previous handlers come back.
        for s, h in self._previous.items():
            if h is not _early_handler:
                signal.signal(s, h)
