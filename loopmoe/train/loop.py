"""The training loop: small on purpose. Logging, validation, checkpoints and signals are callbacks."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the run stops and the last good checkpoint is kept."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    consumed_samples: int = 0  # global samples consumed: the data position a resume starts from
    stop_requested: bool = False  # set by a signal; the loop checkpoints and stops at the step's end
    last: dict[str, float] = field(default_factory=dict)  # the last step's metrics


class Callback:
    """Hooks beside the loop. ``trainer`` gives access to cfg, engine, model, state."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...
    def on_train_end(self, trainer: "Trainer") -> None: ...


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Raise TrainingDiverged on every rank if the loss is not finite on any rank (collective)."""
    value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        bad = bad.to(dev)
        dist.all_reduce(bad)
    if bad.item() > 0:  # before the optimizer step: no NaN reaches the weights or the optimizer state
        raise TrainingDiverged(f"loss is {value} at step {step}; stopping. The last good checkpoint is "
                               "kept: lower optim.lr or raise optim.warmup_steps and resume.")


class Trainer:
    """``layout`` (loopmoe.parallel.layout.Layout) None = one process. Under PP, ``stage`` is this rank's
    PipelineStage (the engine's module) and ``model`` what validation calls (PipelineEvalModel)."""

    def __init__(self, cfg, engine, model, train_batches: Iterator[dict[str, torch.Tensor]],
                 callbacks: list[Callback], state: TrainState | None = None, dp_size: int = 1,
                 layout=None, stage=None):
        self.cfg, self.engine, self.model = cfg, engine, model
        self.batches = train_batches
        self.callbacks = callbacks
        self.state = state or TrainState()
        self.layout, self.stage = layout, stage
        self.dp_size = layout.dp if layout is not None else dp_size
        self.global_batch = cfg.train.micro_batch * cfg.train.grad_accum * self.dp_size
        self.before_optimizer_step = None  # called once per step after the gradient reduction (tests)

    def train_step(self) -> dict[str, float]:
        from loopmoe.parallel.parallelize import backward_loss

        t0 = time.perf_counter()
        if self.stage is not None:  # PP: megatron's schedule + DeepSpeed's reduction and step
            from loopmoe.train.engine import pipeline_step

            sums = pipeline_step(self.engine, self.stage, self.batches, self.cfg, self.state.step + 1,
                                 self.before_optimizer_step)
        else:
            # loss, lm_loss, lb_loss, z_loss summed over micro-batches, on the loss's device: one host
            # read per step (the finiteness check of the sum), not one per micro-batch
            sums = torch.zeros(4)
            for i in range(self.cfg.train.grad_accum):
                batch = next(self.batches)
                out = self.engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
                sums = sums.to(out.loss.device) + torch.stack([out.loss.detach(), out.lm_loss.detach(),
                                                               out.lb_loss.detach(), out.z_loss.detach()]).float()
                if i == self.cfg.train.grad_accum - 1:  # before the last backward and the optimizer step
                    check_finite(sums[0], self.state.step + 1)  # non-finite iff some micro-batch's loss is
                self.engine.backward(backward_loss(out, self.layout) if self.layout is not None else out.loss)
                if i == self.cfg.train.grad_accum - 1 and self.before_optimizer_step is not None:
                    self.before_optimizer_step()
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            sums = sums.cpu()
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
            self.state.last = metrics
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
