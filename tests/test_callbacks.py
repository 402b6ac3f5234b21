"""The loop's callback contract: callbacks run by priority whatever the list order, a metric recorded by
one callback reaches the ones after it in the same step, and ``pre_optim_step`` runs once per step after
the backward of the last micro-batch and before the optimizer step (the data-parallel step of
engine.py, on a real tiny model; the engine stand-in only does what DeepSpeed's would on one process)."""
from __future__ import annotations

import torch

from loopmoe.config import load_config
from loopmoe.model import LoopMoEModel
from loopmoe.train.loop import Callback, Trainer


class OneProcessEngine:
    """What the loop uses of a DeepSpeed engine, for one process: forward, backward, step at the
    accumulation boundary (SGD), grad norm, lr."""

    def __init__(self, model, grad_accum: int, events: list):
        self.module, self.grad_accum, self.events, self.micro = model, grad_accum, events, 0
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def __call__(self, *a, **kw):
        return self.module(*a, **kw)

    def backward(self, loss):
        loss.backward()
        self.events.append("backward")

    def step(self):
        self.micro += 1
        if self.micro % self.grad_accum == 0:
            self.opt.step()
            self.opt.zero_grad()
            self.events.append("optimizer")

    def train(self):
        self.module.train()

    def get_global_grad_norm(self):
        return None

    def get_lr(self):
        return [0.1]


def _setup(steps=2, grad_accum=2):
    cfg = load_config("configs/tiny_loopmoe.yaml", [
        "model.linear_backend=torch", "model.vocab_size=64", "model.d_model=32", "model.n_heads=2",
        "model.n_kv_heads=1", "model.head_dim=16", "model.n_experts=4", "model.expert_hidden=16",
        "model.adaln_rank=4", "data.seq_len=8", "train.micro_batch=2", f"train.grad_accum={grad_accum}",
        f"train.steps={steps}", "train.exit_interval=0"])
    torch.manual_seed(0)
    model = LoopMoEModel(cfg.model)
    g = torch.Generator().manual_seed(1)

    def batches():
        while True:
            tok = torch.randint(0, 64, (2, 9), generator=g)
            yield {"tokens": tok[:, :-1], "labels": tok[:, 1:], "loss_mask": torch.ones(2, 8)}

    return cfg, model, batches()


class Recorder(Callback):
    def __init__(self, name, priority, log, record=None):
        self.name, self.priority, self.log, self.record = name, priority, log, record

    def on_train_start(self, trainer):
        self.log.append((self.name, "start"))

    def pre_optim_step(self, trainer):
        self.log.append((self.name, "pre_optim"))

    def on_step_end(self, trainer, metrics):
        self.log.append((self.name, "step", sorted(k for k in metrics if k.startswith("val/"))))
        if self.record:
            trainer.record_metric(self.record, 1.5)


def test_callbacks_run_by_priority_and_share_recorded_metrics():
    cfg, model, batches = _setup(steps=1)
    log, events = [], []
    low = Recorder("logger", 20, log)
    high = Recorder("validation", 30, log, record="val/loss")
    trainer = Trainer(cfg, OneProcessEngine(model, 2, events), model, batches, [low, high])
    trainer.train()
    assert [e for e in log if e[1] == "start"] == [("validation", "start"), ("logger", "start")]
    steps = [e for e in log if e[1] == "step"]
    assert steps == [("validation", "step", []), ("logger", "step", ["val/loss"])]
    assert trainer.state.last["val/loss"] == 1.5


def test_pre_optim_step_once_per_step_after_the_last_backward():
    cfg, model, batches = _setup(steps=2, grad_accum=2)
    events = []

    class Grads(Callback):
        def pre_optim_step(self, trainer):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            events.append(("pre_optim", len(grads) > 0))

    Trainer(cfg, OneProcessEngine(model, 2, events), model, batches, [Grads()]).train()
    assert events == ["backward", "backward", ("pre_optim", True), "optimizer"] * 2
