"""Held-out loss every ``train.eval_interval`` steps: LM loss at every loop exit, expert-load imbalance
and routing divergence per loop layer. Adds ``val/...`` entries to the step's metrics."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from loopmoe.model.core import masked_ce
from loopmoe.model.routing_metrics import divergence_stats, load_imbalance
from loopmoe.train.loop import Callback


@torch.no_grad()
def evaluate(model, batches: Iterator[dict], n_batches: int) -> dict[str, float]:
    cfg = model.cfg
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    for _ in range(n_batches):
        b = next(batches)
        out = model(b["tokens"], return_routing=cfg.ffn == "moe", exit_logits=cfg.is_looped)
        sums["loss"] += masked_ce(out.logits, b["labels"], b["loss_mask"]).item()
        for k, lg in enumerate(out.exit_logits or [], start=1):
            sums[f"loss_exit{k}"] += masked_ce(lg, b["labels"], b["loss_mask"]).item()
        by_layer = defaultdict(dict)
        for r in out.routing or []:
            by_layer[r.layer][r.iteration] = r
        for layer, its in by_layer.items():
            sums[f"imbalance_l{layer}"] += max(load_imbalance(r.load) for r in its.values())
            if len(its) > 1:  # a loop layer: compare pass 1 with pass 2 (and the last)
                st = divergence_stats(its[0].topk, its[1].topk, cfg.n_experts)
                for key in ("divergence", "identical", "disjoint", "jaccard"):
                    sums[f"{key}_l{layer}"] += st[key]
    if was_training:
        model.train()
    names = sorted(sums)
    vals = torch.tensor([sums[n] / n_batches for n in names], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        vals = vals.to("cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(vals)
        vals = vals.cpu() / dist.get_world_size()
    return dict(zip(names, vals.tolist()))


class Validate(Callback):
    priority = 30  # before the metrics logger, which reports the val/... metrics it records
    def __init__(self, make_batches: Callable[[], Iterator[dict]]):
        self.make_batches = make_batches  # a fresh iterator each time: the same held-out batches every eval

    def _run(self, trainer, metrics: dict) -> None:
        res = evaluate(trainer.model, self.make_batches(), trainer.cfg.train.eval_iters)
        for k, v in res.items():
            trainer.record_metric(f"val/{k}", v)

    def on_step_end(self, trainer, metrics) -> None:
        if trainer.state.step % trainer.cfg.train.eval_interval == 0 or trainer.state.step == trainer.cfg.train.steps:
            self._run(trainer, metrics)
