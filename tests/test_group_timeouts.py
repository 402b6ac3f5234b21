"""Every process group a training run makes times out at parallel.timeout_minutes.

Found by a fresh-clone run under load: rank 1 SIGSTOP'd while rank 0 was in ZeRO's gradient all-reduce
(on megatron's data-parallel group) held the job for more than 8 minutes with parallel.timeout_minutes=1.
torch's new_group and megatron's initialize_model_parallel default to 30 minutes; only the world group had
our time-out. The worker below builds what pretrain_loopmoe.py builds (init_distributed, the model,
parallelize, DeepSpeed's engine with ZeRO-1 and EP=2), trains one step, then reads the time-out of every
process group that exists, from torch's own registry.
"""
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)



def test_every_process_group_times_out_at_the_configured_minutes():
    from conftest import run_torchrun

    res = run_torchrun(__file__)
    assert res.stdout.count("GROUP TIMEOUTS OK") == 2, res.stdout[-3000:]


def worker() -> None:
    import torch
    import torch.distributed as dist

    from loopmoe.config import load_config
    from loopmoe.parallel.distributed import init_distributed, shutdown
    from loopmoe.parallel.layout import validate_layout
    from loopmoe.parallel.parallelize import parallelize
    from loopmoe.train.engine import build_engine, dp_step
    from loopmoe.train.setup import build_model
    from tests.test_train import SMALL

    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                      [*SMALL, "model.vocab_size=256", "parallel.ep=2", "parallel.timeout_minutes=1", "train.zero_stage=1"])
    layout = validate_layout(cfg, 2)
    init_distributed(1, 1, "gloo", cfg.parallel.timeout_minutes, ep=cfg.parallel.ep)
    engine, _, _ = build_engine(parallelize(build_model(cfg, layout), cfg, layout), cfg, layout)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1))  # (B, T+1)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(tokens[:, 1:].shape)}
    dp_step(engine, iter([batch] * cfg.train.grad_accum), cfg, layout, step=0)  # groups made lazily exist too
    groups = list(dist.distributed_c10d._world.pg_map)  # every ProcessGroup made in this process
    timeouts = {dist.distributed_c10d._world.pg_names[g]: g._get_backend(torch.device("cpu")).options._timeout
                for g in groups}
    wrong = {name: str(t) for name, t in timeouts.items() if t != datetime.timedelta(minutes=1)}
    assert len(groups) >= 5, f"only {len(groups)} groups: world, megatron's, DeepSpeed's expert groups expected"
    assert not wrong, f"rank {dist.get_rank()}: groups not at parallel.timeout_minutes=1: {wrong}"
    print(f"rank {dist.get_rank()}: {len(groups)} groups, all 1 min: GROUP TIMEOUTS OK", flush=True)
    del engine
    shutdown()


if __name__ == "__main__":
    worker()
