"""Transformer Engine's experts in checkpoints and its TP RNG tracker, tested on the CPU (issue 23, deliverable 2;
the alignment and the combine are tests/test_expert_alignment.py):

- The checkpoint's per-expert <-> stacked mapping (train/checkpoint_layout.py), through a STAND-IN of TE's
  ``GroupedLinear`` (a torch module with its parameter layout, ``weight0 .. weight{E-1}`` each [out, in], its
  tensor-parallel marks, and an ``_extra_state`` that grows after the first step, as TE's FP8 state does): it
  tests OUR mapping and wrapper code, not TE. What needs TE itself is the ``gpu``-marked test at the end.

Run as a script it is the torchrun worker of the checkpoint tests: ``python tests/test_te_layout.py MODE DIR``.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import types

import pytest
import torch
from torch import nn


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------
# The checkpoint: TE's per-expert weights in the stacked layout, through a stand-in GroupedLinear


class StandInGroupedLinear(nn.Module):
    """STAND-IN for ``transformer_engine.pytorch.GroupedLinear`` (TE is CUDA-only): the same parameter layout
    (``weight0 .. weight{n-1}``, each [out, in]), the TP marks TE's reset_parameters sets on them, the same
    call ``forward(x, m_splits: list[int])`` with TE's FP8 check (every split a multiple of 16), and an extra
    state (a uint8 tensor, as TE's) that is empty before the first forward and grows after it, as TE's FP8
    scaling history does. Not TE: it lets the CPU test OUR wrapper (layers.py) and checkpoint mapping."""

    def __init__(self, num_gemms, in_features, out_features, bias=False, params_dtype=None, device=None):
        super().__init__()
        assert not bias
        self.num_gemms, self.calls = num_gemms, 0
        for i in range(num_gemms):
            w = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype, device=device))
            w.tensor_model_parallel, w.partition_dim, w.partition_stride = True, 0, 1  # as TE 2.8 marks them
            self.register_parameter(f"weight{i}", w)

    def forward(self, x, m_splits):
        assert len(m_splits) == self.num_gemms and all(m % 16 == 0 for m in m_splits), m_splits
        self.calls += 1
        ws = [getattr(self, f"weight{i}") for i in range(self.num_gemms)]
        return torch.cat([xi @ w.t() for xi, w in zip(x.split(m_splits), ws)])

    def get_extra_state(self) -> torch.Tensor:
        if not self.calls:
            return torch.empty(0, dtype=torch.uint8)
        blob = pickle.dumps({"calls": self.calls, "history": list(range(self.calls))})
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.calls = pickle.loads(state.numpy().tobytes())["calls"] if state.numel() else 0


STAND_IN_TE = types.ModuleType("stand_in_te")  # what layers.py reads of transformer_engine.pytorch
STAND_IN_TE.GroupedLinear = StandInGroupedLinear


def with_te_experts(model):
    """Every MoE's stacked experts replaced by layers.py's TE wrapper around stand-in GroupedLinears (it copies
    the stacked weights and their EP marks)."""
    from loopmoe.model.layers import _te_experts_class
    from loopmoe.model.moe import MoE

    cls = _te_experts_class(STAND_IN_TE)
    for m in model.modules():
        if isinstance(m, MoE):
            m.experts = cls(m.experts)
    return model


def full_tensors(step_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, by its global key, read by torch.distributed.checkpoint in this
    process alone from the files' own metadata (not through train/checkpoint.py)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(os.path.join(step_dir, "dist"))
    md = reader.read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.items()
             if isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(os.path.join(step_dir, "dist")), no_dist=True)
    return state


def object_keys(step_dir: str) -> list[str]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = dcp.FileSystemReader(os.path.join(step_dir, "dist")).read_metadata().state_dict_metadata
    return sorted(k for k, m in md.items() if isinstance(m, BytesStorageMetadata) and k.startswith("model."))


def expected_slice(name: str, moes: dict, full: dict, prefix: str):
    """This rank's piece of ``name`` in the whole checkpoint tensors, worked out here from the MoE's own EP
    rank: a TE weight ``<moe>.experts.fcK.weight{e}`` is expert ep_rank * E_local + e of the stacked
    ``w1`` (K=1) / ``w2`` (K=2), transposed; the stacked ``w1`` / ``w2`` are experts [ep_rank * E_local,
    +E_local); everything else is whole (TP = 1)."""
    import re

    m = re.fullmatch(r"(.*)\.experts\.fc([12])\.weight(\d+)", name)
    if m:
        moe = moes[m.group(1)]
        g = moe.ep_rank * moe.n_local + int(m.group(3))
        return full[f"{prefix}{m.group(1)}.experts.w{m.group(2)}"][g].t()
    m = re.fullmatch(r"(.*)\.experts\.(w[12])", name)
    if m:
        moe = moes[m.group(1)]
        return full[prefix + name][moe.ep_rank * moe.n_local:(moe.ep_rank + 1) * moe.n_local]
    return full[prefix + name]


def compare_with_checkpoint(module, engine, full: dict) -> tuple[int, list[str]]:
    """(tensors checked, names that differ): every parameter and its AdamW moments on this rank against the
    checkpoint's whole tensors, bitwise. Collective under ZeRO (every rank, same order)."""
    import torch.distributed as dist

    from loopmoe.model.moe import MoE
    from loopmoe.train.zero_state import _get_state, link_state

    link_state(engine.optimizer)
    moes = {n: m for n, m in module.named_modules() if isinstance(m, MoE)}
    for m in moes.values():
        m.ep_rank = dist.get_rank(m.ep_group) if m.ep_size > 1 else 0
    checked, bad = 0, []
    for name, p in module.named_parameters():
        for prefix, got in (("model.", p.detach()), ("optim.exp_avg.", _get_state(engine.optimizer, p, "exp_avg")),
                            ("optim.exp_avg_sq.", _get_state(engine.optimizer, p, "exp_avg_sq"))):
            want = expected_slice(name, moes, full, prefix)
            checked += 1
            if want.shape != got.shape or not torch.equal(want, got.to(want.dtype)):
                bad.append(prefix + name)
    return checked, bad


def stand_in_calls(module) -> dict[str, int]:
    return {n: m.calls for n, m in module.named_modules() if isinstance(m, StandInGroupedLinear)}


SAVE_STEP = 2


def _build(ep: int, zero: int, te: bool):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from loopmoe.parallel.groups import create_expert_groups
    from loopmoe.parallel.layout import validate_layout
    from loopmoe.parallel.parallelize import parallelize
    from loopmoe.train.engine import build_engine
    from loopmoe.train.setup import build_model
    from tests.test_parallel_harness import make_config

    world = dist.get_world_size()
    cfg = make_config(1, 1, ep, False, zero, world, steps=SAVE_STEP)
    cfg.train.grad_accum = 1  # one micro-batch per rank and step, whatever the world size
    layout = validate_layout(cfg, world)
    ps.initialize_model_parallel(1, 1)
    if ep > 1:
        create_expert_groups(ep)
    model = build_model(cfg, layout)
    if te:
        with_te_experts(model)
    module = parallelize(model, cfg, layout)
    engine, _, _ = build_engine(module, cfg, layout)
    return cfg, layout, module, engine


def _batches(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    while True:
        t = torch.randint(0, 96, (2, 17), generator=g)
        yield {"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(), "loss_mask": torch.ones(2, 16)}


def _scenario(name: str, ep: int, zero: int, te: bool, d: str, save: str | None = None,
              load: str | None = None) -> dict:
    """Train SAVE_STEP steps and save to d/<save>, or load d/<load>; then compare this rank's parameters and
    AdamW moments with the checkpoint's whole tensors."""
    import torch.distributed as dist
    import yaml
    from megatron.core import parallel_state as ps

    from loopmoe.config import to_dict
    from loopmoe.parallel.groups import destroy_expert_groups
    from loopmoe.train.checkpoint import Checkpointer
    from loopmoe.train.checkpoint_layout import checkpoint_table
    from loopmoe.train.loop import Trainer

    cfg, layout, module, engine = _build(ep, zero, te)
    # (global key, global shape) of what this rank writes: TE's per-expert entries share their stacked key
    out = {"table": sorted(map(list, {(e.key, e.global_shape) for e in checkpoint_table(module)}))}
    if save:
        trainer = Trainer(cfg, engine, module, _batches(dist.get_rank()), [], layout=layout)
        for _ in range(SAVE_STEP):
            trainer.train_step()
            trainer.state.step += 1
        Checkpointer(os.path.join(d, save)).save(engine, SAVE_STEP, {"step": SAVE_STEP, "consumed_samples": 0},
                                                  yaml.safe_dump(to_dict(cfg)))
        src = save
    else:
        Checkpointer(os.path.join(d, load)).load(engine)
        src = load
    step_dir = os.path.join(d, src, f"step_{SAVE_STEP:08d}")
    out["checked"], out["mismatch"] = compare_with_checkpoint(module, engine, full_tensors(step_dir))
    out["calls"] = stand_in_calls(module)
    del engine, module
    destroy_expert_groups()
    ps.destroy_model_parallel()
    return out


def _worker(mode: str, d: str) -> None:
    import torch.distributed as dist

    from loopmoe.parallel.distributed import shutdown
    from tests.test_parallel_harness import init_worker

    init_worker()
    torch.set_num_threads(1)
    res = {}
    if mode == "one":  # world 1: the stacked (megatron) and the TE layout, both at EP 1
        res["S@ep1"] = _scenario("S", 1, 1, False, d, save="S")
        res["A@ep1"] = _scenario("A", 1, 1, True, d, save="A")
    elif mode == "two":  # world 2
        res["B@ep2"] = _scenario("B", 2, 2, True, d, save="B")
        res["B->te@ep2"] = _scenario("B", 2, 1, True, d, load="B")  # same layout: extra state restored
        res["A->te@ep2"] = _scenario("A", 2, 1, True, d, load="A")
        res["A->stacked@ep2"] = _scenario("A", 2, 1, False, d, load="A")
    else:  # world 4
        res["C@ep4"] = _scenario("C", 4, 1, True, d, save="C")
        res["C->te@ep1"] = _scenario("C", 1, 2, True, d, load="C")
        res["C->stacked@ep1"] = _scenario("C", 1, 1, False, d, load="C")
        res["B->te@ep4"] = _scenario("B", 4, 1, True, d, load="B")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, res)
    if dist.get_rank() == 0:
        with open(os.path.join(d, f"{mode}.json"), "w") as f:
            json.dump(everyone, f)
    shutdown()


@pytest.fixture(scope="module")
def ckpt_runs(tmp_path_factory):
    """3 launches (1, 2 and 4 gloo processes). ~2-4 min on 2 busy CPU cores."""
    from tests.test_parallel_harness import launch

    d = tmp_path_factory.mktemp("te_ckpt")
    me = os.path.abspath(__file__)
    for mode, n in (("one", 1), ("two", 2), ("four", 4)):
        launch(me, [mode, str(d)], n, timeout=900)
    res = {}
    for mode in ("one", "two", "four"):
        for rank, r in enumerate(json.loads((d / f"{mode}.json").read_text())):
            for k, v in r.items():
                res[(k, rank)] = v
    return res, d


@pytest.mark.slow
def test_te_experts_have_the_stacked_key_layout(ckpt_runs):
    """The TE layout's table (key, global shape) is the stacked backend's, at EP 1/2/4; so are the tensors in
    the checkpoint files; the TE checkpoint adds only the extra-state objects, per EP rank."""
    res, d = ckpt_runs
    stacked = res[("S@ep1", 0)]["table"]
    assert any(k.endswith(".experts.w1") for k, _ in stacked)
    for run in ("A@ep1", "B@ep2", "C@ep4", "A->stacked@ep2", "C->stacked@ep1"):
        for rank in range(4):
            if (run, rank) in res:
                assert res[(run, rank)]["table"] == stacked, (run, rank)
    step = f"step_{SAVE_STEP:08d}"
    shapes = {name: {k: tuple(v.shape) for k, v in full_tensors(str(d / name / step)).items()}
              for name in ("S", "A", "B", "C")}
    assert any(k.startswith("optim.exp_avg.") and k.endswith(".experts.w1") for k in shapes["S"])
    for name in ("A", "B", "C"):
        assert shapes[name] == shapes["S"], name
    assert object_keys(str(d / "S" / step)) == []
    ep4 = [k for k in object_keys(str(d / "C" / step)) if ".experts.fc1." in k]
    layer = ep4[0].split("/")[0]
    assert sorted(k for k in ep4 if k.startswith(layer + "/")) == [f"{layer}/shard_0.{r}_1.4" for r in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["S@ep1", "A@ep1", "B@ep2", "C@ep4"])
def test_saved_experts_sit_at_their_ep_offsets(ckpt_runs, run):
    """Right after the save, every rank's weights and AdamW moments (TE: per expert, transposed) equal the
    checkpoint's whole tensors at the expert index worked out from the rank's EP rank: no rank's experts lost."""
    res, _ = ckpt_runs
    ranks = [r for r in range(4) if (run, r) in res]
    assert len(ranks) == {"S@ep1": 1, "A@ep1": 1, "B@ep2": 2, "C@ep4": 4}[run]
    for r in ranks:
        out = res[(run, r)]
        assert out["checked"] > 0 and out["mismatch"] == [], (run, r, out["mismatch"])
        if run != "S@ep1":  # the stand-ins ran (and checked every split % 16)
            assert out["calls"] and min(out["calls"].values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("run", ["B->te@ep2", "A->te@ep2", "A->stacked@ep2", "C->te@ep1", "C->stacked@ep1",
                                 "B->te@ep4"])
def test_load_under_another_ep_or_backend_is_bit_exact(ckpt_runs, run):
    """Loaded weights and AdamW moments equal the checkpoint's whole tensors bitwise, under another EP size
    and into the stacked backend; the extra state comes back on the same layout only (else fresh)."""
    res, _ = ckpt_runs
    ranks = [r for r in range(4) if (run, r) in res]
    assert ranks
    for r in ranks:
        out = res[(run, r)]
        assert out["checked"] > 0 and out["mismatch"] == [], (run, r, out["mismatch"])
    if run == "B->te@ep2":  # same TP x EP: every stand-in's extra state as saved
        for r in ranks:
            assert res[(run, r)]["calls"] == res[("B@ep2", r)]["calls"] and min(res[(run, r)]["calls"].values()) > 0
    elif "->te" in run:  # another layout: fresh
        for r in ranks:
            assert set(res[(run, r)]["calls"].values()) == {0}, res[(run, r)]["calls"]


@pytest.mark.slow
def test_the_torch_backend_reads_a_te_checkpoint(ckpt_runs):
    """load_trained_model (torch backend, one process) reads the EP4 TE checkpoint into the stacked experts,
    equal to the checkpoint's whole tensors."""
    from loopmoe.train.checkpoint import load_trained_model

    _, d = ckpt_runs
    model, _ = load_trained_model(str(d / "C"))
    full = full_tensors(str(d / "C" / f"step_{SAVE_STEP:08d}"))
    sd = model.state_dict()
    assert any(k.endswith(".experts.w1") for k in sd)
    for k, v in sd.items():
        assert torch.equal(v, full[f"model.{k}"]), k


# ---------------------------------------------------------------------------------------------------
# TP > 1 with TE: megatron's model-parallel RNG tracker


def test_te_linear_at_tp2_without_the_tracker_is_a_clear_error():
    """TE draws its TP shards in megatron's "model-parallel-rng" state: unseeded, layers.py says which call
    seeds it (instead of TE's "model-parallel-rng is not added" deep inside the model build)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from loopmoe.model.layers import _require_tp_rng_tracker

    tracker = get_cuda_rng_tracker()
    states = tracker.get_states()  # an earlier test of this process may have seeded it: test an unseeded one
    tracker.reset()
    try:
        with pytest.raises(RuntimeError, match=r"seed_model_parallel_rng\(seed\)"):
            _require_tp_rng_tracker()
    finally:
        tracker.set_states(states)


def test_seeding_the_tracker_is_a_no_op_on_the_cpu(single_process_group):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from loopmoe.parallel.distributed import seed_model_parallel_rng

    if torch.cuda.is_available():
        pytest.skip("the CPU path; the GPU test below covers CUDA")
    assert seed_model_parallel_rng(7) is False
    assert "model-parallel-rng" not in get_cuda_rng_tracker().get_states()


@pytest.mark.gpu
def test_seeding_the_tracker_on_cuda(single_process_group):
    """After the groups exist, seed_model_parallel_rng adds megatron's TP state, which TE forks."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (megatron's tracker holds CUDA generator states)")
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from loopmoe.model.layers import _require_tp_rng_tracker
    from loopmoe.parallel.distributed import seed_model_parallel_rng

    assert seed_model_parallel_rng(7) is True
    assert "model-parallel-rng" in get_cuda_rng_tracker().get_states()
    _require_tp_rng_tracker()  # no error once seeded


# ---------------------------------------------------------------------------------------------------
# What needs Transformer Engine itself


@pytest.mark.gpu
def test_real_te_experts_layout_fp8_alignment_and_extra_state(single_process_group, monkeypatch):
    """With TE on a GPU: the real GroupedLinear has the layout the stand-in copies; the wrapper's table equals
    the stacked experts'; FP8 runs with per-expert counts that are not multiples of 16 (group_rows pads
    every split, the last included); after an FP8 step the extra state is a non-empty object that a fresh
    module takes back (TE >= 2.18 asks for NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 to unpickle it)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU with Transformer Engine")
    te = pytest.importorskip("transformer_engine.pytorch", reason="needs Transformer Engine (CUDA)")
    from loopmoe.model.layers import Linears
    from loopmoe.model.moe import MoE
    from loopmoe.train.checkpoint_layout import checkpoint_table, extra_state_objects
    from tests.test_grouped_experts import cfg_, make_moe

    kw = dict(d_model=128, expert_hidden=64, n_experts=8)
    torch.manual_seed(0)
    with torch.device("cuda"):
        moe_te = MoE(cfg_(linear_backend="te", **kw), Linears(cfg_(linear_backend="te", **kw)), out_std=0.1)
    ref = make_moe(**kw).cuda()
    w0 = moe_te.experts.fc1.weight0
    assert w0.shape == (128, 128) and w0.tensor_model_parallel is False  # [2h, d] = [out, in]; unmarked
    table = lambda m: {(e.key, e.global_shape) for e in checkpoint_table(m)}  # noqa: E731
    assert table(moe_te) == table(ref)
    counts = torch.tensor([0, 37, 5, 0, 64, 1, 0, 19], device="cuda")  # the last group: 19 rows
    x = torch.randn(int(counts.sum()), 128, device="cuda")
    with te.fp8_autocast(enabled=True):
        y = moe_te.experts(x, counts)
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    objs = extra_state_objects(moe_te)
    state = objs["model.experts.fc1._extra_state"].data
    assert isinstance(state, torch.Tensor) and state.numel() > 0
    monkeypatch.setenv("NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE", "1")
    torch.manual_seed(0)
    with torch.device("cuda"):
        fresh = MoE(cfg_(linear_backend="te", **kw), Linears(cfg_(linear_backend="te", **kw)), out_std=0.1)
    assert fresh.experts.fc1.get_extra_state().numel() == 0
    fresh.experts.fc1.set_extra_state(state)
    back = pickle.loads(fresh.experts.fc1.get_extra_state().numpy().tobytes())
    saved = pickle.loads(state.numpy().tobytes())
    for k in ("scale_fwd", "amax_history_fwd"):
        torch.testing.assert_close(back[k], saved[k], rtol=0, atol=0)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    _worker(sys.argv[1], sys.argv[2])
