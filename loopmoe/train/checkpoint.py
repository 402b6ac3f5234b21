"""Atomic, resumable, layout-independent checkpoints (megatron-core ``dist_checkpointing``).

(This file: the step directory protocol, save, load and the weights-only reader. What each tensor is saved
as -- global key, shape, shard offsets, TE's per-expert weights as slices of the stacked ones -- is
checkpoint_layout.py; integrity is checkpoint_integrity.py; the optimizer state accessors zero_state.py.)

Layout of ``checkpoint.dir``::

    step_00000100/
      dist/             megatron-core dist_checkpointing (torch_dist): every tensor under its GLOBAL name
                        and shape, written as shards with global offsets by the ranks that own them
      rng_rank{r}.pt    every rank's RNG states
      config.yaml       the run's resolved config
      manifest.json     size and blake2b digest of every file above; written last, inside the step, so it
                        is renamed into place with it (see verify_step)
    latest              text file naming the newest complete step directory; moved LAST
    .tmp/               where a save is written before its rename; a crash leaves debris only here

A kill -9 at any moment leaves ``latest`` pointing at a complete checkpoint: the step directory is renamed
into place only once every rank has finished writing, and ``latest`` is replaced (write + rename) after.

What is saved, and what reshards (save under one TP/PP/EP/DP/ZeRO layout, load under any other):

| key in dist/                      | content                                             | sharded by            |
|-----------------------------------|-----------------------------------------------------|-----------------------|
| ``model.<name>``                  | parameters and persistent buffers (router bias)     | TP dim, EP expert dim |
| ``optim.exp_avg.<name>``          | AdamW first moment, per parameter                   | same as the parameter |
| ``optim.exp_avg_sq.<name>``       | AdamW second moment, per parameter                  | same as the parameter |
| ``optim.master.<name>``           | fp32 master weight (only when the model is not fp32)| same as the parameter |
| ``model.<module>._extra_state``   | a module's extra state as an object (TE's FP8 scaling history) | one per TP x EP rank |
| common (rank 0)                   | AdamW step, scheduler position, engine counters, client state (step, consumed samples) | - |

One key layout for every linear backend. TE keeps the routed experts one matrix per expert
(``<experts>.fc1.weight{e}`` [2h, d], ``fc2.weight{e}`` [d, h]: GroupedLinear's [out, in]); they are written
as the expert-``e`` slices of the stacked ``model.<experts>.w1`` [E_global, d, 2h] / ``w2`` [E_global, h, d]
that the torch and megatron backends hold (transposed, at global expert ep_rank * E_local + e), with their
optimizer state the same way (``ExpertSlot``, ``checkpoint_table``). So a checkpoint moves between backends
and EP layouts. The extra state is an object whose size changes with the FP8 recipe's state (TE's is empty
before the first FP8 step), saved per TP x EP rank and restored on the same TP / EP sizes; under other sizes,
or from a backend without it, the module keeps its fresh state (a warning says so).

Names are the full model's (a pipeline stage keeps them), shapes global (TP shards are cut along
megatron's ``partition_dim``, EP shards along the expert dimension), so every layout reads the same keys
and megatron reshards on load. The optimizer state is taken out of DeepSpeed per parameter: under ZeRO-1/2
each parameter's fragment of the flat fp32 partition (``param._hp_mapping``) is summed over the partition
group (zeros elsewhere) into the parameter's full state; loading writes each rank's fragment back. The
scheduler is restored by position (its lambda recomputes every group's learning rate), so a layout with
other optimizer groups (EP splits the experts into their own) loads too. Same layout: bitwise resume.
Precision: fp32 (any ZeRO stage) and bf16 with ZeRO 1/2; DeepSpeed's bf16 ZeRO-0 optimizer is not handled.

``load_trained_model`` reads the model weights without process groups (torch.distributed.checkpoint,
single process) into the full unsharded model, whatever layout wrote them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from loopmoe.train.checkpoint_integrity import (  # noqa: F401  (re-exported: the checkpoint API in one name)
    LATEST,
    MANIFEST,
    CheckpointError,
    _step_of,
    _write_atomic,
    _write_manifest,
    file_digest,
    resolve_resume,
    verify_step,
)
from loopmoe.train.checkpoint_layout import checkpoint_table, extra_state_objects, present_objects, restore_extra_states
from loopmoe.train.zero_state import (_OPT_KEYS, _get_state, _optimizer_step, _set_state, finish_load, link_state,
                                      refresh_master)

log = logging.getLogger(__name__)

DIST = "dist"
FORMAT = "loopmoe-dist-1"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_dir: str) -> str | None:
    """The tag ``latest`` points at, if it names a complete checkpoint directory."""
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        tag = f.read().strip()
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which is not in {ckpt_dir}: the checkpoint directory was "
                                "edited by hand; point latest at an existing step_* directory")
    return tag


# ---------------------------------------------------------------------------------------------------
# Save workers die with their trainer
#
# megatron's torch_dist save forks one writer process per file (FileSystemWriterAsync, even for a
# synchronous save) and, on first use, starts a multiprocessing Manager (a spawn child, with its resource
# tracker) for the writers' results. After a kill -9 of the trainer both lived on with parent 1: a writer
# kept writing into the step directory a restarted job reads, the Manager never exited. So: the results
# queue is a plain in-process queue (the synchronous save puts and gets it in this process; no Manager),
# and every process forked during a save asks the kernel for SIGKILL when the trainer dies.

_saving_pid: int | None = None  # the trainer's pid while it runs dist_checkpointing.save


def _writer_dies_with_trainer() -> None:
    """Runs in every child forked during a save (os.register_at_fork)."""
    global _saving_pid
    parent, _saving_pid = _saving_pid, None  # a grandchild is not a save writer
    if parent is None:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL (Linux)
    except (OSError, AttributeError):
        pass  # not Linux: the liveness check below is all there is
    if os.getppid() != parent:  # the trainer died between fork and prctl
        os._exit(1)


_fork_hook_installed = False


@contextlib.contextmanager
def _save_workers_die_with_trainer():
    global _saving_pid, _fork_hook_installed
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()  # instead of mp.get_context("spawn").Manager().Queue()
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_writer_dies_with_trainer)
        _fork_hook_installed = True
    _saving_pid = os.getpid()
    try:
        yield
    finally:
        _saving_pid = None


# ---------------------------------------------------------------------------------------------------
# The sharded state dict


def sharded_state_dict(engine, with_optimizer: bool = True) -> dict:
    module, opt = engine.module, engine.optimizer
    master = with_optimizer and any(p.dtype != torch.float32 for p in module.parameters())
    sd = {}
    if with_optimizer:
        link_state(opt)  # once: every parameter's fragment of the flat fp32 state
    for e in checkpoint_table(module):
        sd[f"model.{e.name}"] = e.sharded("model.", e.tensor)
        if with_optimizer and isinstance(e.tensor, torch.nn.Parameter) and e.tensor.requires_grad:
            for key in _OPT_KEYS + ((None,) if master else ()):
                pre = f"optim.{key or 'master'}."
                sd[pre + e.name] = e.sharded(pre, _get_state(opt, e.tensor, key))
    sd.update(extra_state_objects(module))
    return sd


class Checkpointer:
    def __init__(self, ckpt_dir: str, keep_last: int = 3):
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def save(self, engine, step: int, client_state: dict, config_yaml: str | None = None) -> str:
        """Collective: every rank calls it. Returns the final directory; CheckpointError when the files
        cannot be written (the previous checkpoint stays the one ``latest`` names)."""
        tag = step_tag(step)
        work = os.path.join(self.dir, ".tmp", tag)
        from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

        try:
            return self._save(engine, step, tag, work, client_state, config_yaml)
        except (Exception, CheckpointException) as e:
            # A full disk, a quota, a lost mount: torch's writer reports a short write as a RuntimeError
            # ("unexpected pos"), not an OSError, so every failure is named here; `latest` was not touched.
            if isinstance(e, CheckpointException):  # megatron's wrapper of the writers' failures
                e = next(iter(e.failures.values()))[0] if e.failures else e  # {rank: (exception, trace)}
            log.debug("checkpoint: saving step %d failed", step, exc_info=True)
            if self.rank == 0:
                shutil.rmtree(work, ignore_errors=True)  # debris only
            previous = read_latest(self.dir)
            free = shutil.disk_usage(self.dir).free / 2**30
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint: saving step {step} failed ({type(e).__name__}: {why}; {free:.1f} GiB free in "
                f"{self.dir}); " + (f"the previous checkpoint {os.path.join(self.dir, previous)} is intact"
                                   if previous else "no earlier checkpoint exists") +
                "; free space (or fix the file system) and resume") from e

    def _save(self, engine, step: int, tag: str, work: str, client_state: dict, config_yaml: str | None) -> str:
        from megatron.core import dist_checkpointing

        from loopmoe.parallel.megatron_cpu_adapter import cuda_to_cpu

        final = os.path.join(self.dir, tag)
        if self.rank == 0:
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(os.path.join(work, DIST))
        _barrier()
        sd = sharded_state_dict(engine)
        sd["common"] = {
            "format": FORMAT, "client_state": client_state, "optimizer_step": _optimizer_step(engine.optimizer),
            "scheduler": {k: engine.lr_scheduler.state_dict()[k] for k in ("last_epoch", "_step_count")},
            "engine": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")},
            "has_master": any(k.startswith("optim.master.") for k in sd),
        }
        with cuda_to_cpu(), _save_workers_die_with_trainer():
            dist_checkpointing.save(sd, os.path.join(work, DIST))
        torch.save(rng_state(), os.path.join(work, f"rng_rank{self.rank}.pt"))
        if self.rank == 0 and config_yaml is not None:
            _write_atomic(os.path.join(work, "config.yaml"), config_yaml)
        _barrier()  # every rank's shards are on disk
        _write_manifest(work, self.rank)
        if self.rank == 0:
            if os.path.exists(final):  # a re-save of the same step (e.g. a signal right after an interval save)
                shutil.rmtree(final)
            os.replace(work, final)
            _write_atomic(os.path.join(self.dir, LATEST), tag)
            self._prune()
        _barrier()
        log.info("checkpoint: saved step %d to %s", step, final)
        return final

    def load(self, engine, tag: str | None = None, verify: bool = True) -> dict | None:
        """Restore model, optimizer, scheduler and this rank's RNG; return the client state (or None).
        The checkpoint may come from any TP/PP/EP/DP/ZeRO layout. ``verify``: check the manifest first
        (pretrain_loopmoe.py has already, in its preflight)."""
        tag = tag or read_latest(self.dir)
        if tag is None:
            return None
        path = os.path.join(self.dir, tag)
        if verify and (damage := verify_step(path)) is not None:
            raise CheckpointError(f"checkpoint step {_step_of(tag)} in {self.dir} is damaged: {damage}")
        if not os.path.isdir(os.path.join(path, DIST)):
            return load_weights_only(engine, path)
        common = load_checkpoint_state(engine, path)
        rng_file = os.path.join(path, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("checkpoint: %s missing (saved with another world size?); RNG not restored", rng_file)
        client_state = common["client_state"]
        log.info("checkpoint: resumed from %s (step %s)", path, client_state.get("step"))
        return client_state

    def _prune(self) -> None:
        tags = sorted(t for t in os.listdir(self.dir) if t.startswith("step_"))
        for old in tags[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)


@torch.no_grad()
def load_checkpoint_state(engine, step_dir: str) -> dict:
    """Load model weights, optimizer state, scheduler position and engine counters into ``engine`` (any
    layout) from ``step_dir``; returns the common state."""
    from megatron.core import dist_checkpointing

    from loopmoe.parallel.megatron_cpu_adapter import cuda_to_cpu

    d = os.path.join(step_dir, DIST)
    common = dist_checkpointing.load_common_state_dict(d)["common"]
    if common.get("format") != FORMAT:
        raise RuntimeError(f"{d}: checkpoint format {common.get('format')!r}, expected {FORMAT!r}")
    module, opt = engine.module, engine.optimizer
    table = checkpoint_table(module)
    sd = {}
    for e in table:
        sd[f"model.{e.name}"] = e.sharded("model.", torch.empty_like(e.tensor))
        if isinstance(e.tensor, torch.nn.Parameter) and e.tensor.requires_grad:
            for key in _OPT_KEYS + ((None,) if common["has_master"] else ()):
                pre = f"optim.{key or 'master'}."
                sd[pre + e.name] = e.sharded(pre, torch.empty_like(e.tensor, dtype=torch.float32))
    objs, no_extra = present_objects(extra_state_objects(module), d)
    sd.update(objs)
    with cuda_to_cpu():
        try:
            loaded = dist_checkpointing.load(sd, d)
        except (EOFError, pickle.UnpicklingError) as e:  # a damaged file in a step without a manifest
            raise CheckpointError(f"{d}: cannot read the checkpoint ({type(e).__name__}: {e}); a file is "
                                  "damaged; resume from an earlier step_* directory") from e
    step = float(common["optimizer_step"])
    for e in table:
        e.tensor.data.copy_(e.from_ckpt(loaded[f"model.{e.name}"]))
    if not common["has_master"]:  # an fp32 checkpoint: the loaded weights are the masters
        refresh_master(opt)
    link_state(opt, step)  # once; a fresh optimizer's AdamW state is created at the loaded step
    done = set()  # a tied parameter's state once
    for e in table:
        p = e.tensor
        if not isinstance(p, torch.nn.Parameter) or not p.requires_grad or id(p) in done:
            continue
        done.add(id(p))
        if common["has_master"]:
            _set_state(opt, p, None, e.from_ckpt(loaded[f"optim.master.{e.name}"]), step)
        for key in _OPT_KEYS:
            _set_state(opt, p, key, e.from_ckpt(loaded[f"optim.{key}.{e.name}"]), step)
    restore_extra_states(module, loaded, no_extra)
    finish_load(opt, step)  # every AdamW state at the loaded step, also partitions with no fragment here
    sched = engine.lr_scheduler
    sched.last_epoch = common["scheduler"]["last_epoch"]
    sched._step_count = common["scheduler"]["_step_count"]
    lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs
    for k in ("global_steps", "global_samples", "skipped_steps"):
        setattr(engine, k, common["engine"][k])
    # micro-steps count this layout's accumulation (another layout may accumulate over other DP sizes)
    engine.micro_steps = engine.global_steps * engine.gradient_accumulation_steps()
    return common


def load_weights_only(engine, step_dir: str) -> dict:
    """Start from a weights-only checkpoint (``mp_rank_00_model_states.pt``: the older DeepSpeed format, or
    ``python -m loopmoe.export.to_training`` from a Hugging Face folder): the full state dict is cut into this
    rank's TP / EP / PP shards; the optimizer starts fresh, the scheduler at the file's step."""
    f = os.path.join(step_dir, "mp_rank_00_model_states.pt")
    if not os.path.exists(f):
        raise FileNotFoundError(f"{step_dir}: neither {DIST}/ (a Checkpointer checkpoint) nor {os.path.basename(f)} "
                                "(weights only)")
    states = torch.load(f, map_location="cpu", weights_only=False)
    full = states["module"]
    with torch.no_grad():
        for e in checkpoint_table(engine.module):
            w = full[e.key]  # the full tensor (the stacked one for a per-expert weight)
            for axis, rank, n in e.offsets:
                w = w.chunk(n, dim=axis)[rank]
            e.tensor.data.copy_(e.from_ckpt(w))
    refresh_master(engine.optimizer)  # the masters are the loaded weights
    step = int(states.get("step", states.get("global_steps", 0)) or 0)
    sched = engine.lr_scheduler
    for _ in range(step):  # the schedule's position; the optimizer state is new
        sched.step()
    engine.global_steps = step
    engine.micro_steps = step * engine.gradient_accumulation_steps()
    log.warning("checkpoint: %s holds weights only; the optimizer state starts fresh (step %d)", step_dir, step)
    return {"step": step, "consumed_samples": int(states.get("consumed_samples", 0) or 0)}


def resolve_checkpoint(path: str, tag: str | None = None) -> str:
    """A run's checkpoint directory (uses ``latest``) or one step directory -> the step directory."""
    if os.path.exists(os.path.join(path, "config.yaml")) and os.path.basename(path.rstrip("/")).startswith("step_"):
        return path
    tag = tag or read_latest(path)
    if tag is None:
        raise FileNotFoundError(f"{path}: no 'latest' file and no step_* directory given; pass a checkpoint "
                                "directory written by pretrain_loopmoe.py (or one of its step_* folders)")
    return os.path.join(path, tag)


def load_trained_model(path: str, tag: str | None = None, linear_backend: str = "torch"):
    """(the FULL unsharded model in eval mode, Config) from a checkpoint of any layout, without process
    groups: the weights are read from ``dist/`` by torch.distributed.checkpoint in this process alone
    (it reassembles TP/EP/PP shards by their global offsets). The state-dict keys are the same for every
    linear backend. Older DeepSpeed-format checkpoints (``mp_rank_00_model_states.pt``) still load."""
    from loopmoe.config import load_config
    from loopmoe.model import LoopMoEModel

    step_dir = resolve_checkpoint(path, tag)
    if (damage := verify_step(step_dir)) is not None:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {damage}; pass an earlier step_* directory")
    cfg = load_config(os.path.join(step_dir, "config.yaml"))
    cfg.model.linear_backend = linear_backend
    model = LoopMoEModel(cfg.model)
    if os.path.isdir(os.path.join(step_dir, DIST)):
        import warnings

        import torch.distributed.checkpoint as dcp

        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        # extra states (TE's FP8 history) are per-rank objects, not weights: the model keeps its own
        extra = {k: state.pop(k) for k in list(state) if k.endswith("._extra_state")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
            dcp.load(state, storage_reader=dcp.FileSystemReader(os.path.join(step_dir, DIST)), no_dist=True)
        model.load_state_dict({k[len("model."):]: v for k, v in {**state, **extra}.items()})
    else:
        states = torch.load(os.path.join(step_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)
        model.load_state_dict(states["module"])
    return model.eval(), cfg
