"""Shared pieces of the multi-process tests (tests/test_parallel.py, tests/test_reshard.py); no tests here.

``run_layout`` trains a tiny LoopMoE (fp32, same seed) under one TP/PP/EP/DP/ZeRO layout with the real
code path (build_model -> parallelize -> build_engine -> Trainer.train_step, Checkpointer) on in-memory
micro-batches that every layout splits the way ResumableBatchSampler does: step g is the micro-batches
g*N_MICRO .. g*N_MICRO + N_MICRO - 1, data-parallel rank r takes every DP-th of them, and a layout with
DP ranks accumulates N_MICRO / DP micro-batches per step. The global batch is therefore the same at
every layout, and so are the MoE load-balancing losses (computed per micro-batch).
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch

from loopmoe.config import Config, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, MICRO, N_MICRO = 5, 2, 2  # every step: N_MICRO micro-batches of MICRO sequences (global batch 4)


def launch(script: str, args: list[str], nproc: int, timeout: int = 600) -> str:
    """Run ``script`` as a worker: alone (a world of one) or under torchrun. Returns its stdout."""
    from tests.conftest import free_port

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, script, *args]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), script, *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:]
    return res.stdout


def model_cfg(R: int = 2, lb: bool = True) -> dict:
    return dict(vocab_size=96, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, n_prelude=2, n_loop=2, n_coda=2,
                loop_iters=R, max_seq_len=32, n_experts=4, top_k=2, expert_hidden=16, n_shared_experts=1,
                adaln_rank=8, linear_backend="megatron", lb_loss_coef=0.01 if lb else 0.0, z_loss_coef=0.001)


def make_config(tp, pp, ep, sp, zero, dp, R=2, lb=True, steps=STEPS, recompute="none") -> Config:
    cfg = Config()
    cfg.model = ModelConfig(**model_cfg(R, lb))
    cfg.data.seq_len = 16
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.train.steps = MICRO, N_MICRO // dp, steps
    cfg.train.ds_config, cfg.train.zero_stage, cfg.train.seed = os.path.join(ROOT, "ds_configs/zero1.json"), zero, 7
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip, cfg.optim.schedule = 1e-2, 2, 1.0, "cosine"
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.sequence_parallel = tp, pp, ep, sp
    cfg.train.recompute = recompute
    return cfg


def micro_batches(steps: int = STEPS) -> list[dict]:
    """All micro-batches of the run, in global order."""
    g = torch.Generator().manual_seed(11)
    toks = torch.randint(0, 96, (steps * N_MICRO, MICRO, 17), generator=g)
    return [{"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": torch.ones(MICRO, 16)}
            for t in toks]


def rank_batches(dp_rank: int, dp: int, steps: int, first_step: int = 0):
    """This DP rank's micro-batches from step ``first_step`` on (0-based), as the sampler hands them out."""
    mbs = micro_batches(steps)[first_step * N_MICRO:]
    yield from mbs[dp_rank::dp]


def perturb_adaln(model) -> None:
    """Non-zero IterAdaLN modulation, so the loop's iterations really differ."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in model.loop:
            for p in blk.adaln.mod.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


class CountReductions:
    """Count reduction collectives (calls, elements) per process group while active, by wrapping
    torch.distributed's functions (DeepSpeed's comm layer and our hooks call them by attribute)."""

    OPS = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter")

    def __init__(self):
        self.seen: dict[str, list[int]] = {}

    def __enter__(self):
        import inspect

        import torch.distributed as dist

        self.saved = {op: getattr(dist, op) for op in self.OPS}
        for op, fn in self.saved.items():
            def wrap(*args, _op=op, _fn=fn, **kw):
                a = inspect.signature(_fn).bind(*args, **kw).arguments
                group = a.get("group")
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else "world"
                t = a.get("input", a.get("input_list")) if _op.startswith("reduce_scatter") else a["tensor"]
                n = sum(x.numel() for x in t) if isinstance(t, (list, tuple)) else t.numel()
                c = self.seen.setdefault(f"{_op}@{ranks}", [0, 0])
                c[0] += 1
                c[1] += n
                return _fn(*args, **kw)
            setattr(dist, op, wrap)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for op, fn in self.saved.items():
            setattr(dist, op, fn)


def build_layout(cfg, world: int):
    """What pretrain_loopmoe.py builds for ``cfg`` at ``world`` ranks (the process group already exists):
    megatron's groups, the expert groups, the model (IterAdaLN perturbed off zero), parallelize, the engine.
    Returns (layout, module, engine)."""
    from megatron.core import parallel_state as ps

    from loopmoe.parallel.groups import create_expert_groups
    from loopmoe.parallel.layout import validate_layout
    from loopmoe.parallel.parallelize import parallelize
    from loopmoe.train.engine import build_engine
    from loopmoe.train.setup import build_model

    layout = validate_layout(cfg, world)
    ps.initialize_model_parallel(tensor_model_parallel_size=cfg.parallel.tp, pipeline_model_parallel_size=cfg.parallel.pp)
    if cfg.parallel.ep > 1:
        create_expert_groups(cfg.parallel.ep)
    model = build_model(cfg, layout)
    perturb_adaln(model)
    module = parallelize(model, cfg, layout)
    engine, _, _ = build_engine(module, cfg, layout)
    return layout, module, engine


def run_layout(name, tp, pp, ep, sp, zero, R=2, lb=True, steps=STEPS, count_step=None, save_at=None,
               save_dir=None, resume_from=None, recompute="none") -> dict:
    """Train under a layout (every rank calls it); returns {"loss": [per step run], "grads": {router and
    IterAdaLN gradients after the first step run, full tensors}, ...}. ``save_at``: save a checkpoint to
    ``save_dir`` after that step; ``resume_from``: a checkpoint directory to resume from first."""
    import torch.distributed as dist
    import yaml
    from deepspeed.utils import safe_get_full_grad
    from megatron.core import parallel_state as ps

    from loopmoe.config import to_dict
    from loopmoe.parallel.groups import destroy_expert_groups
    from loopmoe.parallel.pipeline import PipelineEvalModel
    from loopmoe.train.checkpoint import Checkpointer
    from loopmoe.train.loop import Callback, Trainer

    world = dist.get_world_size()
    dp = world // (tp * pp)
    cfg = make_config(tp, pp, ep, sp, zero, dp, R, lb, steps, recompute)
    layout, module, engine = build_layout(cfg, world)
    first = 0
    if resume_from is not None:
        first = Checkpointer(resume_from).load(engine)["step"]
    stage = module if pp > 1 else None
    trainer = Trainer(cfg, engine, PipelineEvalModel(stage) if stage else module,
                      rank_batches(ps.get_data_parallel_rank(), dp, steps, first), [], layout=layout, stage=stage)
    trainer.state.step = first
    grads = {}

    def capture():
        for n, p in module.named_parameters():
            if ".ffn.router." in n or "adaln" in n or "iter_embed" in n:
                grads[n] = safe_get_full_grad(p).detach().flatten().tolist()

    losses, norms, counter = [], [], None

    class CaptureFirstStep(Callback):  # the gradients of step 1, reduced, before the optimizer step
        def pre_optim_step(self, trainer):
            if not losses:
                capture()

    trainer.callbacks.append(CaptureFirstStep())
    while trainer.state.step < steps:
        if trainer.state.step + 1 == count_step:
            with CountReductions() as counter:
                m = trainer.train_step()
        else:
            m = trainer.train_step()
        trainer.state.step += 1
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
        if trainer.state.step == save_at:
            client = {"step": trainer.state.step, "consumed_samples": trainer.state.step * MICRO * N_MICRO}
            Checkpointer(save_dir).save(engine, trainer.state.step, client, yaml.safe_dump(to_dict(cfg)))
    everyone = [None] * world
    dist.all_gather_object(everyone, grads)
    out = {"loss": losses, "grad_norm": norms, "grads": {k: v for g in everyone for k, v in g.items()}}
    if counter is not None:
        out["counts"], out["n_params"] = counter.seen, sum(p.numel() for p in module.parameters())
    del trainer, engine
    module = None  # the last reference to the model: it goes before its expert groups do
    destroy_expert_groups()
    ps.destroy_model_parallel()
    print(f"rank {dist.get_rank()}: {name} losses {losses}", flush=True)
    return out


def init_worker() -> None:
    import torch.distributed as dist

    from loopmoe.parallel import megatron_cpu_adapter

    dist.init_process_group("gloo")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    megatron_cpu_adapter.install()
