"""data_tools/train_tokenizer.py: vocabulary and special ids as asked, lossless byte fallback, inputs,
atomic writes, refusal to overwrite, and the line handling that feeds sentencepiece."""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys

import pytest
import sentencepiece as spm

from data_tools import train_tokenizer
from data_tools._common import DataToolError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "python_docs.jsonl")
SCRIPT = os.path.join(ROOT, "data_tools", "train_tokenizer.py")


def sample_docs(n: int) -> list[str]:
    """``n`` real documents from the demo corpus when it is there, else generated English-like ones."""
    if os.path.exists(CORPUS):
        with open(CORPUS, encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for _, line in zip(range(n), f)]
        if len(docs) == n:
            return docs
    rng = random.Random(0)
    words = ("the module function returns a value list of objects when called with an argument "
             "python data class method import error file path string integer default").split()
    return ["\n".join("    " * rng.randint(0, 2) + " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
                      for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for d in sample_docs(200):
            f.write(json.dumps({"text": d, "source": "test"}) + "\n")
    return str(path)


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_cli_vocab_special_ids_and_printout(tmp_path, corpus):
    prefix = str(tmp_path / "tok" / "spm")
    r = run_cli("--input", corpus, "--output-prefix", prefix, "--vocab-size", "512")
    assert r.returncode == 0, r.stderr
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert sp.vocab_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert "vocabulary size: 512" in r.stdout
    assert "end-of-document (EOS) id: 2 (</s>)" in r.stdout
    assert sorted(os.listdir(tmp_path / "tok")) == ["spm.model", "spm.vocab"]  # no temporary leftovers
    with open(prefix + ".vocab", encoding="utf-8") as f:
        assert sum(1 for _ in f) == 512


def test_custom_ids_model_type_and_no_eos(tmp_path, corpus):
    prefix = str(tmp_path / "u")
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", prefix, "--vocab-size", "600",
                                 "--model-type", "unigram", "--unk-id", "1", "--bos-id", "-1", "--eos-id", "0",
                                 "--pad-id", "-1", "--no-byte-fallback"]) == 0
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert sp.vocab_size() == 600
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (1, -1, 0, -1)
    assert sp.piece_to_id("<0x41>") == sp.unk_id()  # no byte pieces without byte fallback
    r = run_cli("--input", corpus, "--output-prefix", str(tmp_path / "n"), "--vocab-size", "512",
                "--eos-id", "-1")
    assert r.returncode == 0, r.stderr
    assert "end-of-document (EOS) id: none - preprocess.py --append-eod will refuse" in r.stdout


def test_byte_fallback_is_lossless(tmp_path, corpus):
    prefix = str(tmp_path / "b")
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", prefix, "--vocab-size", "512"]) == 0
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    text = "def f(x):\n        return x  # ünïcødé 漢字 🙂\n\n\tTab  two  spaces\r\n"
    assert sp.decode(sp.encode(text)) == text
    assert "<0xE6>" in sp.encode("漢", out_type=str)  # an unseen character falls back to its UTF-8 bytes
    assert sp.unk_id() not in sp.encode(text)
    assert sp.encode("\n", out_type=str)[-1] == "<0x0A>"  # one token per newline


def test_refuses_overwrite_and_keeps_old_model_when_training_fails(tmp_path, corpus):
    prefix = str(tmp_path / "spm")
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", prefix, "--vocab-size", "512"]) == 0
    with open(prefix + ".model", "rb") as f:
        before = f.read()
    r = run_cli("--input", corpus, "--output-prefix", prefix, "--vocab-size", "600")
    assert r.returncode == 2
    assert f"{prefix}.model already exists; pass --overwrite" in r.stderr
    # --overwrite, but training fails (vocabulary too big for the text): the old model is untouched.
    r = run_cli("--input", corpus, "--output-prefix", prefix, "--vocab-size", "60000", "--overwrite")
    assert r.returncode == 2 and "sentencepiece training failed" in r.stderr and "--vocab-size" in r.stderr
    with open(prefix + ".model", "rb") as f:
        assert f.read() == before
    assert sorted(os.listdir(tmp_path)) == ["spm.model", "spm.vocab"]
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", prefix, "--vocab-size", "600",
                                 "--overwrite"]) == 0
    assert spm.SentencePieceProcessor(model_file=prefix + ".model").vocab_size() == 600


def test_inputs_globs_gzip_text_keys_and_sampling(tmp_path, capsys):
    docs = sample_docs(120)
    (tmp_path / "shards").mkdir()
    with gzip.open(tmp_path / "shards" / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[:60]:
            f.write(json.dumps({"body": d}) + "\n")
    with open(tmp_path / "shards" / "b.jsonl", "w") as f:
        for d in docs[60:]:
            f.write(json.dumps({"body": d}) + "\n")
    (tmp_path / "extra.txt").write_text("\n".join(docs[:10]), encoding="utf-8")
    n_lines = sum(1 for d in docs + docs[:10] for line in d.split("\n") if line.strip())
    argv = ["--input", str(tmp_path / "shards" / "*.jsonl*"), "--input", str(tmp_path / "extra.txt"),
            "--json-keys", "body", "--vocab-size", "400"]
    assert train_tokenizer.main([*argv, "--output-prefix", str(tmp_path / "all"), "--max-sentences", "0"]) == 0
    assert f"on {n_lines:,} of {n_lines:,} lines" in capsys.readouterr().out
    assert train_tokenizer.main([*argv, "--output-prefix", str(tmp_path / "s"), "--max-sentences", "50"]) == 0
    assert f"on 50 of {n_lines:,} lines" in capsys.readouterr().out
    with pytest.raises(DataToolError, match=r"field 'text' is missing \(fields present: 'body'\)"):
        train_tokenizer.main(["--input", str(tmp_path / "shards" / "b.jsonl"), "--output-prefix",
                              str(tmp_path / "k")])


def test_bad_input_errors(tmp_path, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    r = run_cli("--input", str(bad), "--output-prefix", str(tmp_path / "o" / "spm"), "--vocab-size", "300")
    assert r.returncode == 2 and f"{bad}:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_cli("--input", str(tmp_path / "none" / "*.jsonl"), "--output-prefix", str(tmp_path / "o" / "spm"))
    assert r.returncode == 2 and "matches no files" in r.stderr
    for flags, msg in ((["--eos-id", "1"], "special ids must differ"),
                       (["--pad-id", "9000"], "outside the vocabulary"),
                       (["--vocab-size", "200"], "leaves no room for learned pieces")):
        r = run_cli("--input", corpus, "--output-prefix", str(tmp_path / "o" / "spm"), *flags)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_line_chunks_respect_the_byte_limit():
    line = "naïve " * 40 + "x" * 100 + " 漢字" * 30
    for limit in (16, 50, 4192):
        chunks = list(train_tokenizer.line_chunks(line, limit))
        assert "".join(chunks) == line
        assert all(0 < len(c.encode("utf-8")) <= limit for c in chunks)
    assert list(train_tokenizer.line_chunks("short", 16)) == ["short"]
    lines = list(train_tokenizer.training_lines(["  a\n\n   \nb\r\n" + "y" * 30], 16))
    assert lines == ["  a", "b", "y" * 16, "y" * 14]


def test_reservoir_sample_is_uniform_subset_and_deterministic():
    items = [str(i) for i in range(1000)]
    sample, n = train_tokenizer.reservoir_sample(iter(items), 100, seed=1)
    assert n == 1000 and len(sample) == 100 and len(set(sample)) == 100 and set(sample) <= set(items)
    assert sample == train_tokenizer.reservoir_sample(iter(items), 100, seed=1)[0]
    assert sample != train_tokenizer.reservoir_sample(iter(items), 100, seed=2)[0]
    assert sum(int(s) >= 500 for s in sample) in range(30, 71)  # both halves represented
    assert train_tokenizer.reservoir_sample(iter(items), 0, seed=1) == (items, 1000)
