"""Every input of a training run checked at start-up, before process groups, the model or the engine exist;
the checkpoint to resume from right after the process group exists (its digests split across the ranks).

    pretrain_loopmoe.py: cfg = load_config(...); layout = validate_layout(...); preflight(cfg, layout, resume=False)
                         init_distributed(...); resume = check_resume(cfg)   # collective, every rank

A run that would fail on a missing data file, a truncated ``.idx``, a tokenizer that does not fit the model,
an unreadable DeepSpeed config or a damaged checkpoint fails here in a second, with one line naming the
file or field and the fix (``PreflightError``, a ``ConfigError``: exit code 2, no traceback), instead of
minutes later as a traceback once every rank has built its model. Every rank runs the same checks on the
same files, so every rank stops (none is left waiting for a peer in a collective). The checkpoint check is
the exception: reading a whole step on every rank costs TBs per requeue at 9B, so each rank digests its
share and one all_gather gives every rank the same verdict (checkpoint_integrity.check_step).
"""
from __future__ import annotations

import os

import torch.distributed as dist

from loopmoe.config import Config, ConfigError


class PreflightError(ConfigError):
    """An input of the run (data, tokenizer, DeepSpeed config, checkpoint) is missing or wrong."""


def check_tokenizer_file(cfg: Config) -> tuple[int, int]:
    """(vocab size, EOD id) of data.tokenizer_model, read with sentencepiece alone (no megatron import)."""
    path = cfg.data.tokenizer_model
    if not path:
        raise PreflightError("data.tokenizer_model is empty; give the sentencepiece .model that made the token "
                             "files (its end-of-document id is needed to build samples)")
    if not os.path.isfile(path):
        raise PreflightError(f"data.tokenizer_model={path!r}: no such file; give the sentencepiece .model made by "
                             "data_tools/train_tokenizer.py")
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise PreflightError(f"data.tokenizer_model={path!r}: not a sentencepiece model ({str(e).splitlines()[0]}); "
                             "give the .model file, not the .vocab") from None
    vocab, eod = sp.get_piece_size(), sp.eos_id()
    if vocab > cfg.model.vocab_size:
        raise PreflightError(f"the tokenizer {path} has {vocab} tokens but model.vocab_size={cfg.model.vocab_size}; "
                             f"set model.vocab_size={vocab} (or more)")
    if not 0 <= eod < vocab:
        raise PreflightError(f"the tokenizer {path} has no end-of-document (eos) piece (eos_id={eod}); retrain it "
                             "with data_tools/train_tokenizer.py, which keeps eos")
    return vocab, eod


def check_data(cfg: Config, tokenizer_vocab: int) -> None:
    """Every data prefix: .bin and .idx exist, the .idx header and sizes agree with the .bin
    (loopmoe.data.indexed.validate_prefix), token ids (sampled) fit the tokenizer."""
    from loopmoe.data.indexed import IndexedDataError, check_token_ids, validate_prefix

    if not cfg.data.prefixes:
        raise PreflightError("data.prefixes is empty; give data.prefixes=PREFIX (made by data_tools/preprocess.py)")
    for i, prefix in enumerate(cfg.data.prefixes):
        try:
            info = validate_prefix(prefix)
            check_token_ids(prefix, tokenizer_vocab, info=info)
        except IndexedDataError as e:
            raise PreflightError(f"data.prefixes[{i}]: {e}") from None


def check_ds_config(cfg: Config, dp: int) -> None:
    """The DeepSpeed JSON as the engine will read it (file, JSON, keys our config owns, bf16 on a GPU)."""
    from loopmoe.train.engine import deepspeed_config

    try:
        deepspeed_config(cfg, dp)
    except ConfigError as e:
        raise PreflightError(str(e)) from None


def resume_group():
    """The world group when several processes already share one, else None (each process verifies
    alone). Only the world group: at resume every rank reads, and megatron's groups may not exist yet."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def check_resume(cfg: Config) -> str | None:
    """The checkpoint step to resume from (None: fresh start), its files verified against their manifest.
    Once the process group exists this is COLLECTIVE (every rank calls it): each rank digests its share of
    the step's files and every rank returns the same tag or raises the same PreflightError. Before it
    exists every process reads every file (the old cost: call it after init_distributed)."""
    from loopmoe.train.checkpoint import CheckpointError, resolve_resume

    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.logging.run_dir, "checkpoints")
    try:
        return resolve_resume(ckpt_dir, cfg.checkpoint.resume, resume_group())
    except CheckpointError as e:
        raise PreflightError(str(e)) from None


def check_fp8(cfg: Config) -> None:
    """train.precision=fp8 on a route that cannot run here (TE without CUDA or not installed, torchao
    missing): one line now, not a traceback from the model build."""
    from loopmoe.parallel.fp8 import fp8_unavailable_reason

    reason = fp8_unavailable_reason(cfg, probe=False)  # no device probe: the device is not chosen yet
    if reason:
        raise PreflightError(f"train.precision=fp8 cannot run here: {reason}")


def preflight(cfg: Config, layout, resume: bool = True) -> str | None:
    """Run every check (``layout`` from parallel.layout.validate_layout: world size, TP/PP/EP divisibility
    are checked there); return the checkpoint tag to resume from, or None. ``resume=False`` leaves the
    checkpoint out (returns None): pretrain_loopmoe.py calls check_resume once the process group exists,
    so the ranks split the digests instead of each reading the whole step."""
    vocab, _ = check_tokenizer_file(cfg)
    check_data(cfg, vocab)
    check_ds_config(cfg, layout.dp)
    check_fp8(cfg)
    return check_resume(cfg) if resume else None
