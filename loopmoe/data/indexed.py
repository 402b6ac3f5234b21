"""Validate and open Megatron indexed datasets (a ``.bin`` / ``.idx`` pair sharing a path prefix).

megatron-core's reader only ``assert``s a few things and otherwise fails later with an index error
or, worse, silently reads garbage (a ``.bin`` written as int32 but declared uint16 in the ``.idx``).
So before any dataset is built we read the ``.idx`` ourselves with NumPy (no megatron import, cheap)
and check every invariant of the format; each error names the file and the likely fix.

Format (little-endian), see docs in megatron/core/datasets/indexed_dataset.py:
    magic b"MMIDIDX\\x00\\x00" | version u64 (=1) | dtype code u8 | S u64 | D u64
    | sequence_lengths int32[S] | sequence_pointers int64[S] | document_indices int64[D]
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # megatron-core is heavy to import (~3 s); only open_indexed needs it
    from megatron.core.datasets.indexed_dataset import IndexedDataset

from loopmoe.idx_format import CODE_DTYPES as DTYPES  # megatron-core's dtype codes
from loopmoe.idx_format import HEADER_BYTES, INDEX_VERSION
from loopmoe.idx_format import INDEX_HEADER as MAGIC
_CHUNK = 1 << 22  # elements per chunk when scanning big arrays (bounded memory)
_FIX_PREPROCESS = "re-run the preprocessing that wrote this prefix"


class IndexedDataError(ValueError):
    """A ``.bin``/``.idx`` pair is missing or inconsistent; the message names the file and the fix."""


@dataclass(frozen=True)
class IndexInfo:
    """What a valid ``.idx`` says about its dataset."""

    prefix: str
    dtype: type[np.number]
    num_sequences: int  # S
    num_documents: int  # D - 1
    num_tokens: int  # sum(sequence_lengths)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def _check_exists(prefix: str) -> None:
    hint = ""
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):  # a common slip: data.prefixes=[foo_text_document.bin]
            hint = f"; give the prefix without {ext!r}: {prefix[: -len(ext)]!r}"
    for path in (idx_path(prefix), bin_path(prefix)):
        if not os.path.isfile(path):
            raise IndexedDataError(
                f"{path}: file not found (data prefix {prefix!r}){hint}. A Megatron dataset is a pair "
                f"PREFIX.bin + PREFIX.idx, e.g. data/corpus_text_document; check data.prefixes or run "
                f"the preprocessing to create it"
            )


def _read_header(path: str) -> tuple[int, int, int]:
    """Return (dtype code, S, D) after checking magic, version and the dtype code."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise IndexedDataError(
            f"{path}: truncated index ({size} bytes, the header alone is {HEADER_BYTES}); {_FIX_PREPROCESS}"
        )
    if head[:9] != MAGIC:
        raise IndexedDataError(
            f"{path}: bad magic {head[:9]!r} (expected {MAGIC!r}); not a Megatron indexed-dataset index "
            f"(the legacy 'TNTIDX' and HF/Arrow formats are not supported); {_FIX_PREPROCESS}"
        )
    (version,) = struct.unpack("<Q", head[9:17])
    if version != INDEX_VERSION:
        raise IndexedDataError(f"{path}: unsupported index version {version} (only {INDEX_VERSION} is known); {_FIX_PREPROCESS}")
    code = head[17]
    if code not in DTYPES:
        raise IndexedDataError(
            f"{path}: unknown dtype code {code} (known: {sorted(DTYPES)}); the index is corrupt; {_FIX_PREPROCESS}"
        )
    s, d = struct.unpack("<QQ", head[18:34])
    return code, s, d


def validate_prefix(prefix: str) -> IndexInfo:
    """Check a ``.bin``/``.idx`` pair without megatron-core; raise ``IndexedDataError`` on any fault.

    Memory stays bounded (chunks of 4M entries), so this is fine for indices of 10^8 sequences.
    """
    _check_exists(prefix)
    ipath, bpath = idx_path(prefix), bin_path(prefix)
    code, s, d = _read_header(ipath)
    dtype = DTYPES[code]
    itemsize = np.dtype(dtype).itemsize

    expected_idx = HEADER_BYTES + 12 * s + 8 * d
    idx_size = os.path.getsize(ipath)
    if idx_size != expected_idx:
        extra = " (S extra bytes: a multimodal index, not supported for GPT data)" if idx_size == expected_idx + s else ""
        raise IndexedDataError(
            f"{ipath}: size {idx_size} bytes but the header (S={s} sequences, D={d}) needs {expected_idx}"
            f"{extra}; the index is truncated or corrupt; {_FIX_PREPROCESS}"
        )
    if d < 1:
        raise IndexedDataError(f"{ipath}: document_indices is empty (D=0; it must start with 0); {_FIX_PREPROCESS}")

    lengths, pointers, doc_idx = _views(ipath, s, d)  # [S] int32, [S] int64, [D] int64

    # sequence_lengths >= 0 and sequence_pointers = exclusive cumsum(lengths) * itemsize, chunk by chunk
    total = 0  # tokens so far
    for start in range(0, s, _CHUNK):
        ln = lengths[start : start + _CHUNK].astype(np.int64)
        if (ln < 0).any():
            i = start + int(np.argmax(ln < 0))
            raise IndexedDataError(f"{ipath}: sequence_lengths[{i}] = {ln[i - start]} is negative; {_FIX_PREPROCESS}")
        expect = (total + np.cumsum(ln) - ln) * itemsize  # byte offset of each sequence
        got = pointers[start : start + _CHUNK]
        bad = np.nonzero(got != expect)[0]
        if bad.size:
            i = int(bad[0])
            raise IndexedDataError(
                f"{ipath}: sequence_pointers[{start + i}] = {int(got[i])} but the lengths before it give "
                f"{int(expect[i])} (itemsize {itemsize}); pointers and lengths disagree; {_FIX_PREPROCESS}"
            )
        total += int(ln.sum())

    if int(doc_idx[0]) != 0:
        raise IndexedDataError(f"{ipath}: document_indices[0] = {int(doc_idx[0])}, must be 0; {_FIX_PREPROCESS}")
    if int(doc_idx[-1]) != s:
        raise IndexedDataError(
            f"{ipath}: document_indices ends at {int(doc_idx[-1])} but there are S={s} sequences (must end at S); "
            f"the index is truncated or was concatenated wrongly; {_FIX_PREPROCESS}"
        )
    for start in range(0, d - 1, _CHUNK):  # non-decreasing (an empty document repeats an entry)
        step = np.diff(doc_idx[start : start + _CHUNK + 1])
        if (step < 0).any():
            i = start + int(np.argmax(step < 0))
            raise IndexedDataError(
                f"{ipath}: document_indices decreases at entry {i + 1} ({int(doc_idx[i])} -> {int(doc_idx[i + 1])}); "
                f"{_FIX_PREPROCESS}"
            )

    bin_size = os.path.getsize(bpath)
    if bin_size != total * itemsize:
        hint = ""
        if total and bin_size % total == 0 and bin_size // total != itemsize:
            hint = (f" The .bin holds exactly {bin_size // total} bytes per token: it was probably written with a "
                    f"different dtype than the .idx declares ({np.dtype(dtype).name}).")
        elif bin_size < total * itemsize:
            hint = " The .bin is truncated (an interrupted copy or preprocessing?)."
        raise IndexedDataError(
            f"{bpath}: size {bin_size} bytes but {ipath} describes {total} tokens x {itemsize} bytes "
            f"({np.dtype(dtype).name}) = {total * itemsize}.{hint} Re-copy the pair together or {_FIX_PREPROCESS}"
        )
    del lengths, pointers, doc_idx
    return IndexInfo(prefix=prefix, dtype=dtype, num_sequences=s, num_documents=d - 1, num_tokens=total)


def _views(path: str, s: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mm = np.memmap(path, mode="r", dtype=np.uint8)  # the views keep the mapping alive
    return (np.frombuffer(mm, dtype=np.int32, count=s, offset=HEADER_BYTES),
            np.frombuffer(mm, dtype=np.int64, count=s, offset=HEADER_BYTES + 4 * s),
            np.frombuffer(mm, dtype=np.int64, count=d, offset=HEADER_BYTES + 12 * s))


def index_arrays(info: IndexInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read-only views of a validated ``.idx``: sequence_lengths int32 [S], sequence_pointers int64 [S],
    document_indices int64 [D]."""
    return _views(idx_path(info.prefix), info.num_sequences, info.num_documents + 1)


def _bin_tokens(info: IndexInfo) -> np.ndarray:
    """The whole .bin as a read-only 1-D memmap [num_tokens] of the declared dtype."""
    if info.num_tokens == 0:
        return np.zeros(0, dtype=info.dtype)
    return np.memmap(bin_path(info.prefix), mode="r", dtype=info.dtype, shape=(info.num_tokens,))


def _windows(num_tokens: int, max_scan_tokens: int, seed: int, n_windows: int = 64) -> list[tuple[int, int]]:
    """Token ranges to scan: everything when small, else ``n_windows`` random windows (sorted, for I/O)."""
    if num_tokens <= max_scan_tokens:
        return [(0, num_tokens)]
    width = max(1, max_scan_tokens // n_windows)
    starts = np.random.default_rng(seed).integers(0, num_tokens - width + 1, size=n_windows)
    # the end of the file too: an appended shard with a different tokenizer often sits there
    return sorted({(int(a), int(a) + width) for a in starts} | {(num_tokens - width, num_tokens)})


def check_token_ids(
    prefix: str,
    vocab_size: int,
    max_scan_tokens: int = 1 << 24,
    seed: int = 0,
    info: IndexInfo | None = None,
) -> int:
    """Raise if a token id is outside ``[0, vocab_size)``; return the largest id seen.

    Files up to ``max_scan_tokens`` (16M) tokens are scanned whole; larger ones in 64 random windows
    plus the tail, so a tokenizer mismatch (data from a bigger vocabulary) is caught in well under a
    second instead of as an embedding index error hours into a run.
    """
    info = info or validate_prefix(prefix)
    tokens = _bin_tokens(info)
    is_float = np.issubdtype(info.dtype, np.floating)
    hi_seen = -1
    for a, b in _windows(info.num_tokens, max_scan_tokens, seed):
        for c in range(a, b, _CHUNK):
            chunk = tokens[c : min(b, c + _CHUNK)]
            bad = (chunk >= vocab_size) | (chunk < 0)
            if is_float:  # ids stored as floats must still be whole numbers
                bad |= chunk != np.floor(chunk)
            if bad.any():
                i = int(np.argmax(bad))
                raise IndexedDataError(
                    f"{bin_path(prefix)}: token id {chunk[i]} at token position {c + i} is outside the "
                    f"tokenizer's vocabulary [0, {vocab_size}); the data was tokenized with a different "
                    f"tokenizer. Re-tokenize it with the run's tokenizer (data.tokenizer_model) or use the "
                    f"tokenizer that produced it"
                )
            if chunk.size:
                hi_seen = max(hi_seen, int(chunk.max()))
    del tokens
    return hi_seen


def eod_fraction(prefix: str, eod: int, max_docs: int = 2000, seed: int = 0, info: IndexInfo | None = None) -> float:
    """Fraction of (up to ``max_docs`` sampled, non-empty) documents whose last token is ``eod``.

    Megatron's preprocessing appends the end-of-document id only with ``--append-eod``; without it,
    samples run documents together with no separator. Callers warn when this is low.
    """
    info = info or validate_prefix(prefix)
    lengths, pointers, doc_idx = index_arrays(info)
    # the last sequence of each document: document_indices[k+1] - 1, skipping empty documents
    last_seq = doc_idx[1:] - 1
    last_seq = last_seq[(doc_idx[1:] > doc_idx[:-1])]
    if last_seq.size > max_docs:
        last_seq = np.sort(np.random.default_rng(seed).choice(last_seq, size=max_docs, replace=False))
    last_seq = last_seq[lengths[last_seq] > 0]
    if last_seq.size == 0:
        return 0.0
    itemsize = np.dtype(info.dtype).itemsize
    tokens = _bin_tokens(info)
    end_pos = pointers[last_seq] // itemsize + lengths[last_seq].astype(np.int64) - 1  # token index
    frac = float(np.mean(tokens[end_pos] == eod))
    del tokens, lengths, pointers, doc_idx
    return frac


def open_indexed(prefix: str, vocab_size: int | None = None) -> "IndexedDataset":
    """Validate ``prefix`` (and its token ids when ``vocab_size`` is given), then open it with
    megatron-core's ``IndexedDataset`` (memory-mapped)."""
    info = validate_prefix(prefix)
    if vocab_size is not None:
        check_token_ids(prefix, vocab_size, info=info)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix)
