"""megatron-core's indexed dataset files (.bin tokens, .idx index), written and read without megatron or torch.

The format (megatron/core/datasets/indexed_dataset.py, _IndexWriter / _IndexReader, version 1):
    .idx = b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 S (sequences) | u64 D (documents + 1)
           | i32 sequence_lengths[S] | i64 sequence_pointers[S] (byte offsets into .bin)
           | i64 document_indices[D] (first sequence of each document; [0] = 0, [-1] = S)
    .bin = every sequence's token ids back to back, little-endian, in the dtype of the header.
Each document here is one sequence; a document that tokenised to nothing adds a document_indices entry
and no sequence, as megatron's IndexedDatasetBuilder.add_document(ids=[], lengths=[]) does.

One module for this format: preprocess.py writes it, merge.py reads and concatenates it.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_tools._common import DataToolError, SignalsDeferred, temp_name
from loopmoe.idx_format import (  # noqa: F401  (re-exported: the format, defined once)
    CODE_DTYPES,
    DTYPE_CODES,
    HEADER_BYTES,
    INDEX_HEADER,
    INDEX_VERSION,
    optimal_dtype,
)


def index_bytes(doc_tokens: np.ndarray, dtype: type[np.integer]) -> bytes:
    """The .idx of documents with ``doc_tokens`` tokens each, exactly as megatron-core's builder writes it.

    Each non-empty document is one sequence; an empty one adds only a document_indices entry.
    """
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    seq_lengths = doc_tokens[doc_tokens > 0]
    return index_bytes_from(seq_lengths, _document_indices(doc_tokens), dtype)


def _document_indices(doc_tokens: np.ndarray) -> np.ndarray:
    document_indices = np.zeros(doc_tokens.size + 1, dtype=np.int64)
    np.cumsum(doc_tokens > 0, out=document_indices[1:])
    return document_indices


def index_bytes_from(seq_lengths: np.ndarray, document_indices: np.ndarray, dtype: type[np.integer]) -> bytes:
    """The .idx for given sequence lengths [S] and document_indices [D]; pointers follow from the lengths."""
    seq_lengths = np.asarray(seq_lengths, dtype=np.int64)
    if seq_lengths.size and seq_lengths.max() > np.iinfo(np.int32).max:
        raise DataToolError("a document has more than 2^31 tokens, more than the .idx format can hold")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(seq_lengths.size, dtype=np.int64)
    np.cumsum(seq_lengths[:-1] * itemsize, out=pointers[1:])
    header = (INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype])
              + struct.pack("<Q", seq_lengths.size) + struct.pack("<Q", len(document_indices)))
    return b"".join([header, seq_lengths.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
                     np.asarray(document_indices).astype("<i8").tobytes()])


@dataclass
class Index:
    """A parsed .idx (arrays are read-only views of the file's bytes)."""

    path: str
    dtype: type[np.integer]
    seq_lengths: np.ndarray  # int32 [S]
    pointers: np.ndarray  # int64 [S]
    document_indices: np.ndarray  # int64 [D]


def read_index(idx_path: str) -> Index:
    """Parse and check a .idx; any inconsistency is a DataToolError naming the file and what is wrong."""
    try:
        with open(idx_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataToolError(f"{idx_path}: cannot read ({e.strerror or e})") from None

    def bad(why: str) -> DataToolError:
        return DataToolError(f"{idx_path}: not a valid megatron .idx file ({why}); re-create it with "
                             f"data_tools/preprocess.py")

    if len(data) < HEADER_BYTES or data[:9] != INDEX_HEADER:
        raise bad("wrong magic bytes or shorter than the 34-byte header")
    version, code, s, d = struct.unpack_from("<QBQQ", data, 9)
    if version != INDEX_VERSION:
        raise bad(f"version {version}, expected {INDEX_VERSION}")
    if code not in CODE_DTYPES:
        raise bad(f"unknown dtype code {code}")
    want = HEADER_BYTES + 4 * s + 8 * s + 8 * d
    if len(data) != want:
        raise bad(f"{len(data)} bytes, the header says {want}")
    o = HEADER_BYTES
    lengths = np.frombuffer(data, "<i4", s, o)
    pointers = np.frombuffer(data, "<i8", s, o + 4 * s)
    docs = np.frombuffer(data, "<i8", d, o + 12 * s)
    if d < 1 or docs[0] != 0 or docs[-1] != s or (d > 1 and np.any(np.diff(docs) < 0)):
        raise bad("document_indices do not run from 0 to the number of sequences")
    return Index(idx_path, CODE_DTYPES[code], lengths, pointers, docs)


class IndexedOutput:
    """One PREFIX.bin/.idx pair, written under temporary names; ``publish`` renames it into place."""

    def __init__(self, prefix: str, dtype: type[np.integer]) -> None:
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self.bin_tmp, self.idx_tmp = temp_name(self.bin_path), temp_name(self.idx_path)
        self.dtype = dtype
        self._doc_tokens: list[np.ndarray] = []
        self.tokens = 0
        self.empty = 0
        self._bin = open(self.bin_tmp, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in finish/discard

    def add(self, tokens: np.ndarray, doc_tokens: np.ndarray, empty: int = 0) -> None:
        assert tokens.dtype == self.dtype
        self._bin.write(tokens.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False).data)
        self._doc_tokens.append(doc_tokens)
        self.tokens += int(tokens.size)
        self.empty += empty

    def finish(self) -> None:
        """Complete both temporary files on disk (flushed and fsynced); nothing is visible yet."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        counts = np.concatenate(self._doc_tokens) if self._doc_tokens else np.zeros(0, np.int64)
        write_synced(self.idx_tmp, index_bytes(counts, self.dtype))

    def discard(self) -> None:
        self._bin.close()
        for path in (self.bin_tmp, self.idx_tmp):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(outputs: Sequence[IndexedOutput]) -> None:
    """Rename every finished output into place: old .idx removed first, then the .bin, the .idx last.

    A reader opens PREFIX.idx first; it exists again only when its .bin is the matching new one.
    """
    with SignalsDeferred():
        for out in outputs:
            if os.path.exists(out.idx_path):
                os.unlink(out.idx_path)
        for out in outputs:
            os.replace(out.bin_tmp, out.bin_path)
        for out in outputs:
            os.replace(out.idx_tmp, out.idx_path)
