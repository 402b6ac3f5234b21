"""GPT training samples from one or more Megatron ``.bin/.idx`` prefixes, through megatron-core.

    tok = load_tokenizer(cfg.data.tokenizer_model)
    train, valid, test = build_datasets(cfg.data, tok, train_samples, valid_samples, test_samples,
                                        cache_dir=os.path.join(run_dir, "data_cache"))
    train[i] -> {"tokens": [s] int64, "labels": [s] int64, "loss_mask": [s] float32,
                 "position_ids": [s] int64, ("dataset_id": int, for a blend of several prefixes)}

megatron-core's ``BlendedMegatronDatasetBuilder(GPTDataset, ...)`` does the work: each prefix's
documents are split train/valid/test by ``data.split`` (contiguous ranges of the file's sequences,
so the splits never share a document when a document is one sequence, as in Megatron's default
preprocessing), documents are shuffled by ``data.seed`` and concatenated, cut into samples of
``seq_len + 1`` tokens across document boundaries, the samples shuffled again, and prefixes mixed by
``data.weights``. The three index arrays per split (plus the blend's two) are cached as ``.npy``
files under ``cache_dir``, named by an MD5 of everything they depend on (seed, seq_len, split,
sample counts, prefix paths, tokenizer identity), and reused by any later build with the same
inputs: a restart loads them (milliseconds) instead of rebuilding them (minutes for many big files).

Note for exact resumption: the sample order depends on ``train_samples`` (it decides how many
epochs are drawn and so the shuffles). A resumed run must pass the same counts as the run that
wrote the checkpoint (the same steps and global batch), as in Megatron.

Distributed: ``build_datasets`` is collective. It needs ``torch.distributed`` initialised (in
training it is; tests use the ``single_process_group`` fixture) because megatron-core's index cache
lets rank 0 build and write while the others wait at a barrier and then read; every rank must call
it. Validation of the files runs on every rank first, so a bad file fails all ranks at once rather
than leaving the others hanging at that barrier. As with Megatron's ``--data-cache-path``, the cache
directory must be one filesystem shared by all ranks (the others read what rank 0 wrote).
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from loopmoe.data.indexed import IndexInfo, check_token_ids, eod_fraction, index_arrays, validate_prefix
from loopmoe.data.tokenizer import DatasetTokenizer, check_tokenizer

if TYPE_CHECKING:
    from loopmoe.config import DataConfig

logger = logging.getLogger(__name__)

_EOD_WARN_FRACTION = 0.5  # below this share of documents ending in EOD, warn (not fatal: EOD is a choice)


def _split_ranges(split: str, num_sequences: int) -> list[tuple[int, int] | None]:
    """The [begin, end) sequence range of each of train/valid/test, computed as megatron-core does."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if m is None else (int(round(m[0] * num_sequences)), int(round(m[1] * num_sequences)))
            for m in matrix]


def _check_splits(infos: list[IndexInfo], split: str) -> None:
    """megatron-core loops forever when a split of some prefix has no tokens (its epoch count never
    reaches the request), so refuse that up front with the numbers and the fix."""
    names = ("train", "valid", "test")
    for info in infos:
        lengths = index_arrays(info)[0]
        for name, rng in zip(names, _split_ranges(split, info.num_sequences)):
            if rng is not None and int(lengths[rng[0]:rng[1]].sum(dtype=np.int64)) == 0:
                raise ValueError(
                    f"{info.prefix}.idx: data.split={split!r} gives the {name} split sequences "
                    f"[{rng[0]}, {rng[1]}) of {info.num_sequences}, which hold no tokens. Use more data, or a "
                    f"split with 0 for that part (e.g. data.split=100,0,0 for train only)"
                )


def _cache_files(cache_dir: str) -> dict[str, int]:
    """Cached index files and their modification times (ns), to report hits and misses."""
    if not os.path.isdir(cache_dir):
        return {}
    return {f: os.stat(os.path.join(cache_dir, f)).st_mtime_ns for f in os.listdir(cache_dir) if f.endswith(".npy")}


def _blend_weights(data_cfg: "DataConfig", n: int) -> list[float] | None:
    if n == 1:
        return None  # one prefix: a plain GPTDataset, no blending layer
    weights = list(data_cfg.weights) or [1.0] * n  # empty = equal, as DataConfig documents
    if len(weights) != n:
        raise ValueError(f"data.weights has {len(weights)} entries for {n} data.prefixes; give one per prefix")
    if any(w <= 0 for w in weights):
        raise ValueError(f"data.weights={weights}: every weight must be > 0 (remove a prefix to drop it)")
    return [float(w) for w in weights]


def build_datasets(
    data_cfg: "DataConfig",
    tokenizer: DatasetTokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    *,
    cache_dir: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    num_threads: int | None = None,
) -> tuple[Any, Any, Any]:
    """Build (train, valid, test) megatron-core datasets; a split with 0 in ``data.split`` is None.

    Each dataset has at least the requested number of samples (``len`` may be larger: whole epochs).
    ``cache_dir`` overrides ``data_cfg.cache_dir``; one of them must be set (the trainer passes
    ``<run_dir>/data_cache`` when the config leaves it empty). ``is_built_on_rank`` defaults to every
    rank (datasets are cheap views; pass megatron's pipeline-aware predicate to skip middle stages).
    """
    if not data_cfg.prefixes:
        raise ValueError("data.prefixes is empty; give at least one .bin/.idx path prefix")
    if min(train_samples, valid_samples, test_samples) < 0:
        raise ValueError(f"sample counts must be >= 0 (got {train_samples}, {valid_samples}, {test_samples})")
    cache = cache_dir or data_cfg.cache_dir
    if not cache:
        raise ValueError("no dataset index cache directory: set data.cache_dir (or pass cache_dir=)")
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            "build_datasets needs torch.distributed initialised (megatron-core's index cache uses rank 0 and a "
            "barrier): call torch.distributed.init_process_group first (gloo with world_size=1 is enough)"
        )
    if tokenizer is None:  # megatron's GPTDatasetConfig asserts on it later, without saying why
        raise ValueError(
            "build_datasets needs a tokenizer (its vocab_size and EOD id): set data.tokenizer_model to the "
            "sentencepiece model, or pass load_tokenizer(vocab_size=..., eod=...) for pre-tokenized data"
        )
    check_tokenizer(tokenizer)
    # imported here, not at module level: megatron-core costs seconds to import and most users of
    # loopmoe.data (sampler, collate, file checks) never need it
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    t0 = time.perf_counter()

    # Absolute paths: the prefix path is part of the cache key, which must not depend on the cwd.
    prefixes = [os.path.abspath(p) for p in data_cfg.prefixes]
    weights = _blend_weights(data_cfg, len(prefixes))
    infos = [validate_prefix(p) for p in prefixes]
    for info in infos:
        check_token_ids(info.prefix, int(tokenizer.vocab_size), info=info)
        frac = eod_fraction(info.prefix, int(tokenizer.eod), info=info)
        if frac < _EOD_WARN_FRACTION:
            logger.warning(
                "%s: only %.0f%% of sampled documents end with the EOD id %d; samples will run documents "
                "together without a separator (preprocess with --append-eod, or check the tokenizer's EOD)",
                info.prefix, 100 * frac, int(tokenizer.eod))
    _check_splits(infos, data_cfg.split)
    t_checked = time.perf_counter()

    config = GPTDatasetConfig(
        random_seed=data_cfg.seed,
        sequence_length=data_cfg.seq_len,
        blend=(prefixes, weights),
        split=data_cfg.split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # our model builds its causal mask itself; megatron's would be a [1, s, s] tensor per sample
        create_attention_mask=False,
        # threads overlap the file reads of many prefixes (the C++ index helpers hold the GIL)
        num_dataset_builder_threads=num_threads or max(1, min(len(prefixes), os.cpu_count() or 1, 8)),
    )
    before = _cache_files(cache)
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, test_samples], is_built_on_rank or (lambda: True), config
    )
    train, valid, test = builder.build()
    after = _cache_files(cache)
    t1 = time.perf_counter()

    # rank 0 writes the cache (the others wait, then read), so only rank 0's count means "written by me"
    written = sum(1 for f, m in after.items() if before.get(f) != m)  # 0 on a cache hit
    sizes = ", ".join(f"{n}={len(d) if d is not None else None}" for n, d in zip(("train", "valid", "test"),
                                                                                  (train, valid, test)))
    logger.log(
        logging.INFO if dist.get_rank() == 0 else logging.DEBUG,
        "datasets ready in %.2f s (file checks %.2f s): %s samples of %d tokens from %d prefix(es), "
        "%d tokens; index cache %s: %d .npy file(s) written (0 = all reused), %d present",
        t1 - t0, t_checked - t0, sizes, data_cfg.seq_len, len(prefixes), sum(i.num_tokens for i in infos),
        cache, written, len(after))
    return train, valid, test
