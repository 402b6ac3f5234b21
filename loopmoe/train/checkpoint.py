"""Atomic, resumable checkpoints through DeepSpeed's checkpoint API.

Layout of ``checkpoint.dir``::

    step_00000100/      DeepSpeed's files (model, ZeRO optimizer partitions, scheduler, client state)
                        + rng_rank{r}.pt (every rank's RNG states) + config.yaml
    latest              text file naming the newest complete step directory; moved LAST
    .tmp/               where a save is written before its rename; a crash leaves debris only here

A kill -9 at any moment leaves ``latest`` pointing at a complete checkpoint: the step directory is renamed
into place only once every rank has finished writing, and ``latest`` is replaced (write + rename) after.
"""
from __future__ import annotations

import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest"


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


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    def __init__(self, ckpt_dir: str, keep_last: int = 3):
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    def save(self, engine, step: int, client_state: dict, config_yaml: str | None = None) -> str:
        """Collective: every rank calls it. Returns the final directory."""
        tag = step_tag(step)
        tmp_root = os.path.join(self.dir, ".tmp")
        final = os.path.join(self.dir, tag)
        if self.rank == 0:
            shutil.rmtree(os.path.join(tmp_root, tag), ignore_errors=True)
            os.makedirs(tmp_root, exist_ok=True)
        _barrier()
        engine.save_checkpoint(tmp_root, tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), os.path.join(tmp_root, tag, f"rng_rank{self.rank}.pt"))
        if self.rank == 0 and config_yaml is not None:
            _write_atomic(os.path.join(tmp_root, tag, "config.yaml"), config_yaml)
        _barrier()  # every rank's shards are on disk
        if self.rank == 0:
            if os.path.exists(final):  # a re-save of the same step (e.g. a signal right after an interval save)
                shutil.rmtree(final)
            os.replace(os.path.join(tmp_root, tag), final)
            _write_atomic(os.path.join(self.dir, LATEST), tag)
            self._prune()
        _barrier()
        log.info("checkpoint: saved step %d to %s", step, final)
        return final

    def load(self, engine, tag: str | None = None) -> dict | None:
        """Restore model, optimizer, scheduler and this rank's RNG; return the client state (or None)."""
        tag = tag or read_latest(self.dir)
        if tag is None:
            return None
        path, client_state = engine.load_checkpoint(self.dir, tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(self.dir, tag)}")
        rng_file = os.path.join(self.dir, tag, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            log.warning("checkpoint: %s missing (saved with another world size?); RNG not restored", rng_file)
        log.info("checkpoint: resumed from %s (step %s)", path, client_state.get("step"))
        return client_state

    def _prune(self) -> None:
        tags = sorted(t for t in os.listdir(self.dir) if t.startswith("step_"))
        for old in tags[: -self.keep_last]:
            shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)


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
    """(model in eval mode, Config) from a single-layout checkpoint, without process groups.

    Reads the model weights DeepSpeed saved (``mp_rank_00_model_states.pt``, key ``module``) and the
    config saved beside them. The state-dict keys are the same for every linear backend.
    """
    from loopmoe.config import load_config
    from loopmoe.model import LoopMoEModel

    step_dir = resolve_checkpoint(path, tag)
    cfg = load_config(os.path.join(step_dir, "config.yaml"))
    cfg.model.linear_backend = linear_backend
    states = torch.load(os.path.join(step_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    model = LoopMoEModel(cfg.model)
    model.load_state_dict(states["module"])
    return model.eval(), cfg
