"""Held-out batches for the analysis commands, from a checkpoint's data config or a given prefix.

    batches = heldout_batches(cfg, n_batches=8)                       # the checkpoint's own data and split
    batches = heldout_batches(cfg, prefix="data/demo/python_docs_text_document",
                              tokenizer="data/demo/tokenizer.model", split="test")

The samples are megatron-core GPTDataset samples built exactly as in training (``loopmoe.data.build_datasets``
with the checkpoint's ``data.seed``, ``data.split`` and ``seq_len``), taken in order from the start of the
``valid`` or ``test`` split: the documents of those splits are never in the train split, so the batches
are held out. ``test`` (default) is never looked at during training; ``valid`` is what the trainer's
validation loss used. Every analysis command given the same arguments sees the same batches.
"""
from __future__ import annotations

import atexit
import logging
import os
import tempfile
import warnings

import torch

log = logging.getLogger(__name__)


def ensure_process_group() -> None:
    """megatron-core's dataset builder needs torch.distributed: a gloo world of one (file store)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = tempfile.NamedTemporaryFile(prefix="loopmoe_pg_", delete=False)
    store.close()
    atexit.register(lambda: os.path.exists(store.name) and os.unlink(store.name))
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)


def heldout_batches(cfg, n_batches: int = 8, micro_batch: int | None = None, prefix: str | None = None,
                    tokenizer: str | None = None, split: str = "test", seq_len: int | None = None,
                    cache_dir: str | None = None) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` micro-batches (tokens/labels/loss_mask [b, s]) of held-out samples.

    ``cfg`` is the checkpoint's Config; ``prefix``/``tokenizer`` replace its data.prefixes /
    data.tokenizer_model (the tokenizer supplies the end-of-document id the samples are cut with).
    """
    from loopmoe.data import build_datasets, load_tokenizer
    from loopmoe.data.sampler import collate

    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}: use 'valid' or 'test' (held-out splits)")
    data = _copy(cfg.data)
    if prefix:
        data.prefixes, data.weights = [prefix], []
    if tokenizer:
        data.tokenizer_model = tokenizer
    if seq_len:
        data.seq_len = seq_len
    if not data.prefixes:
        raise SystemExit("error: no data: pass --data PREFIX (a .bin/.idx prefix made by data_tools/preprocess.py)")
    if not data.tokenizer_model or not os.path.isfile(data.tokenizer_model):
        raise SystemExit(f"error: tokenizer {data.tokenizer_model!r} not found: pass --tokenizer PATH.model "
                         "(the sentencepiece model that made the token files)")
    for p in data.prefixes:
        if not os.path.isfile(p + ".idx"):
            raise SystemExit(f"error: {p}.idx not found: --data takes the path prefix without .bin/.idx")
    mb = micro_batch or cfg.train.micro_batch
    n = n_batches * mb
    tok = load_tokenizer(data.tokenizer_model)
    if tok.vocab_size > cfg.model.vocab_size:
        raise SystemExit(f"error: tokenizer {data.tokenizer_model} has {tok.vocab_size} tokens, the model "
                         f"{cfg.model.vocab_size}: not the tokenizer this model was trained with")
    ensure_process_group()
    cache = cache_dir or os.path.join(tempfile.gettempdir(), "loopmoe_analysis_cache")
    counts = [1, n, 1] if split == "valid" else [1, 1, n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, valid, test = build_datasets(data, tok, *counts, cache_dir=cache)
        ds = valid if split == "valid" else test
        if ds is None:
            raise SystemExit(f"error: data.split={data.split!r} has no {split} split")
        one = build_datasets(data, tok, 1, 1, 1, cache_dir=cache)[1 if split == "valid" else 2]
    if n > len(one):  # megatron repeats the split (more epochs) to give the samples asked for
        log.warning("the %s split holds %d samples of %d tokens; %d asked: samples repeat", split, len(one),
                    data.seq_len, n)
    samples = [ds[i] for i in range(n)]
    return [collate(samples[i * mb:(i + 1) * mb]) for i in range(n_batches)]


def _copy(obj):
    import copy

    return copy.deepcopy(obj)


def add_data_args(ap) -> None:
    """The data options every analysis command shares."""
    ap.add_argument("--data", help="a .bin/.idx path prefix (default: data.prefixes of the checkpoint's config)")
    ap.add_argument("--tokenizer", help="sentencepiece .model (default: data.tokenizer_model of the checkpoint)")
    ap.add_argument("--split", default="test", choices=["test", "valid"],
                    help="held-out split to read (default: %(default)s)")
    ap.add_argument("--batches", type=int, default=8, help="held-out micro-batches (default: %(default)s)")
    ap.add_argument("--micro-batch", type=int, help="sequences per batch (default: train.micro_batch)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default: %(default)s; 1 is the fastest on a shared machine)")


def batches_from_args(args, cfg) -> list[dict[str, torch.Tensor]]:
    return heldout_batches(cfg, args.batches, args.micro_batch, args.data, args.tokenizer, args.split)
