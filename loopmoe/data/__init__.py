"""Training data: Megatron ``.bin/.idx`` validation, megatron-core GPT samples, resumable sampling.

Importing this package is light (numpy, torch); megatron-core is imported only when datasets or a
sentencepiece tokenizer are built.
"""
from loopmoe.data.indexed import (
    IndexedDataError,
    IndexInfo,
    check_token_ids,
    eod_fraction,
    open_indexed,
    validate_prefix,
)
from loopmoe.data.sampler import ResumableBatchSampler, collate
from loopmoe.data.samples import build_datasets
from loopmoe.data.tokenizer import DatasetTokenizer, FixedIdsTokenizer, check_tokenizer, load_tokenizer

__all__ = [
    "DatasetTokenizer",
    "FixedIdsTokenizer",
    "IndexInfo",
    "IndexedDataError",
    "ResumableBatchSampler",
    "build_datasets",
    "check_token_ids",
    "check_tokenizer",
    "collate",
    "eod_fraction",
    "load_tokenizer",
    "open_indexed",
    "validate_prefix",
]
