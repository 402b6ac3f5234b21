"""loopmoe.data.indexed: every broken .bin/.idx pair gives an IndexedDataError naming the file.

Fixtures are written with megatron-core's own IndexedDatasetBuilder, then corrupted byte by byte at
the offsets of the documented format (header 34 bytes, lengths int32[S], pointers int64[S],
document_indices int64[D]).
"""
from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
import torch

from loopmoe.data.indexed import (
    HEADER_BYTES,
    IndexedDataError,
    check_token_ids,
    eod_fraction,
    open_indexed,
    validate_prefix,
)

EOD = 1


def random_docs(n: int, lo: int, hi: int, seed: int, eod: int | None = EOD) -> list[np.ndarray]:
    """Documents of varied lengths (some empty) with ids in [lo, hi), each ending with ``eod``."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(0, 60))
        body = rng.integers(lo, hi, size=length)
        docs.append(np.concatenate([body, [eod]]).astype(np.int64) if length and eod is not None else body)
    return docs


def write_prefix(prefix: str, docs: list[np.ndarray], dtype: type = np.uint16) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_item(torch.from_numpy(np.asarray(doc, dtype=np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture
def docs() -> list[np.ndarray]:
    return random_docs(40, 10, 900, seed=0)


@pytest.fixture
def prefix(tmp_path, docs) -> str:
    return write_prefix(str(tmp_path / "corpus_text_document"), docs)


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def raises_naming(path: str, *words: str):
    """Context: an IndexedDataError whose message names ``path`` and contains ``words``."""

    class _Ctx:
        def __enter__(self):
            self.ctx = pytest.raises(IndexedDataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert path in msg, f"error does not name {path}: {msg}"
            for w in words:
                assert w in msg, f"{w!r} not in: {msg}"
            return handled

    return _Ctx()


def test_valid_pair_matches_megatron_reader(prefix, docs):
    info = validate_prefix(prefix)
    assert info.dtype is np.uint16
    assert info.num_sequences == info.num_documents == len(docs)
    assert info.num_tokens == sum(len(d) for d in docs)
    ds = open_indexed(prefix, vocab_size=900)
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds[i].astype(np.int64), doc)


def test_missing_files(prefix):
    os.remove(prefix + ".bin")
    with raises_naming(prefix + ".bin", "not found"):
        validate_prefix(prefix)
    with raises_naming(prefix + "_other.idx", "not found"):
        validate_prefix(prefix + "_other")


def test_prefix_given_with_extension(prefix):
    with raises_naming(prefix + ".bin.idx", "without '.bin'"):
        validate_prefix(prefix + ".bin")


def test_bad_magic(prefix):
    patch(prefix + ".idx", 0, b"TNTIDX\x00\x00\x00")
    with raises_naming(prefix + ".idx", "bad magic"):
        validate_prefix(prefix)


def test_bad_version(prefix):
    patch(prefix + ".idx", 9, struct.pack("<Q", 2))
    with raises_naming(prefix + ".idx", "version 2"):
        validate_prefix(prefix)


def test_unknown_dtype_code(prefix):
    patch(prefix + ".idx", 17, bytes([9]))
    with raises_naming(prefix + ".idx", "dtype code 9"):
        validate_prefix(prefix)


def test_truncated_idx(prefix):
    size = os.path.getsize(prefix + ".idx")
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(size - 8)
    with raises_naming(prefix + ".idx", "truncated"):
        validate_prefix(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(20)
    with raises_naming(prefix + ".idx", "truncated"):
        validate_prefix(prefix)


def test_truncated_bin(prefix):
    size = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size - 6)
    with raises_naming(prefix + ".bin", "truncated"):
        validate_prefix(prefix)


def test_bin_written_with_other_dtype(tmp_path, docs):
    # the .idx says uint16 (2 bytes/token) but the .bin holds int32 (4 bytes/token)
    small = write_prefix(str(tmp_path / "u16"), docs, np.uint16)
    wide = write_prefix(str(tmp_path / "i32"), docs, np.int32)
    shutil.copy(wide + ".bin", small + ".bin")
    with raises_naming(small + ".bin", "4 bytes per token", "uint16"):
        validate_prefix(small)


def test_inconsistent_sequence_pointers(prefix, docs):
    s = len(docs)
    patch(prefix + ".idx", HEADER_BYTES + 4 * s + 8 * 5, struct.pack("<q", 12345))
    with raises_naming(prefix + ".idx", "sequence_pointers[5]"):
        validate_prefix(prefix)


def test_document_indices_not_ending_at_s(prefix, docs):
    s, d = len(docs), len(docs) + 1
    patch(prefix + ".idx", HEADER_BYTES + 12 * s + 8 * (d - 1), struct.pack("<q", s - 1))
    with raises_naming(prefix + ".idx", "document_indices ends at", f"S={s}"):
        validate_prefix(prefix)


def test_document_indices_decreasing(prefix, docs):
    s = len(docs)
    patch(prefix + ".idx", HEADER_BYTES + 12 * s + 8 * 3, struct.pack("<q", 0))
    with raises_naming(prefix + ".idx", "decreases"):
        validate_prefix(prefix)


def test_negative_sequence_length(prefix):
    patch(prefix + ".idx", HEADER_BYTES + 4 * 2, struct.pack("<i", -3))
    with raises_naming(prefix + ".idx", "negative"):
        validate_prefix(prefix)


def test_token_ids_beyond_vocab(tmp_path, docs):
    prefix = write_prefix(str(tmp_path / "p"), docs)
    assert check_token_ids(prefix, vocab_size=900) == max(int(d.max()) for d in docs if len(d))
    with raises_naming(prefix + ".bin", "outside the tokenizer's vocabulary [0, 500)"):
        check_token_ids(prefix, vocab_size=500)
    with raises_naming(prefix + ".bin", "vocabulary"):
        open_indexed(prefix, vocab_size=500)


def test_token_check_sampling_mode_sees_the_tail(tmp_path):
    # a big file is only sampled; an appended shard from another tokenizer (at the end) must still be seen
    docs = random_docs(2000, 10, 400, seed=1)
    docs.append(np.array([10, 11, 60000, EOD]))
    prefix = write_prefix(str(tmp_path / "big"), docs)
    info = validate_prefix(prefix)
    assert info.num_tokens > 4096
    with raises_naming(prefix + ".bin", "60000"):
        check_token_ids(prefix, vocab_size=1000, max_scan_tokens=4096)


def test_eod_fraction(tmp_path):
    with_eod = write_prefix(str(tmp_path / "a"), random_docs(50, 10, 900, seed=2, eod=EOD))
    without = write_prefix(str(tmp_path / "b"), random_docs(50, 10, 900, seed=2, eod=None))
    assert eod_fraction(with_eod, EOD) == 1.0
    assert eod_fraction(without, EOD) == 0.0
