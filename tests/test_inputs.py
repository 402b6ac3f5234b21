"""preprocess.py inputs: .jsonl.zst and .parquet give the same bytes as plain .jsonl; parquet is streamed by
record batch (many row groups); globs over mixed formats keep their order; bad rows are named by file and
row, a missing or non-string column by file and column; a truncated .zst names the file."""
from __future__ import annotations

import json

import pytest

from data_tools import preprocess
from data_tools._common import DataToolError
from tests.test_preprocess import expected_tokens, files_of, read_back, run_cli, write_jsonl

zstandard = pytest.importorskip("zstandard")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from tests.test_preprocess import docs, sp, tokenizer  # noqa: E402,F401  (module fixtures)


def write_zst(path, docs_: list[str], frames: int = 1) -> str:
    raw = "".join(json.dumps({"text": d}) + "\n" for d in docs_).encode()
    cut = len(raw) // frames
    parts = [raw[i * cut:(i + 1) * cut if i < frames - 1 else len(raw)] for i in range(frames)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor().compress(p) for p in parts))  # frames back to back
    return str(path)


def write_parquet(path, docs_: list[str], row_group_size: int = 7, **extra) -> str:
    table = pa.table({"id": list(range(len(docs_))), "content": docs_, **extra})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def run(*argv: str) -> int:
    return preprocess.main([*argv, "--workers", "1", "--append-eod"])


def test_zst_and_parquet_equal_plain_jsonl(tmp_path, tokenizer, docs):
    plain = write_jsonl(tmp_path / "in.jsonl", docs)
    zst = write_zst(tmp_path / "in.jsonl.zst", docs, frames=3)  # several frames, as pzstd writes
    par = write_parquet(tmp_path / "in.parquet", docs)
    assert pq.ParquetFile(par).num_row_groups > 5
    assert run("--input", plain, "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "plain")) == 0
    assert run("--input", zst, "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "zst")) == 0
    assert preprocess.main(["--input", par, "--text-column", "content", "--tokenizer-model", tokenizer, "--append-eod",
                            "--workers", "2", "--batch-size", "5", "--output-prefix", str(tmp_path / "pq")]) == 0
    ref = files_of(str(tmp_path / "plain_text_document"))
    assert files_of(str(tmp_path / "zst_text_document")) == ref
    assert files_of(str(tmp_path / "pq_content_document")) == ref


def test_glob_over_mixed_formats_keeps_sorted_order(tmp_path, tokenizer, sp, docs):
    d = tmp_path / "shards"
    d.mkdir()
    write_parquet(d / "part-000.parquet", docs[:10], text=docs[:10])
    write_zst(d / "part-001.jsonl.zst", docs[10:20])
    write_jsonl(d / "part-002.jsonl.gz", docs[20:30], gz=True)
    write_parquet(d / "part-003.parquet", docs[30:], text=docs[30:])
    assert run("--input", str(d / "part-*"), "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "x")) == 0
    assert read_back(str(tmp_path / "x_text_document")) == expected_tokens(sp, docs, True)


def test_parquet_bad_rows_and_columns_are_named(tmp_path, tokenizer, sp):
    texts = ["zero", "one", None, "three"]
    par = str(tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"text": texts}), par, row_group_size=2)
    r = run_cli("--input", par, "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "o" / "x"))
    assert r.returncode == 2 and f"{par}: row 2: column 'text' is null" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    r = run_cli("--input", par, "--skip-bad-lines", "--tokenizer-model", tokenizer, "--append-eod",
                "--output-prefix", str(tmp_path / "s"))
    assert r.returncode == 0 and "bad lines skipped: 1" in r.stdout
    assert read_back(str(tmp_path / "s_text_document")) == expected_tokens(sp, ["zero", "one", "three"], True)
    with pytest.raises(DataToolError, match=r"no column 'body' \(columns: 'text'\); choose the text column"):
        run("--input", par, "--text-column", "body", "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "b"))
    ints = write_parquet(tmp_path / "ints.parquet", ["a", "b"])
    with pytest.raises(DataToolError, match=r"column 'id' has type int64, expected a string column"):
        run("--input", ints, "--json-keys", "id", "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "i"))
    with pytest.raises(DataToolError, match="either --text-column or --json-keys"):
        preprocess.main(["--input", ints, "--json-keys", "content", "--text-column", "content",
                         "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "j")])


def test_corrupt_parquet_and_truncated_zst_name_the_file(tmp_path, tokenizer, docs):
    zst = write_zst(tmp_path / "in.jsonl.zst", docs * 20)
    data = (tmp_path / "in.jsonl.zst").read_bytes()
    (tmp_path / "in.jsonl.zst").write_bytes(data[:len(data) // 2])
    r = run_cli("--input", zst, "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "o" / "x"))
    assert r.returncode == 2 and f"{zst}: cannot read the file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet PAR1")
    r = run_cli("--input", str(bad), "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "o" / "y"))
    assert r.returncode == 2 and f"{bad}: cannot read the file" in r.stderr and "Traceback" not in r.stderr


def test_bad_json_line_in_zst_named_by_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{"text": "b"}\n{"text": \n'))
    r = run_cli("--input", str(path), "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and f"{path}:3: not valid JSON" in r.stderr


def test_tokenizer_trainer_reads_parquet_and_zst(tmp_path, docs):
    from data_tools import train_tokenizer
    from data_tools.inputs import iter_texts

    par = write_parquet(tmp_path / "t.parquet", docs)
    zst = write_zst(tmp_path / "t.jsonl.zst", docs)
    assert list(iter_texts(par, "parquet", ["content"], False)) == docs
    assert list(iter_texts(zst, "jsonl", ["text"], False)) == [d for d in docs]
    assert train_tokenizer.main(["--input", par, "--json-keys", "content", "--output-prefix", str(tmp_path / "spm"),
                                 "--vocab-size", "400", "--workers", "1"]) == 0
