"""Incremental decoding with the KV cache equals recomputing the whole sequence."""
import pytest
import torch

from loopmoe.config import load_config
from loopmoe.generate import generate, sample_next
from loopmoe.model import LoopMoEModel
from loopmoe.model.attention import KVCache
from tests.conftest import ROOT


def tiny(**over):
    cfg = load_config(f"{ROOT}/configs/tiny_loopmoe.yaml").model
    cfg.linear_backend = "torch"
    cfg.vocab_size = 256
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = LoopMoEModel(cfg).eval()
    with torch.no_grad():  # move IterAdaLN off its zero init so iterations really differ
        for name, p in model.named_parameters():
            if ".adaln.mod" in name:
                p.normal_(0, 0.05)
    return model


CASES = {"loopmoe": ({}, None), "loopmoe-exit1": ({}, 1), "vanilla": ({"n_loop": 0, "n_prelude": 3}, None),
         "dense-loop": ({"ffn": "dense"}, None), "dense-loop-exit1": ({"ffn": "dense"}, 1),
         "reinjection": ({"input_reinjection": True}, None)}


@pytest.mark.parametrize("over, exit_after", list(CASES.values()), ids=list(CASES))
def test_cached_logits_equal_full_forward(over, exit_after):
    model = tiny(**over)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(tokens, exit_after=exit_after).logits  # [2, 12, V]
        cache = KVCache()
        parts = [model(tokens[:, :5], cache=cache, exit_after=exit_after).logits]  # prefill 5
        for t in range(5, 12):  # then one token at a time
            parts.append(model(tokens[:, t:t + 1], cache=cache, exit_after=exit_after).logits)
        parts_multi = []
        cache2 = KVCache()
        parts_multi.append(model(tokens[:, :4], cache=cache2, exit_after=exit_after).logits)
        parts_multi.append(model(tokens[:, 4:9], cache=cache2, exit_after=exit_after).logits)  # several new at once
        parts_multi.append(model(tokens[:, 9:], cache=cache2, exit_after=exit_after).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(parts_multi, dim=1), full, atol=1e-5, rtol=1e-5)
    n_loop_entries = sum(1 for (layer, it) in cache.layers if it > 0)
    R = exit_after or model.n_iters
    assert len(cache.layers) == model.cfg.n_unique_layers + (R - 1) * model.cfg.n_loop
    assert n_loop_entries == (R - 1) * model.cfg.n_loop


def test_greedy_generation_with_cache_equals_without():
    model = tiny()
    prompt = torch.randint(0, 256, (1, 6))
    a = generate(model, prompt, 20, use_cache=True)
    b = generate(model, prompt, 20, use_cache=False)
    assert torch.equal(a, b) and a.shape == (1, 26)


def test_sampling_is_seeded_and_top_k_restricts():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    g = [sample_next(logits, 1.0, 2, torch.Generator().manual_seed(s)).item() for s in range(50)]
    assert set(g) <= {1, 2} and len(set(g)) == 2
    assert sample_next(logits, 0.0, 0, None).item() == 1
    model = tiny()
    prompt = torch.randint(0, 256, (1, 4))
    assert torch.equal(generate(model, prompt, 10, 1.0, 5, seed=3), generate(model, prompt, 10, 1.0, 5, seed=3))
