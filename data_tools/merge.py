"""Concatenate megatron .bin/.idx pairs into one, in the order given: what preprocess.py would have written
for all their documents in one run (the same bytes), like megatron-core's IndexedDatasetBuilder.add_index.

    python data_tools/merge.py --input 'data/tokens/part_*_text_document' --output-prefix data/tokens/web_text_document
    python data_tools/merge.py --input a_text_document --input b_text_document --output-prefix ab_text_document

Inputs are prefixes (PREFIX.bin + PREFIX.idx) or globs of them (a glob may also match the .idx or .bin
files themselves); each glob's matches are sorted by name, so zero-padded shard numbers keep their order.
Every pair is checked before anything is written: the same token dtype, a valid .idx, a .bin of exactly
the size the .idx describes, the same tokenizer record (PREFIX.tokenizer.json, carried to the output). The output is written under temporary names and renamed when complete (the
.idx last), so an existing PREFIX.idx always belongs to a whole pair. The .bin files are copied with
os.copy_file_range (in the kernel, no copy through Python) where the OS has it.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data_tools._common import DataToolError, HelpFormatter, SignalsDeferred, run_cli, temp_name
from data_tools.indexed import Index, index_bytes_from, read_index, write_synced
from loopmoe.tokenizer_fingerprint import TokenizerMismatch, common_fingerprint, remove_sidecar, write_sidecar


def find_prefixes(patterns: Sequence[str]) -> list[str]:
    """Prefixes for the --input values, in order; a glob's matches sorted; duplicates read once."""
    out: list[str] = []
    for pattern in patterns:
        for ext in (".idx", ".bin"):
            if pattern.endswith(ext):
                pattern = pattern[:-len(ext)]
        if any(c in pattern for c in "*?["):
            found = sorted({m[:-4] for m in glob.glob(pattern + ".idx")} | {m[:-4] for m in glob.glob(pattern + ".bin")})
            if not found:
                raise DataToolError(f"--input {pattern!r}: no .bin/.idx pair matches; check the directory and "
                                    f"the name (quote the pattern so the shell does not expand it)")
        else:
            found = [pattern]
        for prefix in found:
            if prefix not in out:
                out.append(prefix)
    for prefix in out:
        for ext in (".idx", ".bin"):
            if not os.path.isfile(prefix + ext):
                raise DataToolError(f"{prefix}{ext}: no such file (each input needs both PREFIX.bin and PREFIX.idx)")
    return out


def check_inputs(prefixes: Sequence[str]) -> list[Index]:
    indexes = [read_index(p + ".idx") for p in prefixes]
    for p, ix in zip(prefixes, indexes):
        if ix.dtype is not indexes[0].dtype:
            raise DataToolError(f"{p}.idx stores {np.dtype(ix.dtype).name} tokens but {prefixes[0]}.idx "
                                f"{np.dtype(indexes[0].dtype).name}: they come from different tokenizers "
                                f"(vocabularies below and above 65,500 ids); merge only outputs of one tokenizer")
        want = int(ix.seq_lengths.astype(np.int64).sum()) * np.dtype(ix.dtype).itemsize
        size = os.path.getsize(p + ".bin")
        if size != want:
            raise DataToolError(f"{p}.bin has {size:,} bytes but its .idx describes {want:,}: the pair is "
                                f"incomplete or mismatched; re-create it with data_tools/preprocess.py")
        expect = np.zeros(len(ix.seq_lengths), np.int64)
        np.cumsum(ix.seq_lengths[:-1].astype(np.int64) * np.dtype(ix.dtype).itemsize, out=expect[1:])
        if not np.array_equal(expect, ix.pointers):
            raise DataToolError(f"{p}.idx: sequence pointers are not the running sum of the lengths (a .idx "
                                f"written by another tool, with gaps?); merge.py only joins contiguous pairs")
    return indexes


def tokenizer_record(prefixes: Sequence[str]) -> dict | None:
    """The inputs' shared tokenizer record (PREFIX.tokenizer.json), carried to the output; inputs of two
    tokenizers are refused. Inputs without a record (made before records existed) are named on stderr."""
    try:
        fp, missing = common_fingerprint(list(prefixes))
    except TokenizerMismatch as e:
        raise DataToolError(str(e)) from None
    if missing:
        print(f"note: no tokenizer record (.tokenizer.json) beside {', '.join(missing)}: "
              + ("the output carries the others' record unchecked against them" if fp else
                 "the output has none either"), file=sys.stderr)
    return fp


def merged_index(indexes: Sequence[Index]) -> bytes:
    """add_index's arithmetic: lengths appended; document_indices shifted by the sequences before them."""
    lengths = np.concatenate([ix.seq_lengths.astype(np.int64) for ix in indexes]) if indexes else np.zeros(0)
    docs, offset = [np.zeros(1, np.int64)], 0
    for ix in indexes:
        docs.append(ix.document_indices[1:] + offset)
        offset += len(ix.seq_lengths)
    return index_bytes_from(lengths, np.concatenate(docs), indexes[0].dtype)


def copy_into(dst, src_path: str) -> None:
    with open(src_path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < size:
                    n = os.copy_file_range(src.fileno(), dst.fileno(), size - done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # another filesystem or no support: copy through user space
                pass
        if done < size:
            src.seek(done)
            dst.seek(0, os.SEEK_END)
            shutil.copyfileobj(src, dst, 16 << 20)


def merge(prefixes: Sequence[str], out_prefix: str, overwrite: bool = False) -> tuple[int, int]:
    """Write OUT.bin/.idx; returns (documents, tokens)."""
    if not prefixes:
        raise DataToolError("no inputs to merge")
    out_bin, out_idx = out_prefix + ".bin", out_prefix + ".idx"
    if out_prefix in prefixes:
        raise DataToolError(f"--output-prefix {out_prefix!r} is also an input")
    if not overwrite:
        for path in (out_bin, out_idx):
            if os.path.exists(path):
                raise DataToolError(f"{path} already exists; pass --overwrite to replace it")
    indexes = check_inputs(prefixes)
    fp = tokenizer_record(prefixes)
    idx = merged_index(indexes)
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    bin_tmp, idx_tmp = temp_name(out_bin), temp_name(out_idx)
    try:
        with open(bin_tmp, "wb") as dst:
            for p in prefixes:
                copy_into(dst, p + ".bin")
            dst.flush()
            os.fsync(dst.fileno())
        write_synced(idx_tmp, idx)
        with SignalsDeferred():
            if os.path.exists(out_idx):
                os.unlink(out_idx)
            remove_sidecar(out_prefix)  # the old output's record must not describe the new pair
            os.replace(bin_tmp, out_bin)
            os.replace(idx_tmp, out_idx)
            if fp is not None:
                write_sidecar(out_prefix, fp)
    except BaseException:
        for path in (bin_tmp, idx_tmp):
            if os.path.exists(path):
                os.unlink(path)
        raise
    docs = sum(len(ix.document_indices) - 1 for ix in indexes)
    tokens = sum(int(ix.seq_lengths.astype(np.int64).sum()) for ix in indexes)
    return docs, tokens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--input", action="append", required=True, metavar="PREFIX_OR_GLOB",
                   help="a .bin/.idx pair (its prefix) or a glob of them; repeat for several, merged in order")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and .idx")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    prefixes = find_prefixes(args.input)
    docs, tokens = merge(prefixes, args.output_prefix, args.overwrite)
    print(f"merged {len(prefixes)} pair(s) into {args.output_prefix}.bin/.idx: {docs:,} documents, "
          f"{tokens:,} tokens in {time.perf_counter() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
