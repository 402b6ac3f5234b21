"""IterAdaLN: identity at initialisation, gradients at step 0, symmetry breaking after training."""
from __future__ import annotations

import pytest
import torch

from loopmoe.config import ModelConfig
from loopmoe.model import LoopMoEModel
from loopmoe.model.iter_adaln import IterAdaLN, sinusoid


def cfg_(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, n_prelude=1, n_loop=2,
                n_coda=1, loop_iters=2, max_seq_len=32, n_experts=4, top_k=2, expert_hidden=16,
                n_shared_experts=1, adaln_rank=8, linear_backend="torch")
    base.update(kw)
    return ModelConfig(**base)


def build(seed=0, **kw) -> LoopMoEModel:
    torch.manual_seed(seed)
    return LoopMoEModel(cfg_(**kw))


def tokens(b=2, s=12, seed=1):
    return torch.randint(0, 97, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["both", "iter", "token"])
def test_at_init_every_iteration_is_the_plain_shared_layer(mode):
    on, off = build(adaln=mode), build(adaln="none")
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing and all(".adaln." in k or k.startswith("iter_embed.") for k in unexpected)
    x = tokens()
    torch.testing.assert_close(on(x).logits, off(x).logits, rtol=0, atol=0)


def test_zero_gate_mode_makes_the_loop_an_identity_at_init():
    """Pure adaLN-Zero (x + gate * f): the loop contributes nothing until its gates grow."""
    looped = build(adaln_gate="zero")
    no_loop = build(n_loop=0)
    no_loop.load_state_dict({k: v for k, v in looped.state_dict().items()
                             if not k.startswith(("loop.", "iter_embed."))})
    x = tokens()
    torch.testing.assert_close(looped(x).logits, no_loop(x).logits)


def test_step0_gradients_reach_w_m_and_b_only():
    m = build()
    x = tokens()
    m(x, labels=x).loss.backward()
    for blk in m.loop:
        assert blk.adaln.mod.weight.grad.abs().sum() > 0
        assert blk.adaln.mod.bias.grad.abs().sum() > 0
        assert blk.adaln.token.weight.grad.abs().sum() == 0  # behind W_m = 0 (documented)
    assert all(p.grad.abs().sum() == 0 for p in m.iter_embed.parameters())


def loop_outputs(m, h):
    """Loop block 0 applied to the same state h at iterations 0 and 1."""
    rope = (m.rope_cos, m.rope_sin)
    blk = m.loop[0]
    return [blk(h, rope, m.iter_embed(k))[0] for k in (0, 1)]


def test_iterations_differ_after_a_few_steps():
    m = build()
    h = torch.randn(2, 12, 32)
    a, b = loop_outputs(m, h)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # symmetric at init
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for step in range(3):
        x = tokens(seed=step)
        opt.zero_grad()
        m(x, labels=x).loss.backward()
        opt.step()
    assert m.loop[0].adaln.token.weight.grad.abs().sum() > 0  # learning everywhere after step 1
    a, b = loop_outputs(m, h)
    assert (a - b).abs().max() > 1e-4


def test_modulation_shapes_and_parameter_count():
    d, r = 32, 8
    ada = IterAdaLN(d, r, "both", "one_plus", 1e-6)
    assert sum(p.numel() for p in ada.parameters()) == r * d + 6 * d * r + 6 * d  # spec sec. 3
    mods = ada(torch.randn(2, 5, d), torch.randn(r))
    assert len(mods) == 6 and all(t.shape == (2, 5, d) for t in mods)
    it = IterAdaLN(d, r, "iter", "one_plus", 1e-6)
    assert all(t.shape == (d,) for t in it(torch.randn(2, 5, d), torch.randn(r)))
    assert not torch.equal(sinusoid(0, 8), sinusoid(1, 8))


def test_adaln_only_in_the_loop_and_shared_iteration_mlp():
    m = build()
    names = [n for n, _ in m.named_parameters()]
    assert all(n.startswith("loop.") for n in names if ".adaln." in n)
    assert {n.split(".adaln.")[0] for n in names if ".adaln." in n} == {"loop.0", "loop.1"}
    assert [n for n in names if n.startswith("iter_embed.")]  # one MLP shared by all loop layers
    assert m.prelude[0].adaln is None and m.coda[0].adaln is None
    assert not any(n.startswith("iter_embed.") for n, _ in build(adaln="token").named_parameters())
    assert not any(".adaln." in n for n, _ in build(adaln="none").named_parameters())


@pytest.mark.parametrize("mode", ["both", "iter"])
def test_adaln_stats_sees_every_layer_and_iteration_and_separates_token_from_iteration_signal(mode):
    from loopmoe.analysis.adaln_stats import adaln_stats, markdown

    m = build(adaln=mode).eval()
    batches = [{"tokens": tokens(seed=s)} for s in (1, 2)]
    at_init = adaln_stats(m, batches)
    assert [(r["loop_layer"], r["iteration"]) for r in at_init] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(r["scale_a"] == 0 and r["gate_f"] == 0 for r in at_init)  # W_m, b = 0: no modulation yet
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".adaln.mod" in name:
                p.normal_(0, 0.1)
    rows = adaln_stats(m, batches)
    assert all(r["scale_a"] > 0 and r["e_rms"] > 0 for r in rows)
    if mode == "iter":  # one modulation vector per iteration: nothing varies across tokens
        assert all(r["token_share"] < 1e-6 and "h_rms" not in r for r in rows)
    else:
        assert all(r["token_share"] > 0.05 and r["h_rms"] > 0 for r in rows)
    assert "| `x` | 0 | 1 |" in markdown({"x": rows})
    x = tokens()
    torch.testing.assert_close(m(x).logits, m(x).logits)  # hooks removed: forwards unchanged and repeatable
    assert not any(blk.adaln._forward_hooks for blk in m.loop)
