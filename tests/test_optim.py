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
