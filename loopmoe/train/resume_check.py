"""At resume, the new config against the config saved with the checkpoint: before anything is written.

Called by pretrain_loopmoe.py right after the preflight, before the run directory's ``config.yaml`` is
(re)written, so a refused resume leaves the directory describing its own checkpoints. Three classes:

* ``model.*`` fields that change a parameter's shape or meaning (widths, layer counts, experts, the loop,
  IterAdaLN, routing): refused, one line naming the fields and the ways out (``logging.run_dir=NEW`` or
  ``checkpoint.resume=none``). megatron would otherwise fail deep inside the load with a traceback, or
  (a change of meaning with equal shapes, e.g. ``router_score``) load weights that mean something else.
* the schedule (``train.steps``, ``optim.*``): refused unless ``checkpoint.allow_schedule_change=true``:
  the scheduler restarts from the new settings at the resume step (30 -> 60 steps of cosine jumps the LR
  from its end back up), so it is logged loudly with the LR at the resume step before and after.
  Megatron-LM refuses a scheduler mismatch the same way (``--override-opt_param-scheduler``).
* everything else (data, logging, layout, checkpoint cadence, the ``model.*`` fields of RUNTIME_MODEL
  that change how a step is computed, not what a weight is): allowed, changes listed at INFO.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import yaml

from loopmoe.config import Config, ConfigError, OptimConfig, to_dict
from loopmoe.train.optim import lr_at

log = logging.getLogger(__name__)

# model.* fields that may change at resume: kernels, dispatch, capacity, loss coefficients and the init
# (the weights exist already); every other model field changes a parameter's shape or meaning.
RUNTIME_MODEL = frozenset({"linear_backend", "dispatch", "capacity_factor", "lb_loss_coef", "z_loss_coef",
                           "aux_free_rate", "exit_loss_weights", "init_std", "max_seq_len"})
SCHEDULE = (("train", "steps"), ("optim", None))  # (section, key); None = every key of the section


class ResumeConfigError(ConfigError):
    """The new config cannot continue the checkpoint; the message names the fields and the ways out."""


def checkpoint_config(ckpt_dir: str, tag: str | None) -> tuple[str, dict] | None:
    """(step tag, saved config) of the step a resume would load: ``tag`` or the one ``latest`` names;
    None when there is nothing to resume (no ``latest``, no config.yaml in the step)."""
    if tag is None:
        try:
            with open(os.path.join(ckpt_dir, "latest")) as f:
                tag = f.read().strip()
        except FileNotFoundError:
            return None
    path = os.path.join(ckpt_dir, tag, "config.yaml")
    if not tag or not os.path.isfile(path):
        return None
    with open(path) as f:
        return tag, yaml.safe_load(f) or {}


def differences(old: dict, new: dict) -> dict[tuple[str, str], tuple[object, object]]:
    """{(section, key): (old, new)} for every field whose value differs (a field the old config lacks,
    from an older version of the code, counts as unchanged: its default was in force)."""
    out = {}
    for section, values in new.items():
        for key, value in values.items():
            saved = old.get(section, {})
            if key in saved and saved[key] != value:
                out[(section, key)] = (saved[key], value)
    return out


def _is_schedule(section: str, key: str) -> bool:
    return any(section == s and (k is None or k == key) for s, k in SCHEDULE)


def _fmt(diffs) -> str:
    return ", ".join(f"{s}.{k}: {a!r} -> {b!r}" for (s, k), (a, b) in diffs.items())


def _step_of(tag: str) -> int:
    return int(tag.rsplit("_", 1)[-1])


def check_resume_config(cfg: Config, ckpt_dir: str, tag: str | None, allow_schedule_change: bool) -> None:
    """Raise ResumeConfigError when ``cfg`` cannot continue the checkpoint in ``ckpt_dir`` (step ``tag``,
    default: ``latest``); log what changes otherwise. Reads only; writes nothing."""
    if cfg.checkpoint.resume == "none":
        return
    found = checkpoint_config(ckpt_dir, tag)
    if found is None:
        return
    tag, old = found
    diffs = differences(old, to_dict(cfg))
    model = {k: v for k, v in diffs.items() if k[0] == "model" and k[1] not in RUNTIME_MODEL}
    if model:
        raise ResumeConfigError(
            f"{ckpt_dir}/{tag} was trained with another model ({_fmt(model)}): its weights cannot continue "
            f"under this config; train it in a new directory (logging.run_dir=NEW) or start this one afresh "
            f"(checkpoint.resume=none; its old checkpoints are then replaced as new ones are saved)")
    schedule = {k: v for k, v in diffs.items() if _is_schedule(*k)}
    step = _step_of(tag)
    if schedule and not allow_schedule_change:
        raise ResumeConfigError(
            f"{ckpt_dir}/{tag} (step {step}) was trained with another schedule ({_fmt(schedule)}); resuming "
            f"would move the learning rate at step {step} from {lr_before(old, step):.3g} to "
            f"{lr_at(step, cfg.train.steps, cfg.optim):.3g}; say so with checkpoint.allow_schedule_change=true, "
            f"or train in a new directory (logging.run_dir=NEW) or afresh (checkpoint.resume=none)")
    if schedule:
        log.warning("SCHEDULE CHANGED at resume from step %d (checkpoint.allow_schedule_change=true): %s; "
                    "learning rate at step %d: %.4g before, %.4g now", step, _fmt(schedule), step,
                    lr_before(old, step), lr_at(step, cfg.train.steps, cfg.optim))
    rest = {k: v for k, v in diffs.items() if k not in model and k not in schedule}
    if rest:
        log.info("resume from step %d with changed settings: %s", step, _fmt(rest))


def lr_before(old: dict, step: int) -> float:
    """The learning rate the saved run would have used at ``step``."""
    names = {f.name for f in dataclasses.fields(OptimConfig)}
    optim = dataclasses.replace(OptimConfig(), **{k: v for k, v in old.get("optim", {}).items() if k in names})
    return lr_at(step, int(old.get("train", {}).get("steps", 1)), optim)
