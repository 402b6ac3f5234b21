"""The training loop: small on purpose. Logging, validation, checkpoints and signals are callbacks."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from loopmoe.train.engine import TrainingDiverged, check_finite, make_step  # noqa: F401  (re-exported)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed: the data position a resume starts from
    stop_requested: bool = False  # set by a signal; the loop checkpoints and stops at the step's end
    last: dict[str, float] = field(default_factory=dict)  # the last step's metrics


class Callback:
    """Hooks beside the loop. ``trainer`` gives access to cfg, engine, model, state. Callbacks run in
    descending ``priority`` (ties: the order given), whatever order the list has: producers of metrics
    (validation) above their consumers (the logger), the checkpoint last. A callback adds a metric to the
    current step with ``trainer.record_metric`` (OLMo-core's Callback.priority / Trainer.record_metric)."""

    priority: int = 0

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def pre_optim_step(self, trainer: "Trainer") -> None: ...  # gradients reduced, optimizer not stepped
    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


class Trainer:
    """``layout`` (loopmoe.parallel.layout.Layout) None = one process. Under PP, ``stage`` is this rank's
    PipelineStage (the engine's module) and ``model`` what validation calls (PipelineEvalModel)."""

    def __init__(self, cfg, engine, model, train_batches: Iterator[dict[str, torch.Tensor]],
                 callbacks: list[Callback], state: TrainState | None = None, dp_size: int = 1,
                 layout=None, stage=None):
        self.cfg, self.engine, self.model = cfg, engine, model
        self.batches = train_batches
        self.callbacks = sorted(callbacks, key=lambda cb: -cb.priority)  # stable: ties keep their order
        self.state = state or TrainState()
        self.layout, self.stage = layout, stage
        self.dp_size = layout.dp if layout is not None else dp_size
        self.global_batch = cfg.train.micro_batch * cfg.train.grad_accum * self.dp_size
        self.step_fn = make_step(engine, cfg, layout, stage)  # the step (engine.py): DP or pipeline
        self._metrics: dict[str, float] = {}

    def record_metric(self, name: str, value: float) -> None:
        """Add ``name`` to this step's metrics (what the callbacks of lower priority, e.g. the logger, see)."""
        self._metrics[name] = float(value)

    def _pre_optim_step(self) -> None:
        for cb in self.callbacks:
            cb.pre_optim_step(self)

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        sums = self.step_fn(self.batches, self.state.step + 1, self._pre_optim_step)  # [loss, lm, lb, z]
        self.model.update_router_biases()  # aux-loss-free balancing: after the optimizer step, once per step
        # One all-reduce carries the metrics and the stop flag (a signal may reach only some ranks).
        packed = torch.cat([sums / self.cfg.train.grad_accum, torch.tensor([float(self.state.stop_requested)])])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            packed = packed.to(dev)
            dist.all_reduce(packed)
            packed = packed.cpu()
            # every model replica's metrics appear on TP x DP ranks (lm on the last stage; aux per stage)
            pp = self.layout.pp if self.layout is not None else 1
            packed[:4] /= dist.get_world_size() // pp
        self.state.stop_requested = bool(packed[4] > 0)
        grad_norm = self.engine.get_global_grad_norm()
        return {"loss": packed[0].item(), "lm_loss": packed[1].item(), "lb_loss": packed[2].item(),
                "z_loss": packed[3].item(), "lr": self.engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "step_time": time.perf_counter() - t0,
                "tokens": float(self.global_batch * self.cfg.data.seq_len)}

    def train(self) -> TrainState:
        for cb in self.callbacks:
            cb.on_train_start(self)
        self.engine.train()
        while self.state.step < self.cfg.train.steps:
            metrics = self.train_step()
            self.state.step += 1
            self.state.consumed_samples += self.global_batch
            self.state.last = self._metrics = metrics  # record_metric adds to it
            exit_every = self.cfg.train.exit_interval
            if exit_every and self.state.step % exit_every == 0 and self.state.step < self.cfg.train.steps:
                self.state.stop_requested = True  # the checkpoint callback saves; the run ends cleanly
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
            if self.state.stop_requested:
                break
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state
