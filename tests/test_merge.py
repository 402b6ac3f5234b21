"""data_tools/merge.py: slices of the input files (preprocess.py --file-slice I/N) merged in order give the
bytes of one run over all the files, equal to what megatron-core's own IndexedDatasetBuilder.add_index
writes, and megatron-core's IndexedDataset reads the result. Mismatched or broken inputs are refused
before anything is written."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from data_tools import merge, preprocess
from data_tools._common import DataToolError
from data_tools.indexed import read_index
from tests.test_preprocess import docs, files_of, read_back, sample_docs, tokenizer, write_jsonl  # noqa: F401

MERGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_tools", "merge.py")


@pytest.fixture()
def shards(tmp_path, docs) -> str:
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        write_jsonl(d / f"s{i}.jsonl", (docs + sample_docs(10, start=400 + 10 * i))[i::5])
    return str(d / "s*.jsonl")


def tokenise(pattern, tokenizer, prefix, *extra) -> str:
    assert preprocess.main(["--input", pattern, "--tokenizer-model", tokenizer, "--append-eod", "--workers", "1",
                            "--output-prefix", prefix, *extra]) == 0
    return prefix + "_text_document"


@pytest.mark.parametrize("parts", [2, 3, 7])  # 7 > 5 files: some slices are empty pairs
def test_slices_merged_equal_one_run_and_megatron_add_index(tmp_path, tokenizer, shards, parts):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder

    whole = tokenise(shards, tokenizer, str(tmp_path / "all"))
    prefixes = [tokenise(shards, tokenizer, str(tmp_path / f"p{i}"), "--file-slice", f"{i}/{parts}")
                for i in range(parts)]
    out = subprocess.run([sys.executable, MERGE, *sum((["--input", p] for p in prefixes), []),
                          "--output-prefix", str(tmp_path / "merged")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert files_of(str(tmp_path / "merged")) == files_of(whole)
    # megatron-core's own merge of the same pairs
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(512))
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(str(tmp_path / "ref.idx"))
    assert files_of(str(tmp_path / "merged")) == files_of(str(tmp_path / "ref"))
    ds = IndexedDataset(str(tmp_path / "merged"))
    # (megatron's reader cannot mmap an empty .bin, so the parts are counted with ours)
    assert len(ds.document_indices) - 1 == sum(len(read_index(p + ".idx").document_indices) - 1 for p in prefixes)
    assert read_back(str(tmp_path / "merged")) == read_back(whole)


def test_glob_input_sorted_and_refusals(tmp_path, tokenizer, shards):
    for i in range(3):
        tokenise(shards, tokenizer, str(tmp_path / f"part_{i:05d}"), "--file-slice", f"{i}/3")
    whole = tokenise(shards, tokenizer, str(tmp_path / "all"))
    assert merge.main(["--input", str(tmp_path / "part_*_text_document"), "--output-prefix", str(tmp_path / "m")]) == 0
    assert files_of(str(tmp_path / "m")) == files_of(whole)
    with pytest.raises(DataToolError, match="m.bin already exists; pass --overwrite"):
        merge.main(["--input", str(tmp_path / "part_*_text_document"), "--output-prefix", str(tmp_path / "m")])
    with pytest.raises(DataToolError, match="no .bin/.idx pair matches"):
        merge.main(["--input", str(tmp_path / "nothing_*"), "--output-prefix", str(tmp_path / "n")])
    # a .bin cut short: named, nothing written
    p0 = str(tmp_path / "part_00000_text_document")
    data = open(p0 + ".bin", "rb").read()
    with open(p0 + ".bin", "wb") as f:
        f.write(data[:-2])
    with pytest.raises(DataToolError, match="part_00000_text_document.bin has .* bytes but its .idx describes"):
        merge.main(["--input", p0, "--input", str(tmp_path / "part_00001_text_document"),
                    "--output-prefix", str(tmp_path / "cut")])
    assert not any(n.startswith("cut") for n in os.listdir(tmp_path))
    with open(p0 + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    with pytest.raises(DataToolError, match="not a valid megatron .idx file"):
        merge.main(["--input", p0, "--output-prefix", str(tmp_path / "bad")])


def test_mixed_dtypes_refused(tmp_path):
    from data_tools.indexed import IndexedOutput, publish

    for name, dtype in (("small", np.uint16), ("big", np.int32)):
        out = IndexedOutput(str(tmp_path / name), dtype)
        out.add(np.arange(5, dtype=dtype), np.array([2, 3]))
        out.finish()
        publish([out])
    with pytest.raises(DataToolError, match="stores int32 tokens but .*small.idx uint16"):
        merge.main(["--input", str(tmp_path / "small"), "--input", str(tmp_path / "big"),
                    "--output-prefix", str(tmp_path / "x")])


def test_file_slices_are_contiguous_and_cover_every_file(tmp_path, tokenizer):
    files = [f"f{i}" for i in range(7)]
    for n in (1, 2, 3, 7, 10):
        parts = [preprocess.file_slice(files, (i, n)) for i in range(n)]
        assert sum(parts, []) == files
    from tests.test_preprocess import run_cli

    r = run_cli("--input", "x.jsonl", "--file-slice", "3/3", "--tokenizer-model", tokenizer)
    assert r.returncode == 2 and "--file-slice" in r.stderr
