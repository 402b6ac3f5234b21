"""No avoidable host synchronisation on the training step (forward + backward of the model).

On a GPU every op that needs a device value on the host (``.item()``, ``.tolist()``, ``float()``,
``bool()`` of a tensor, ``nonzero``, boolean-mask indexing, ``bincount``, ``repeat_interleave``
without ``output_size``, ``unique``) stalls the CPU until the GPU has caught up. On the CPU proxy
below every aten op of the step is recorded (a TorchDispatchMode sees the backward too) and those
that would synchronise on CUDA are counted, with Python-level ``Tensor.tolist`` patched as well
(it reads memory directly, without an aten op). The GPU-marked test asks CUDA itself
(``torch.cuda.set_sync_debug_mode``).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loopmoe.config import load_config
from loopmoe.model import LoopMoEModel

pytestmark = pytest.mark.usefixtures("one_thread")

# aten ops that read a device value on the host (or size their output from device data) on CUDA.
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique", "_unique2",
           "unique_consecutive", "unique_dim", "equal", "is_nonzero", "allclose"}


class SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNCING:
            self.syncs.append(func.__name__)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and (
                len(args) < 4 or args[3] is None) and isinstance(args[0], torch.Tensor) and args[0].dim() == 1 \
                and args[0].dtype != torch.bool and func.__name__.startswith("repeat_interleave.Tensor"):
            self.syncs.append("repeat_interleave without output_size")
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.syncs.append(f"{func.__name__} with a boolean mask")
        return func(*args, **kwargs)


def count_syncs(fn, monkeypatch) -> list[str]:
    rec = SyncRecorder()
    orig = torch.Tensor.tolist

    def tolist(t):
        rec.syncs.append("Tensor.tolist")
        return orig(t)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with rec:
        fn()
    monkeypatch.setattr(torch.Tensor, "tolist", orig)
    return rec.syncs


def step_fn(overrides):
    cfg = load_config("configs/tiny_loopmoe.yaml", ["model.linear_backend=torch", *overrides]).model
    torch.manual_seed(0)
    model = LoopMoEModel(cfg).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 32), generator=g)
    mask = torch.ones(2, 32)
    mask[0, :5] = 0

    def step():
        out = model(tokens, labels=labels, loss_mask=mask)
        out.loss.backward()
        model.update_router_biases()
    return step


def test_the_recorder_sees_the_syncs_it_claims(monkeypatch):
    """The proxy can fail: each kind of sync it looks for is caught (so a clean step means something)."""
    def syncing():
        x = torch.arange(6.0, requires_grad=True)
        _ = x.sum().item(), x[x > 2], torch.bincount(torch.tensor([1, 2])), x.nonzero()
        _ = torch.tensor([1, 2]).repeat_interleave(torch.tensor([2, 1])), bool(x.sum() > 0)
        _ = torch.tensor([3, 4]).tolist(), float(x.max())
    found = count_syncs(syncing, monkeypatch)
    for kind in ("_local_scalar_dense", "index.Tensor with a boolean mask", "bincount", "nonzero",
                 "repeat_interleave without output_size", "Tensor.tolist"):
        assert any(kind in s for s in found), (kind, found)


@pytest.mark.parametrize("overrides", [[], ["model.aux_free_bias=true", "model.exit_loss_weights=[0.3]"],
                                       ["model.n_loop=0", "model.loop_iters=1", "model.n_prelude=2"]],
                         ids=["loopmoe", "aux-free bias + early-exit loss", "vanilla"])
def test_training_step_has_no_host_sync(overrides, monkeypatch):
    """Forward, loss, backward and the aux-free bias update at EP=1: not one synchronising op."""
    step = step_fn(overrides)
    step()  # first call outside the recorder: lazy initialisation is not the step
    assert count_syncs(step, monkeypatch) == []


@pytest.mark.gpu
def test_training_step_has_no_host_sync_on_cuda():
    """CUDA's own check: any synchronising call in the step raises."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = load_config("configs/tiny_loopmoe.yaml", ["model.linear_backend=torch"]).model
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LoopMoEModel(cfg).train().to(torch.bfloat16)
        tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    model(tokens, labels=tokens).loss.backward()  # warm-up (cuBLAS handles, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(tokens, labels=tokens).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
