"""bf16 training on the CPU through DeepSpeed: the precision path a GPU run takes (bf16 weights, fp32
gradient accumulation and reduction, fp32 master weights and Adam moments in DeepSpeed's optimizer).

Per ZeRO stage DeepSpeed 0.19.8 picks (see loopmoe/train/zero_state.py): ZeRO-1 bf16 -> BF16_Optimizer,
ZeRO-2 bf16 -> DeepSpeedZeroOptimizer, ZeRO-0 bf16 -> refused by the layout check; fp32 runs for contrast.
The worker trains each case with the real code path (build_model -> parallelize -> build_engine ->
Trainer.train_step -> Checkpointer) on the in-memory batches of tests/test_parallel_harness.py, saves after
step SAVE_AT, writes the live optimizer state next to the checkpoint (read out of DeepSpeed's flat fp32
partitions by this file, independently of zero_state.py), then loads the checkpoint into a fresh engine and
runs the remaining steps. The pretrain test runs pretrain_loopmoe.py itself in bf16, stops and resumes.

Run as a script it is the worker: python tests/test_bf16.py MODE DIR (alone or under torchrun).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings

import pytest
import torch

from tests.test_train import token_prefix  # noqa: F401  (fixture: the tiny tokenised corpus)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (zero stage, precision, EP, PP); world 1 ("one") or world 2 ("two": DP 2 with the experts split,
# or a 2-stage pipeline, whose schedule runs the backward outside the engine)
CASES_ONE = {"Z0-fp32": (0, "fp32", 1, 1), "Z1-fp32": (1, "fp32", 1, 1), "Z1-bf16": (1, "bf16", 1, 1),
             "Z2-bf16": (2, "bf16", 1, 1)}
CASES_TWO = {"EP2-Z1-bf16": (1, "bf16", 2, 1), "EP2-Z2-bf16": (2, "bf16", 2, 1), "PP2-Z1-bf16": (1, "bf16", 1, 2)}
OPTIMIZER = {"Z0-fp32": "AdamW", "Z1-fp32": "DeepSpeedZeroOptimizer", "Z1-bf16": "BF16_Optimizer",
             "Z2-bf16": "DeepSpeedZeroOptimizer", "EP2-Z1-bf16": "BF16_Optimizer",
             "EP2-Z2-bf16": "DeepSpeedZeroOptimizer", "PP2-Z1-bf16": "BF16_Optimizer"}
STEPS, SAVE_AT = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # 2 launches (1 and 2 processes): ~40 s on 2 idle CPU cores, ~100 s on busy ones
    from tests.test_parallel_harness import launch

    d = tmp_path_factory.mktemp("bf16")
    me = os.path.abspath(__file__)
    launch(me, ["one", str(d)], 1)
    launch(me, ["two", str(d)], 2)
    res = {}
    for f in ("one.json", "two.json"):
        res.update(json.loads((d / f).read_text()))
    return res, d


# ---------------------------------------------------------------------------------------------------
# Without an engine: the config DeepSpeed gets, the layout check, the router's buffers


def test_bf16_config_sums_and_reduces_gradients_in_fp32():
    from loopmoe.config import Config
    from loopmoe.train.engine import deepspeed_config

    cfg = Config()
    cfg.train.precision = "bf16"
    ds = deepspeed_config(cfg, dp_size=2)  # on the CPU too: no "needs a GPU"
    assert ds["bf16"]["enabled"] and ds["bf16"]["immediate_grad_update"]
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    cfg.train.precision = "fp32"
    assert "bf16" not in deepspeed_config(cfg, dp_size=2)


def test_bf16_with_zero0_is_refused_with_the_reason():
    from loopmoe.config import Config, ConfigError
    from loopmoe.parallel.layout import validate_layout

    cfg = Config()
    cfg.train.precision, cfg.train.zero_stage = "bf16", 0
    with pytest.raises(ConfigError, match="no ZeRO-0 bf16 optimizer that accumulates and reduces gradients in fp32"):
        validate_layout(cfg, 1)


def test_router_bias_update_of_1e3_survives_at_magnitude_1():
    """The aux-free update b += rate * sign(mean - load) with rate 1e-3 on |b| ~ 1: kept by the fp32 buffer;
    the same sum in bf16 (spacing 2^-7 at 1.0) would round back to 1.0."""
    from loopmoe.config import ModelConfig
    from loopmoe.model.moe import Router

    r = Router(ModelConfig(n_experts=4, d_model=8, top_k=2))
    with torch.no_grad():
        r.bias.fill_(1.0)
        r.load_acc.copy_(torch.tensor([3.0, 1.0, 1.0, 3.0]))  # mean 2: experts 1, 2 under-loaded
    r.update_bias(1e-3)
    assert r.bias.dtype == torch.float32
    assert r.bias.tolist() == [torch.tensor(1.0 - 1e-3).item(), torch.tensor(1.0 + 1e-3).item(),
                               torch.tensor(1.0 + 1e-3).item(), torch.tensor(1.0 - 1e-3).item()]
    bf = torch.ones(4, dtype=torch.bfloat16) + torch.tensor([-1e-3, 1e-3, 1e-3, -1e-3], dtype=torch.bfloat16)
    assert bf.tolist() == [1.0] * 4  # what a bf16 buffer would have kept


def test_an_unknown_optimizer_wrapper_raises_instead_of_saving_zeros():
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    from loopmoe.train.zero_state import UnsupportedOptimizer, _get_state, _optimizer_step, _set_state

    opt = FP16_Optimizer.__new__(FP16_Optimizer)  # DeepSpeed's ZeRO-0 fp16/bf16 wrapper, not handled
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(UnsupportedOptimizer, match="FP16_Optimizer is not handled"):
        _get_state(opt, p, "exp_avg")
    with pytest.raises(UnsupportedOptimizer):
        _set_state(opt, p, "exp_avg", torch.ones(3), 1.0)
    with pytest.raises(UnsupportedOptimizer):
        _optimizer_step(opt)


# ---------------------------------------------------------------------------------------------------
# Through DeepSpeed (the worker's results)


@pytest.mark.slow
def test_deepspeed_picks_its_optimizer_and_keeps_bf16_weights_fp32_router_buffers(runs):
    res, _ = runs
    for name, (_, precision, _, _) in {**CASES_ONE, **CASES_TWO}.items():
        r = res[name]
        assert r["optimizer"] == OPTIMIZER[name], name
        want = "torch.bfloat16" if precision == "bf16" else "torch.float32"
        assert set(r["param_dtypes"]) == {want}, (name, r["param_dtypes"])
        assert set(r["router_buffers"].values()) == {"torch.float32"}, (name, r["router_buffers"])
        if precision == "bf16":  # the buffers DeepSpeed sums the micro-batch gradients in
            assert set(r["grad_accum_dtypes"]) == {"torch.float32"}, (name, r["grad_accum_dtypes"])
    # DeepSpeed told to cast buffers to bf16 (data_types.buffer_dtype): RoPE's tables are, the router's not
    cast = res["buffer_dtype=bf16"]
    assert cast["rope"] == "torch.bfloat16" and set(cast["router_buffers"].values()) == {"torch.float32"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Z1-bf16", "Z2-bf16"])
def test_micro_batch_gradients_are_summed_in_fp32(runs, name):
    """Step 1's accumulated gradient (2 micro-batches, read before the optimizer step) equals the fp32 sum of
    the per-micro-batch bf16 gradients of a separately built bf16 model, not their bf16 sum."""
    r = runs[0][name]["accum"]
    assert r["n"] > 10_000
    assert r["max_err_vs_fp32_sum"] == 0.0, r
    assert r["differs_from_bf16_sum"] > 0.1 * r["n"], r  # the check can tell the two sums apart


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES_ONE, *CASES_TWO])
def test_checkpoint_holds_the_live_adam_moments(runs, name):
    """The saved optim.exp_avg / exp_avg_sq (and the fp32 masters under bf16), read back from dist/ by
    torch.distributed.checkpoint, equal the optimizer's state at the save, taken out of DeepSpeed's flat
    partitions by the worker; every moment tensor is non-zero."""
    import torch.distributed.checkpoint as dcp

    _, d = runs
    live = torch.load(d / name / "live.pt")
    assert live, name
    want = live
    got = {k: torch.empty_like(v) for k, v in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        dcp.load(got, storage_reader=dcp.FileSystemReader(str(d / name / f"step_{SAVE_AT:08d}" / "dist")),
                 no_dist=True)
    keys = {k.split(".")[1] for k in want}
    assert keys == ({"exp_avg", "exp_avg_sq", "master"} if "bf16" in name else {"exp_avg", "exp_avg_sq"}), keys
    for k, v in want.items():
        assert torch.equal(got[k], v), f"{name} {k}: max diff {(got[k] - v).abs().max()}"
        if not k.startswith("optim.master."):
            assert v.abs().sum() > 0, f"{name} {k} is all zeros"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES_ONE, *CASES_TWO])
def test_load_restores_the_state_and_the_run_continues_bitwise(runs, name):
    """A fresh engine loads the step-2 checkpoint: its optimizer state is the saved one exactly, and steps
    3-4 repeat the losses of the run that never stopped, bit for bit (same layout, deterministic CPU
    kernels, one thread per process)."""
    r = runs[0][name]
    assert r["state_after_load_equal"], name
    assert r["resumed"] == r["loss"][SAVE_AT:], (name, r["resumed"], r["loss"])
    assert all(math.isfinite(x) for x in r["loss"])


@pytest.mark.slow
def test_an_fp32_checkpoint_loads_into_a_bf16_run_with_fresh_masters(runs):
    """A checkpoint without masters (fp32 run) resumed in bf16: BF16_Optimizer's fp32 masters must be the
    loaded weights, else its next step writes the initial weights back into the model."""
    r = runs[0]["fp32->bf16"]
    assert r["optimizer"] == "BF16_Optimizer" and r["n"] > 10_000
    assert r["stale_master_elements"] == 0, r


@pytest.mark.slow
def test_pretrain_trains_in_bf16_and_resumes_bitwise(tmp_path, token_prefix):  # noqa: F811
    """pretrain_loopmoe.py with train.precision=bf16 (ZeRO-1: BF16_Optimizer) on the CPU: the loss falls
    from ln(1024) over 8 steps; stopped at step 4 and resumed, steps 5-8 repeat the uninterrupted losses
    exactly (the CPU kernels are deterministic at a fixed thread count, so no tolerance is needed)."""
    from tests.test_train import metrics, train

    common = ["train.steps=8", "train.log_interval=1", "train.eval_interval=100", "checkpoint.interval=100",
              "model.aux_free_bias=true", "train.precision=bf16", "optim.lr=3e-3", "train.grad_accum=2"]
    out = train(tmp_path / "straight", *token_prefix, *common)
    assert "BF16_Optimizer" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    train(tmp_path / "resumed", *token_prefix, *common, "train.exit_interval=4")
    train(tmp_path / "resumed", *token_prefix, *common)
    straight = {r["step"]: r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in metrics(tmp_path / "resumed") if "loss" in r}
    assert sorted(straight) == sorted(resumed) == list(range(1, 9))
    assert all(math.isfinite(v) for v in straight.values())
    assert max(straight[7], straight[8]) < straight[1] - 0.05, straight  # from ln(1024) = 6.93
    assert resumed == straight  # bitwise: the JSON floats are equal


# ---------------------------------------------------------------------------------------------------
# The worker


def _flat_groups(opt):
    """(params, this rank's flat fp32 partition, its partition group) per group, read from the wrapper's
    public attributes (DeepSpeed 0.19.8), independently of loopmoe/train/zero_state.py."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if isinstance(opt, BF16_Optimizer):
        return list(zip(opt.bf16_groups, opt.fp32_groups_flat_partition, opt.real_dp_process_group))
    return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups, opt.real_dp_process_group))


def _live_state(engine) -> dict[str, torch.Tensor]:
    """{"optim.<key>.<name>": full fp32 tensor} of every trainable parameter: the partitions of each group
    gathered over its partition group and cut at the parameters' sizes in the group's order (the layout
    DeepSpeed flattens them in; padding at the end), expert shards gathered over the world (EP = world in
    these cases). Collective."""
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param

    opt, names = engine.optimizer, {p: n for n, p in engine.module.named_parameters()}
    bf16 = any(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    keys = ("exp_avg", "exp_avg_sq") + (("master",) if bf16 else ())
    out = {}
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0: the plain AdamW
        for p, n in names.items():
            for k in keys:
                out[f"optim.{k}.{n}"] = (p.detach() if k == "master" else opt.state[p][k]).float().clone()
        return out
    for params, flat, group in _flat_groups(opt):
        for k in keys:
            part = flat.detach() if k == "master" else opt.optimizer.state[flat][k]
            parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, part, group=group)
            full, off = torch.cat(parts), 0
            for p in params:
                t = full[off:off + p.numel()].view_as(p).clone()
                off += p.numel()
                if is_moe_param(p):
                    shards = [torch.empty_like(t) for _ in range(dist.get_world_size())]
                    dist.all_gather(shards, t)
                    t = torch.cat(shards)
                out[f"optim.{k}.{names[p]}"] = t
    return out


def _everyone(state: dict) -> dict:
    """The union of every rank's dict (pipeline stages hold different parameters). Collective."""
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, state)
    return {k: v for part in parts for k, v in part.items()}


def _accumulation_check(cfg, layout, module, engine, trainer, batches) -> dict:
    """Step 1 through the trainer, its accumulated gradients captured before the optimizer step, against a
    bf16 copy of the model built from the same seed: per-micro-batch bf16 gradients summed in fp32 and
    in bf16."""
    from deepspeed.utils import safe_get_full_grad

    from loopmoe.train.loop import Callback
    from loopmoe.train.setup import build_model
    from tests.test_parallel_harness import perturb_adaln

    ref = build_model(cfg, layout)
    perturb_adaln(ref)
    ref = ref.to(torch.bfloat16)
    for name, b in ref.named_buffers():  # the engine's model keeps fp32 buffers
        b.data = dict(module.named_buffers())[name].data.clone()
    fp32_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in ref.named_parameters()}
    bf16_sum = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for mb in batches:
        ref.zero_grad(set_to_none=True)
        out = ref(mb["tokens"], labels=mb["labels"], loss_mask=mb["loss_mask"])
        (out.loss / cfg.train.grad_accum).backward()
        for n, p in ref.named_parameters():
            if p.grad is not None:
                fp32_sum[n] += p.grad.float()
                bf16_sum[n] += p.grad
    got = {}

    class Capture(Callback):
        def pre_optim_step(self, trainer):
            got.update({n: safe_get_full_grad(p).float() for n, p in module.named_parameters()})

    trainer.callbacks.append(Capture())
    m = trainer.train_step()
    trainer.callbacks.pop()
    err = max((got[n] - fp32_sum[n]).abs().max().item() for n in fp32_sum)
    differs = sum(int((bf16_sum[n].float() != fp32_sum[n]).sum()) for n in fp32_sum)
    return {"max_err_vs_fp32_sum": err, "differs_from_bf16_sum": differs,
            "n": sum(v.numel() for v in fp32_sum.values())}, m


def _build(name, zero, precision, ep, pp=1, ds_config=None):
    import torch.distributed as dist

    from tests.test_parallel_harness import build_layout, make_config

    world = dist.get_world_size()
    cfg = make_config(1, pp, ep, False, zero, world // pp, steps=STEPS)
    cfg.train.precision, cfg.model.aux_free_bias = precision, True
    if ds_config is not None:
        cfg.train.ds_config = ds_config
    layout, module, engine = build_layout(cfg, world)
    return cfg, layout, module, engine


def _teardown():
    import gc

    from megatron.core import parallel_state as ps

    from loopmoe.parallel.groups import destroy_expert_groups

    gc.collect()
    destroy_expert_groups()
    ps.destroy_model_parallel()


def _describe(module, engine) -> dict:
    opt = engine.optimizer
    acc = []
    if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer's per-group gradient buffers
        acc = sorted({str(t.dtype) for t in opt.fp32_groups_gradients_flat})
    elif hasattr(opt, "gradient_accumulation_dtype"):  # DeepSpeedZeroOptimizer
        acc = [str(opt.gradient_accumulation_dtype)]
    return {"optimizer": type(opt).__name__,
            "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            "router_buffers": {n: str(b.dtype) for n, b in module.named_buffers() if ".router." in n},
            "grad_accum_dtypes": acc}


def _run_case(name, zero, precision, ep, pp, d) -> dict:
    import torch.distributed as dist
    import yaml
    from megatron.core import parallel_state as ps

    from loopmoe.config import to_dict
    from loopmoe.parallel.pipeline import PipelineEvalModel
    from loopmoe.train.checkpoint import Checkpointer
    from loopmoe.train.loop import Trainer
    from tests.test_parallel_harness import micro_batches, rank_batches

    save_dir = os.path.join(d, name)
    cfg, layout, module, engine = _build(name, zero, precision, ep, pp)
    res = _describe(module, engine)
    dp, rank = layout.dp, ps.get_data_parallel_rank()
    stage = module if pp > 1 else None
    trainer = Trainer(cfg, engine, PipelineEvalModel(stage) if stage else module, rank_batches(rank, dp, STEPS), [],
                      layout=layout, stage=stage)
    losses = []
    if precision == "bf16" and dist.get_world_size() == 1:  # step 1, its gradients checked
        res["accum"], m = _accumulation_check(cfg, layout, module, engine, trainer,
                                              micro_batches(STEPS)[:cfg.train.grad_accum])
        trainer.state.step += 1
        losses.append(m["loss"])
    while trainer.state.step < STEPS:
        losses.append(trainer.train_step()["loss"])
        trainer.state.step += 1
        if trainer.state.step == SAVE_AT:
            client = {"step": SAVE_AT, "consumed_samples": SAVE_AT * cfg.train.micro_batch * cfg.train.grad_accum * dp}
            Checkpointer(save_dir).save(engine, SAVE_AT, client, yaml.safe_dump(to_dict(cfg)))
            saved = _everyone(_live_state(engine))
            if dist.get_rank() == 0:
                torch.save(saved, os.path.join(save_dir, "live.pt"))
    res["loss"] = losses
    del trainer, engine, module
    _teardown()

    cfg, layout, module, engine = _build(name, zero, precision, ep, pp)
    first = Checkpointer(save_dir).load(engine)["step"]
    loaded = _everyone(_live_state(engine))
    res["state_after_load_equal"] = (set(loaded) == set(saved)
                                     and all(torch.equal(loaded[k], saved[k]) for k in saved))
    stage = module if pp > 1 else None
    trainer = Trainer(cfg, engine, PipelineEvalModel(stage) if stage else module, rank_batches(rank, dp, STEPS, first),
                      [], layout=layout, stage=stage)
    trainer.state.step = first
    res["resumed"] = []
    while trainer.state.step < STEPS:
        res["resumed"].append(trainer.train_step()["loss"])
        trainer.state.step += 1
    del trainer, engine, module
    _teardown()
    print(f"rank {dist.get_rank()}: {name} {res['optimizer']} losses {res['loss']} resumed {res['resumed']}",
          flush=True)
    return res


def _buffer_cast_case(d) -> dict:
    """An engine told by its JSON to cast buffers to bf16 (DeepSpeed's data_types.buffer_dtype)."""
    with open(os.path.join(ROOT, "ds_configs", "zero1.json")) as f:
        ds = json.load(f)
    ds["data_types"]["buffer_dtype"] = "bf16"
    path = os.path.join(d, "zero1_bf16_buffers.json")
    with open(path, "w") as f:
        json.dump(ds, f)
    _, _, module, engine = _build("buffers", 1, "bf16", 1, ds_config=path)
    res = _describe(module, engine)
    res["rope"] = str(dict(module.named_buffers())["rope_cos"].dtype)
    del engine, module
    _teardown()
    return res


def _fp32_checkpoint_into_bf16(d) -> dict:
    """Z1-fp32's checkpoint (no masters saved) loaded by a bf16 ZeRO-1 engine (BF16_Optimizer): how many
    elements of the fp32 masters do not round to the loaded bf16 weights (0: the masters were refreshed
    from the loaded weights, not left at the initialisation)."""
    from loopmoe.train.checkpoint import Checkpointer

    _, _, module, engine = _build("fp32->bf16", 1, "bf16", 1)
    Checkpointer(os.path.join(d, "Z1-fp32")).load(engine)
    masters = _live_state(engine)
    bad = sum(int((masters[f"optim.master.{n}"].bfloat16() != p.detach()).sum())
              for n, p in module.named_parameters())
    res = {"optimizer": type(engine.optimizer).__name__, "stale_master_elements": bad,
           "n": sum(p.numel() for p in module.parameters())}
    del engine, module
    _teardown()
    return res


def _worker(mode: str, d: str) -> None:
    import torch.distributed as dist

    from tests.test_parallel_harness import init_worker

    init_worker()
    res = {}
    if mode == "one":
        res["buffer_dtype=bf16"] = _buffer_cast_case(d)
    for name, (zero, precision, ep, pp) in (CASES_ONE if mode == "one" else CASES_TWO).items():
        res[name] = _run_case(name, zero, precision, ep, pp, d)
    if mode == "one":
        res["fp32->bf16"] = _fp32_checkpoint_into_bf16(d)
    if dist.get_rank() == 0:
        with open(os.path.join(d, f"{mode}.json"), "w") as f:
            json.dump(res, f)
    from loopmoe.parallel.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
