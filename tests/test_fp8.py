"""FP8 training (loopmoe/parallel/fp8.py): the config refuses an FP8 run that would train in bf16; the
torchao route converts the block linears to Float8Linear and trains on the CPU (torch 2.13's
``torch._scaled_mm`` runs there) with a loss curve within a stated tolerance of bf16; the TE route says
why it cannot run without CUDA/TE; recompute of TE modules goes through TE's checkpoint; the pipeline
stage runs each micro-batch's forward inside the FP8 context. TE itself: ``gpu``-marked tests.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import types

import pytest
import torch
from torch import nn

import loopmoe.model.recompute as recompute_mod
from loopmoe.config import ConfigError, fp8_recipe_name, load_config
from loopmoe.model import LoopMoEModel
from loopmoe.parallel import fp8

torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install -c constraints.txt '.[fp8-torchao]')")

V = 128  # vocabulary of the tiny model
FP8_MODEL = ["model.vocab_size=128", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
             "model.head_dim=16", "model.n_prelude=1", "model.n_loop=1", "model.n_coda=1", "model.loop_iters=2",
             "model.max_seq_len=64", "model.n_experts=4", "model.top_k=2", "model.expert_hidden=32",
             "model.adaln_rank=16", "data.seq_len=32"]


def cfg_(*overrides: str):
    return load_config(None, [*FP8_MODEL, *overrides])


def torchao_cfg(recipe: str = "auto", *extra: str):
    return cfg_("model.linear_backend=torch", "train.precision=fp8", "train.fp8_backend=torchao",
                f"train.fp8_recipe={recipe}", *extra)


# ---------------------------------------------------------------------------------------------------
# config


def test_fp8_refused_without_a_route():
    """The old behaviour (fp8 with megatron linears = a bf16 run) is a one-line error naming the fix."""
    with pytest.raises(ConfigError, match=r"train.precision='fp8'.*model.linear_backend=te") as e:
        load_config(None, ["train.precision=fp8"])  # default: fp8_backend=te, linear_backend=megatron
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"fp8_backend='torchao'.*model.linear_backend=torch"):
        load_config(None, ["train.precision=fp8", "train.fp8_backend=torchao", "model.linear_backend=te"])
    with pytest.raises(ConfigError, match=r"fp8_recipe='rowwise' is not a te recipe"):
        load_config(None, ["train.precision=fp8", "model.linear_backend=te", "train.fp8_recipe=rowwise"])
    with pytest.raises(ConfigError, match=r"fp8_recipe='delayed' is not a torchao recipe"):
        load_config(None, ["train.precision=fp8", "train.fp8_backend=torchao", "model.linear_backend=torch",
                           "train.fp8_recipe=delayed"])


def test_fp8_routes_accepted_with_recompute_and_auto_recipes():
    te = load_config(None, ["train.precision=fp8", "model.linear_backend=te", "train.recompute=full"])
    assert (te.train.fp8_backend, fp8_recipe_name(te.train), te.train.recompute) == ("te", "delayed", "full")
    ao = load_config(None, ["train.precision=fp8", "train.fp8_backend=torchao", "model.linear_backend=torch",
                            "train.recompute=selective"])
    assert fp8_recipe_name(ao.train) == "tensorwise"
    for recipe in ("current", "mxfp8"):
        assert load_config(None, ["train.precision=fp8", "model.linear_backend=te",
                                  f"train.fp8_recipe={recipe}"]).train.fp8_recipe == recipe
    # fp8 fields are inert when precision is not fp8 (the presets run bf16 with megatron linears)
    assert load_config(None, ["train.fp8_recipe=rowwise"]).train.precision == "fp32"


# ---------------------------------------------------------------------------------------------------
# the TE route says why it cannot run here; the torchao route is a no-op autocast


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_te_route_says_why_it_cannot_run_without_cuda():
    cfg = load_config(None, ["train.precision=fp8", "model.linear_backend=te"])
    for probe in (True, False):  # the preflight's form (no device probe) says the same
        reason = fp8.fp8_unavailable_reason(cfg, probe=probe)
        assert reason is not None and "no CUDA device" in reason and "fp8_backend=torchao" in reason
    with pytest.raises(RuntimeError, match=r"train.precision=fp8 cannot run here: .*no CUDA device"):
        fp8.prepare_fp8(nn.Linear(16, 16), cfg)


def test_autocast_is_a_noop_off_the_te_route():
    for cfg in (cfg_(), torchao_cfg()):
        assert isinstance(fp8.fp8_autocast(cfg), contextlib.nullcontext)
    assert fp8.fp8_unavailable_reason(cfg_()) is None  # FP8 off: nothing to check
    assert fp8.fp8_unavailable_reason(torchao_cfg()) is None  # torchao is installed and runs here


# ---------------------------------------------------------------------------------------------------
# torchao: conversion, a really quantized forward, training against bf16


def build(cfg) -> LoopMoEModel:
    torch.manual_seed(0)
    return LoopMoEModel(cfg.model)


def block_linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (".attn." in n or ".ffn." in n)]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_converts_the_block_linears_and_quantizes(recipe, caplog):
    from torchao.float8.float8_linear import Float8Linear

    cfg = torchao_cfg(recipe)
    ref = build(cfg)
    with caplog.at_level(logging.INFO, logger="loopmoe.parallel.fp8"):
        model = fp8.prepare_fp8(build(cfg), cfg)
    converted = [n for n, m in model.named_modules() if isinstance(m, Float8Linear)]
    # every block linear (attention qkv/proj, shared-expert SwiGLU; all widths multiples of 16) and nothing else
    assert converted == block_linears(ref) and len(converted) == 5 * cfg.model.n_unique_layers  # qkv, proj, w1/w3/w2
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, Float8Linear)
    assert fp8.fp8_layers(model) == converted
    # Float8Linear keeps nn.Linear's parameters: checkpoints move between FP8 and bf16 runs unchanged
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    log = caplog.text
    assert f"{len(converted)} layers run their GEMMs in FP8" in log and "routed experts stay bf16" in log
    # the forward really runs FP8 GEMMs: logits differ from the same weights in fp32 by FP8's rounding
    # (e4m3: 3 mantissa bits, ~3% per element), not by nothing and not by a broken scale
    x = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
        # one FP8 GEMM (torch._scaled_mm, on the CPU here) per converted linear per executed layer
        assert aten_calls(lambda: model(x), "aten::_scaled_mm") == 5 * cfg.model.n_executed_layers
        assert aten_calls(lambda: ref(x), "aten::_scaled_mm") == 0
    rel = ((a - b).norm() / a.norm()).item()
    assert 1e-3 < rel < 0.1, rel


def aten_calls(fn, op: str) -> int:
    """How many times the aten op ``op`` (e.g. "aten::_scaled_mm") runs inside ``fn()`` (torch's profiler
    sees the ops a tensor subclass issues, which a dispatch mode around the model does not)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == op)


def markov_batches(steps: int, b: int = 4, s: int = 32, seed: int = 0):
    """A learnable stream: a fixed random first-order Markov chain, two successors per token."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, V, (V, 2), generator=g)
    for _ in range(steps):
        t = torch.empty(b, s + 1, dtype=torch.long)
        t[:, 0] = torch.randint(0, V, (b,), generator=g)
        for i in range(s):
            t[:, i + 1] = succ[t[:, i], torch.randint(0, 2, (b,), generator=g)]
        yield t[:, :-1], t[:, 1:]


def train_losses(cfg, steps: int) -> list[float]:
    """fp32 master weights, bf16 compute (torch.autocast; DeepSpeed's bf16 keeps fp32 master weights too),
    AdamW; returns the LM loss per step."""
    model = fp8.prepare_fp8(build(cfg), cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for x, y in markov_batches(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_fp8_trains_like_bf16(recipe, one_thread):
    """40 steps from one init on one stream: the FP8 run learns (loss 4.84 -> ~1.6) and its last-10-step
    mean loss is within 0.05 nats (3%) of the bf16 run's; measured gap 0.013 (tensorwise), 0.004 (rowwise).
    A broken FP8 (wrong scale, saturation) moves the curve by far more than that."""
    steps = 40
    bf16 = train_losses(cfg_("model.linear_backend=torch", "train.precision=bf16"), steps)
    f8 = train_losses(torchao_cfg(recipe), steps)
    mean = lambda v: sum(v[-10:]) / 10  # noqa: E731
    assert bf16[0] - mean(bf16) > 2.5 and f8[0] - mean(f8) > 2.5  # both really train
    assert abs(mean(f8) - mean(bf16)) < 0.05, (mean(f8), mean(bf16))
    assert f8 != bf16  # the FP8 run is not the bf16 run under another name


# ---------------------------------------------------------------------------------------------------
# recompute: TE modules go through TE's checkpoint (a stand-in TE on the CPU)


class _FakeTELinear(nn.Linear):
    """Stands for a TE module: recompute tells TE modules by their class's module name."""


_FakeTELinear.__module__ = "transformer_engine.pytorch.module.linear"


@pytest.fixture
def fake_te(monkeypatch):
    """transformer_engine.pytorch with a ``distributed.checkpoint`` that records its calls and runs torch's
    checkpoint with the arguments given (TE's falls back to torch's the same way for non-TE modules)."""
    calls = []

    def checkpoint(fn, *args, **kwargs):
        calls.append(kwargs)
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    te_pkg = types.ModuleType("transformer_engine")
    te_pt = types.ModuleType("transformer_engine.pytorch")
    te_pt.distributed = types.SimpleNamespace(checkpoint=checkpoint)
    te_pkg.pytorch = te_pt
    monkeypatch.setitem(sys.modules, "transformer_engine", te_pkg)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pt)
    return calls


def te_model(recompute: str) -> LoopMoEModel:
    cfg = cfg_("model.linear_backend=torch", "model.aux_free_bias=true", "model.aux_free_rate=0.01")
    torch.manual_seed(0)
    m = LoopMoEModel(cfg.model, recompute=recompute)
    for name in block_linears(m):
        m.get_submodule(name).__class__ = _FakeTELinear
    return m


def test_recompute_of_te_layers_uses_te_checkpoint(fake_te, one_thread):
    x, y = next(markov_batches(1, b=2, s=16))
    ref = te_model("none")
    ref(x, labels=y).loss.backward()
    model = te_model("full")
    model(x, labels=y).loss.backward()
    n = model.cfg.n_executed_layers
    assert len(fake_te) == n  # every executed layer (each loop iteration) through TE's checkpoint
    assert all(c["use_reentrant"] is False and c["context_fn"] is recompute_mod._contexts for c in fake_te)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # the aux-free load is counted once per forward, not again in the recompute (is_recomputing via context_fn)
    for a, b in zip(model.layers, ref.layers):
        torch.testing.assert_close(a.ffn.router.load_acc, b.ffn.router.load_acc)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_under_torchao_fp8_matches_no_recompute(mode, one_thread):
    """torchao's dynamic scaling has no state: torch's checkpoint recomputes the same FP8 GEMMs."""
    x, y = next(markov_batches(1, b=2, s=16))
    grads = []
    for recompute in ("none", mode):
        cfg = torchao_cfg("tensorwise", f"train.recompute={recompute}")
        torch.manual_seed(0)
        model = fp8.prepare_fp8(LoopMoEModel(cfg.model, recompute=recompute), cfg)
        model(x, labels=y).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_recompute_without_te_modules_stays_torch(fake_te, one_thread):
    """TE loaded but the layer has none of its modules (megatron/torch backends): torch's checkpoint."""
    cfg = cfg_("model.linear_backend=torch")
    torch.manual_seed(0)
    m = LoopMoEModel(cfg.model, recompute="full")
    x, y = next(markov_batches(1, b=2, s=16))
    m(x, labels=y).loss.backward()
    assert fake_te == []


# ---------------------------------------------------------------------------------------------------
# the amax reduction group: tensor- and data-parallel ranks of this pipeline stage


@pytest.mark.slow
def test_amax_group_spans_tensor_and_data_parallel_ranks():
    from conftest import run_torchrun

    run_torchrun(__file__, nproc=4)


def _amax_worker() -> None:
    """World 4 (gloo): for each TP x PP layout, the amax group holds exactly the ranks of this rank's
    pipeline stage (all its TP and DP ranks; megatron's rank order is tp fastest, pp slowest) and an
    all-reduce over it counts them."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for tp, pp in ((2, 1), (1, 1), (2, 2), (1, 2)):
        ps.initialize_model_parallel(tp, pp)
        group = fp8.amax_reduction_group()
        per_stage = world // pp
        expected = [r for r in range(world) if r // per_stage == rank // per_stage]
        assert dist.get_process_group_ranks(group) == expected, (tp, pp, dist.get_process_group_ranks(group))
        n = torch.ones(())
        dist.all_reduce(n, group=group)
        assert n.item() == len(expected)
        ps.destroy_model_parallel()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------
# the pipeline stage: each micro-batch's forward inside the context


def test_pipeline_stage_forward_runs_inside_the_autocast(single_process_group, one_thread):
    from loopmoe.model.layers import megatron_config
    from loopmoe.parallel.pipeline import PipelineStage, pipeline_forward_backward

    cfg = cfg_("model.linear_backend=torch")
    torch.manual_seed(0)
    model = LoopMoEModel(cfg.model)
    config = megatron_config(cfg.model)
    config.pipeline_dtype = torch.float32
    config.variable_seq_lengths = False
    stage = PipelineStage(model, 0, cfg.model.n_unique_layers, config)
    state = {"inside": False, "entered": 0, "forwards_inside": 0, "forwards": 0}

    @contextlib.contextmanager
    def autocast():
        state["entered"] += 1
        state["inside"] = True
        try:
            yield
        finally:
            state["inside"] = False

    def count(_module, _args):
        state["forwards"] += 1
        state["forwards_inside"] += state["inside"]

    stage.register_forward_pre_hook(count)
    batches = ({"tokens": x, "labels": y, "loss_mask": torch.ones_like(x, dtype=torch.float)}
               for x, y in markov_batches(3, b=2, s=16))
    sums = pipeline_forward_backward(stage, batches, 3, 2, 16, autocast=autocast)
    assert state == {"inside": False, "entered": 3, "forwards_inside": 3, "forwards": 3}
    assert torch.isfinite(sums).all() and all(p.grad is not None for p in stage.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------
# Transformer Engine itself (CUDA + TE only)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Transformer Engine's FP8)")


def _te_or_skip():
    return pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_autocast_runs_the_linear_in_fp8(recipe, single_process_group):
    te = _te_or_skip()
    cfg = load_config(None, ["train.precision=fp8", "model.linear_backend=te", f"train.fp8_recipe={recipe}"])
    if (reason := fp8.fp8_unavailable_reason(cfg)) is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    lin = te.Linear(256, 256, bias=False, params_dtype=torch.bfloat16, device="cuda")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    plain = lin(x)
    with fp8.fp8_autocast(cfg):
        y = lin(x)
    assert lin.fp8  # TE's module state: the last forward ran its GEMM in FP8
    rel = ((y.float() - plain.float()).norm() / plain.float().norm()).item()
    assert 1e-3 < rel < 0.1, rel  # FP8 rounding: different from bf16, close to it
    y.float().pow(2).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@pytest.mark.gpu
@needs_cuda
def test_te_recompute_under_fp8_matches_no_recompute(single_process_group):
    """Current scaling (no history): with and without TE's checkpoint the FP8 gradients agree."""
    te = _te_or_skip()
    cfg = load_config(None, ["train.precision=fp8", "model.linear_backend=te", "train.fp8_recipe=current"])
    if (reason := fp8.fp8_unavailable_reason(cfg)) is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    net = nn.Sequential(te.Linear(256, 512, bias=False, params_dtype=torch.bfloat16, device="cuda"), nn.GELU(),
                        te.Linear(512, 256, bias=False, params_dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    grads = []
    for use_ckpt in (False, True):
        net.zero_grad()
        with fp8.fp8_autocast(cfg):
            y = recompute_mod.checkpointed(net, x) if use_ckpt else net(x)
        y.float().pow(2).sum().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


if __name__ == "__main__":
    _amax_worker()


def test_preflight_refuses_fp8_that_cannot_run_here_in_one_line():
    """TE's route without TE or CUDA fails at start-up with the reason, before any model is built."""
    from loopmoe.parallel.fp8 import fp8_unavailable_reason
    from loopmoe.train.preflight import PreflightError, check_fp8

    cfg = load_config(None, ["train.precision=fp8", "model.linear_backend=te"])
    if fp8_unavailable_reason(cfg, probe=False) is None:
        pytest.skip("Transformer Engine and CUDA are both here: TE's FP8 can run")
    with pytest.raises(PreflightError, match=r"train.precision=fp8 cannot run here: .+") as e:
        check_fp8(cfg)
    assert "\n" not in str(e.value)
    check_fp8(load_config(None, ["train.precision=bf16"]))  # nothing to say without FP8
