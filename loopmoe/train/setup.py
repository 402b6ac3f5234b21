"""Build what the loop needs from a validated config: logging, seeds, data iterators, model, callbacks."""
from __future__ import annotations

import logging
import os
import random
import sys
from typing import Callable, Iterator

import numpy as np
import torch

from loopmoe.config import Config
from loopmoe.parallel.distributed import seed_model_parallel_rng

log = logging.getLogger("loopmoe")


def setup_logging(rank: int) -> None:
    """Rank 0 logs INFO to stdout; other ranks only warnings (with their rank), so logs stay readable."""
    level = logging.INFO if rank == 0 else logging.WARNING
    fmt = f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(dataset, sampler) -> Iterator[dict[str, torch.Tensor]]:
    """Collated micro-batches, on this rank's GPU when there is one (init_distributed set the device)."""
    from loopmoe.data.sampler import collate

    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    for indices in sampler:
        batch = collate([dataset[i] for i in indices])
        yield {k: v.to(dev, non_blocking=True) for k, v in batch.items()} if dev is not None else batch


def build_data(cfg: Config, dp_rank: int, dp_size: int, consumed_samples: int
               ) -> tuple[Iterator[dict], Callable[[], Iterator[dict]]]:
    """(train batches from ``consumed_samples`` on, a factory of fresh validation iterators)."""
    from loopmoe.data import build_datasets, load_tokenizer
    from loopmoe.data.sampler import ResumableBatchSampler

    if not cfg.data.prefixes:
        raise SystemExit("error: data.prefixes is empty; give data.prefixes=PREFIX (made by data_tools/preprocess.py)")
    if not cfg.data.cache_dir:
        cfg.data.cache_dir = os.path.join(cfg.logging.run_dir, "data_cache")
    if not cfg.data.tokenizer_model:
        raise SystemExit("error: data.tokenizer_model is empty; give the sentencepiece .model that made the "
                         "token files (its end-of-document id is needed to build samples)")
    tokenizer = load_tokenizer(cfg.data.tokenizer_model)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise SystemExit(f"error: the tokenizer {cfg.data.tokenizer_model} has {tokenizer.vocab_size} tokens but "
                         f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size={tokenizer.vocab_size}")
    gb = cfg.train.micro_batch * cfg.train.grad_accum * dp_size
    n_valid = cfg.train.eval_iters * cfg.train.micro_batch * dp_size
    train, valid, _ = build_datasets(cfg.data, tokenizer, train_samples=cfg.train.steps * gb,
                                     valid_samples=n_valid, test_samples=n_valid)
    train_sampler = ResumableBatchSampler(len(train), cfg.train.micro_batch, dp_rank, dp_size, consumed_samples)

    def valid_batches() -> Iterator[dict]:
        return _batches(valid, ResumableBatchSampler(len(valid), cfg.train.micro_batch, dp_rank, dp_size, 0))

    return _batches(train, train_sampler), valid_batches


def build_model(cfg: Config, layout=None) -> torch.nn.Module:
    """The plain model, seeded identically on every rank (parallelism is applied from outside by
    loopmoe.parallel.parallelize). With a ``layout`` the model is built for it: TP linears from
    megatron's parallel_state, this EP rank's expert slice, sequence-parallel marks. Every rank draws
    the full set of weights from the same seed, so the logical model is the same at every layout."""
    from loopmoe.model import LoopMoEModel

    torch.manual_seed(cfg.train.seed)
    if layout is not None:  # the groups exist: TE draws its TP shards from megatron's CUDA RNG tracker
        seed_model_parallel_rng(cfg.train.seed)  # a no-op without CUDA
    if layout is None:
        model = LoopMoEModel(cfg.model, recompute=cfg.train.recompute)
    else:
        model = LoopMoEModel(cfg.model, ep_size=layout.ep, sequence_parallel=layout.sequence_parallel,
                             recompute=cfg.train.recompute)
    n = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2fM parameters (this rank), %d unique / %d executed layers, recompute %s",
             "LoopMoE" if cfg.model.is_looped else ("MoE" if cfg.model.ffn == "moe" else "dense"), n / 1e6,
             cfg.model.n_unique_layers, cfg.model.n_executed_layers, cfg.train.recompute)
    return model


def train_flops_per_token(cfg: Config) -> float:
    """3 x forward FLOPs per token (the convention stated in loopmoe/flops.py)."""
    from loopmoe import flops

    return 3.0 * flops.forward_flops_per_token(cfg.model, cfg.data.seq_len)
