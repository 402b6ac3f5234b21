"""Schedules and weight-decay groups."""
import math

import torch

from loopmoe.config import OptimConfig
from loopmoe.train.optim import lr_at, wants_weight_decay


def test_cosine_warmup_then_decay_to_min():
    c = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, c) == 0.1 and lr_at(9, 100, c) == 1.0
    assert math.isclose(lr_at(55, 100, c), 0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert math.isclose(lr_at(100, 100, c), 0.1)
    assert all(lr_at(s, 100, c) >= lr_at(s + 1, 100, c) for s in range(10, 100))


def test_wsd_is_stable_then_sqrt_cooldown():
    c = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_steps=20)
    assert all(lr_at(s, 100, c) == 1.0 for s in range(10, 80))
    assert math.isclose(lr_at(84, 100, c), 1 - math.sqrt(5 / 20))
    assert math.isclose(lr_at(99, 100, c), 0.0)


def test_no_decay_on_norms_biases_embeddings_adaln():
    p2, p1 = torch.zeros(2, 2), torch.zeros(2)
    assert wants_weight_decay("prelude.0.attn.qkv.weight", p2)
    assert wants_weight_decay("loop.0.ffn.experts.w_in", torch.zeros(2, 2, 2))
    for name, p in [("prelude.0.attn_norm.weight", p1), ("embed.weight", p2), ("head.bias", p1),
                    ("loop.0.adaln.out.weight", p2), ("iter_embed.mlp.0.weight", p2), ("norm.weight", p1)]:
        assert not wants_weight_decay(name, p), name


def _tiny_looped():
    from loopmoe.config import ModelConfig
    from loopmoe.model import LoopMoEModel

    torch.manual_seed(0)
    return LoopMoEModel(ModelConfig(vocab_size=61, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, n_prelude=1,
                                    n_loop=1, n_coda=1, loop_iters=2, max_seq_len=16, n_experts=4, top_k=2,
                                    expert_hidden=8, adaln_rank=4, linear_backend="torch"))


def test_adaln_group_keeps_its_lr_ratio_through_the_schedule_and_decays_matrices_only():
    from loopmoe.train.optim import build_optimizer, build_scheduler, is_adaln

    model = _tiny_looped()
    names = {id(p): n for n, p in model.named_parameters()}
    plain = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=2))
    assert sorted(g["name"] for g in plain.param_groups) == ["decay", "no_decay"]  # default: the usual two

    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, adaln_lr_scale=0.25, adaln_weight_decay=0.05)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    by = {g["name"]: g for g in opt.param_groups}
    ada = [names[id(p)] for g in ("adaln", "adaln_no_decay") for p in by[g]["params"]]
    want = [n for n, _ in model.named_parameters() if is_adaln(n)]
    assert sorted(ada) == sorted(want) and any(n.startswith("iter_embed.") for n in ada)
    assert not any(is_adaln(names[id(p)]) for g in ("decay", "no_decay") for p in by[g]["params"])
    assert by["adaln"]["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in by["adaln"]["params"])
    assert by["adaln_no_decay"]["weight_decay"] == 0.0
    for _ in range(6):
        opt.step()
        sched.step()
        assert math.isclose(by["adaln"]["lr"], 0.25 * by["decay"]["lr"], rel_tol=1e-12)
        assert math.isclose(by["decay"]["lr"], lr_at(sched.last_epoch, 10, cfg), rel_tol=1e-12)


def test_small_adaln_init_is_the_unit_init_scaled_down():
    from loopmoe.config import ModelConfig
    from loopmoe.model import LoopMoEModel

    kw = dict(vocab_size=61, d_model=16, n_heads=2, n_kv_heads=1, head_dim=8, n_prelude=1, n_loop=1, n_coda=1,
              loop_iters=2, max_seq_len=16, n_experts=4, top_k=2, expert_hidden=8, adaln_rank=4,
              linear_backend="torch")
    models = {}
    for init in ("unit", "small"):
        torch.manual_seed(0)
        models[init] = dict(LoopMoEModel(ModelConfig(**kw, adaln_init=init)).named_parameters())
    for n, p in models["unit"].items():
        q = models["small"][n]
        if n in ("loop.0.adaln.token.weight", "iter_embed.fc1.weight", "iter_embed.fc2.weight"):
            torch.testing.assert_close(q, p * (0.02 / p.shape[1] ** -0.5))  # the same draws, std 0.02
        else:
            torch.testing.assert_close(q, p, rtol=0, atol=0)  # nothing else changes
