"""The model: causality, losses, routing records, forced routing, exits, backends, naming, TP.

Run as a script under torchrun it is the TP=2 worker: ``torchrun --nproc_per_node 2 tests/test_model.py``.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from loopmoe.config import ModelConfig
from loopmoe.model import LoopMoEModel, ModelOutput, RoutingRecord

V = 97


def cfg_(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, n_prelude=1, n_loop=2,
                n_coda=1, loop_iters=2, max_seq_len=32, n_experts=4, top_k=2, expert_hidden=16,
                n_shared_experts=1, dense_hidden=48, adaln_rank=8, linear_backend="torch")
    base.update(kw)
    return ModelConfig(**base)


def build(seed=0, **kw) -> LoopMoEModel:
    torch.manual_seed(seed)
    return LoopMoEModel(cfg_(**kw))


def tokens(b=2, s=12, seed=1):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def perturb_adaln(m, seed=3):
    """Give IterAdaLN non-zero modulation so that iterations really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in m.loop:
            for p in blk.adaln.mod.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


VARIANTS = {
    "loopmoe": {},
    "loopmoe_capacity": dict(capacity_factor=1.0),  # drops keep the first slots: still causal (b=1)
    "vanilla_moe": dict(n_loop=0, n_prelude=2, n_coda=2),
    "dense_looped": dict(ffn="dense"),
    "dense": dict(ffn="dense", n_loop=0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal(variant):
    m = build(**VARIANTS[variant]).eval()
    if m.cfg.n_loop:
        perturb_adaln(m)
    x = tokens(b=1, s=12)
    ref = m(x).logits
    for t in (0, 5, 10):
        y = x.clone()
        y[:, t + 1:] = (y[:, t + 1:] + 1 + torch.arange(11 - t)) % V
        out = m(y).logits
        torch.testing.assert_close(out[:, :t + 1], ref[:, :t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])


def test_output_and_losses():
    m = build()
    x = tokens()
    labels, mask = tokens(seed=2), (torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    out = m(x, labels=labels, loss_mask=mask)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 12, V)
    ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(out.lm_loss, (ce * mask.flatten()).sum() / mask.sum())
    cfg = m.cfg
    torch.testing.assert_close(out.aux_loss, cfg.lb_loss_coef * out.lb_loss + cfg.z_loss_coef * out.z_loss)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.routing == [] and out.exit_logits is None and out.exit_losses is None
    assert m(x).loss is None


def test_aux_losses_sum_over_every_executed_pass():
    m = build(loop_iters=3)
    seen = []
    for blk in m.layers:
        blk.ffn.router.register_forward_hook(lambda mod, args, out: seen.append(out))
    out = m(tokens(), exit_logits=True, return_routing=True)
    assert len(out.routing) == 1 + 3 * 2 + 1  # P + R*K + C recorded passes
    assert len(seen) == len(out.routing) + 2  # + the coda at the two early exits
    torch.testing.assert_close(out.lb_loss, sum(r.lb for r in seen))
    torch.testing.assert_close(out.z_loss, sum(r.z for r in seen))
    dense = build(ffn="dense")(tokens(), labels=tokens())
    assert dense.aux_loss.item() == 0 and dense.lb_loss.item() == 0 and dense.routing == []


def test_routing_records():
    m = build(loop_iters=3)
    out = m(tokens(), return_routing=True)
    T, k = 24, 2
    assert [(r.layer, r.iteration) for r in out.routing] == [
        (0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2), (3, 0)]
    for r in out.routing:
        assert isinstance(r, RoutingRecord) and r.topk.shape == (T, k) and r.topk.dtype == torch.long
        assert r.load.shape == (4,) and int(r.load.sum()) == T * k
    assert len(m.layers) == 4 and m.layers[1] is m.loop[0]


def test_force_routing_reuses_and_overrides_decisions():
    m = build()
    perturb_adaln(m)
    x = tokens()
    out = m(x, return_routing=True)
    force = {(r.layer, r.iteration): r.topk for r in out.routing}
    same = m(x, return_routing=True, force_routing=force)
    torch.testing.assert_close(same.logits, out.logits, rtol=0, atol=0)
    # causal divergence experiment: pass 2 of loop layer 1 reuses pass 1's experts
    forced = m(x, return_routing=True, force_routing={(1, 1): force[(1, 0)]})
    rec = {(r.layer, r.iteration): r.topk for r in forced.routing}
    assert torch.equal(rec[(1, 1)], force[(1, 0)]) and not torch.equal(force[(1, 1)], force[(1, 0)])
    assert not torch.allclose(forced.logits, out.logits)


def test_exit_logits_and_exit_after():
    m = build(loop_iters=3).eval()
    perturb_adaln(m)
    x = tokens()
    full = m(x)
    ex = m(x, exit_logits=True, return_routing=True)
    assert len(ex.exit_logits) == 3
    torch.testing.assert_close(ex.exit_logits[-1], full.logits, rtol=0, atol=0)
    torch.testing.assert_close(m(x, exit_after=3).logits, full.logits, rtol=0, atol=0)
    for k in (1, 2):
        early = m(x, exit_after=k, return_routing=True)
        torch.testing.assert_close(early.logits, ex.exit_logits[k - 1], atol=1e-6, rtol=1e-5)
        assert sum(r.layer == 1 for r in early.routing) == k  # k iterations ran
    assert not torch.allclose(ex.exit_logits[0], ex.exit_logits[1])
    assert sum(r.layer == 3 for r in ex.routing) == 1  # exit read-outs are not recorded
    with pytest.raises(ValueError):
        m(x, exit_after=4)
    assert len(build(n_loop=0)(x, exit_logits=True).exit_logits) == 1


def test_weighted_exit_losses():
    m = build(loop_iters=3, exit_loss_weights=[0.5, 0.25])
    x, y = tokens(), tokens(seed=2)
    out = m(x, labels=y)
    assert len(out.exit_losses) == 2
    expect = out.lm_loss + out.aux_loss + 0.5 * out.exit_losses[0] + 0.25 * out.exit_losses[1]
    torch.testing.assert_close(out.loss, expect)


def test_input_reinjection_option():
    off, on = build(), build(input_reinjection=True)
    x = tokens()
    assert not torch.allclose(off(x).logits, on(x).logits)
    one = build(loop_iters=1, input_reinjection=True)  # nothing to re-inject with a single iteration
    torch.testing.assert_close(one(x).logits, build(loop_iters=1)(x).logits, rtol=0, atol=0)


def test_tied_embeddings_and_meta_device_counting():
    m = build(tie_embeddings=True)
    assert m.head.weight is m.embed.weight
    with torch.device("meta"):
        meta = LoopMoEModel(cfg_())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in build().parameters())


def test_parameter_naming_contract():
    from deepspeed.moe.utils import is_moe_param

    m = build(n_shared_experts=1)
    names = dict(m.named_parameters())
    top = {n.split(".")[0] for n in names}
    assert top == {"embed", "prelude", "loop", "coda", "iter_embed", "norm", "head"}
    assert not any(is_moe_param(p) for p in names.values())  # ep_size=1: see moe.Experts
    for pre in ("prelude.0", "loop.1", "coda.0"):
        for part in ("attn_norm.weight", "attn.qkv.weight", "attn.proj.weight", "ffn_norm.weight",
                     "ffn.router.weight", "ffn.experts.w1", "ffn.experts.w2", "ffn.shared.w1.weight"):
            assert f"{pre}.{part}" in names
    assert "loop.0.ffn.router.bias" in dict(m.named_buffers())
    dense = dict(build(ffn="dense").named_parameters())
    assert "prelude.0.ffn.w1.weight" in dense and not any(".experts." in n for n in dense)


def test_update_router_biases():
    m = build(aux_free_bias=True, aux_free_rate=0.01)
    m(tokens())
    loads = [blk.ffn.router.load_acc.clone() for blk in m.layers]
    m.update_router_biases()
    for blk, load in zip(m.layers, loads):
        torch.testing.assert_close(blk.ffn.router.bias, 0.01 * torch.sign(load.mean() - load))
    assert int(loads[1].sum()) == 2 * 24 * 2  # loop layer: both iterations counted


def test_megatron_backend_equals_torch_backend(single_process_group):
    mc = build(linear_backend="megatron")
    tc = build(linear_backend="torch")
    assert set(mc.state_dict()) == set(tc.state_dict())  # same keys (no megatron _extra_state)
    tc.load_state_dict(mc.state_dict())
    perturb_adaln(mc)
    perturb_adaln(tc)
    x, y = tokens(), tokens(seed=2)
    a, b = mc(x, labels=y), tc(x, labels=y)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    gt = dict(tc.named_parameters())
    for n, p in mc.named_parameters():
        torch.testing.assert_close(p.grad, gt[n].grad, atol=1e-6, rtol=1e-4, msg=n)
    mc.load_state_dict(tc.state_dict())  # strict both ways


def test_te_backend_raises_clear_error_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match=r"Hopper.*pip install \.\[fp8\]"):
        build(linear_backend="te")


@pytest.mark.gpu
def test_te_fp8_forward_backward(single_process_group):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU with Transformer Engine")
    te = pytest.importorskip("transformer_engine.pytorch", reason="needs a CUDA GPU with Transformer Engine")
    with torch.device("cuda"):
        m = build(linear_backend="te", d_model=128, head_dim=32, expert_hidden=64, dense_hidden=128)
    x = tokens().cuda()
    with te.fp8_autocast(enabled=True), torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------
# Tensor (and sequence) parallelism: 2 processes (gloo) against TP=1 built from the same seed.


def test_tp2_and_sequence_parallel_equal_tp1():  # ~10 s on 2 CPU cores
    from conftest import run_torchrun

    res = run_torchrun(__file__)
    assert res.stdout.count("TP2 OK") == 2


def _tp_worker():
    import torch.distributed as dist
    from conftest import assert_grads_match_one_process
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if not torch.cuda.is_available():  # megatron's sequence-parallel collectives allocate on
        torch.cuda.current_device = lambda: "cpu"  # torch.cuda.current_device(): the known CPU stub
    kw = dict(linear_backend="megatron", vocab_size=96, lb_loss_coef=0.0, z_loss_coef=0.0,  # aux: per shard
              aux_free_bias=True, aux_free_rate=0.01)
    x, y = tokens() % 96, tokens(seed=2) % 96

    def run(sp=False):
        torch.manual_seed(0)
        m = LoopMoEModel(cfg_(**kw), sequence_parallel=sp)
        perturb_adaln(m)
        out = m(x, labels=y)
        out.loss.backward()
        m.update_router_biases()  # loads summed over DP (and TP under SP): every rank gets one bias
        return m, out

    ps.initialize_model_parallel(1)
    # linear_backend="torch" at DP=2, each rank its own tokens: the bias comes from the loads of BOTH ranks
    # (it once skipped the all-reduce with this backend, and the ranks' biases drifted apart).
    torch.manual_seed(0)
    tm = LoopMoEModel(cfg_(**{**kw, "linear_backend": "torch"}))
    tm(tokens(seed=10 + rank) % 96)
    loads = [blk.ffn.router.load_acc.clone() for blk in tm.layers]
    tm.update_router_biases()
    for blk, load in zip(tm.layers, loads):
        dist.all_reduce(load)  # the reference: loads summed by hand
        torch.testing.assert_close(blk.ffn.router.bias, 0.01 * torch.sign(load.mean() - load))
    ref, ref_out = run()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(2)
    for sp in (False, True):
        m, out = run(sp)
        torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.lm_loss, ref_out.lm_loss)
        assert_grads_match_one_process(m, ref_grads, rank, tp=2, msg=f"sp={sp}")
        assert sp == any(getattr(p, "sequence_parallel", False) for p in m.parameters())
        for blk, ref_blk in zip(m.layers, ref.layers):
            torch.testing.assert_close(blk.ffn.router.bias, ref_blk.ffn.router.bias)
        assert any(blk.ffn.router.bias.abs().sum() > 0 for blk in m.layers)
    print(f"rank {rank}: TP2 OK", flush=True)
    from loopmoe.parallel.distributed import shutdown

    shutdown()  # barrier, every group registry cleared, groups destroyed while the interpreter is alive


if __name__ == "__main__":
    _tp_worker()
