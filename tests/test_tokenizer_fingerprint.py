"""Data remembers its tokenizer (issue 26): preprocess.py writes PREFIX.tokenizer.json, megatron-core still
reads the pair, merge.py carries the record and refuses two tokenizers, and pretrain_loopmoe.py refuses data
made by another tokenizer of the SAME vocabulary size (ids in range either way) before the run directory is
touched, and accepts data without a record with a warning."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, make_token_data

V = 512


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    """Tokenizers A and B of the same size, trained on different slices (different files), and data of A
    (as conftest makes it) and of B."""
    a = make_token_data(tmp_path_factory.mktemp("a"), 200, V)
    b = make_token_data(tmp_path_factory.mktemp("b"), 120, V)
    return {"a": a, "b": b}


def preprocess(src: str, tok: str, out: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "data_tools/preprocess.py", "--input", src, "--tokenizer-model", tok,
                           "--output-prefix", out, "--append-eod", "--workers", "1", *extra],
                          cwd=ROOT, capture_output=True, text=True)


def merge(out: str, *inputs: str) -> subprocess.CompletedProcess:
    args = [a for p in inputs for a in ("--input", p)]
    return subprocess.run([sys.executable, "data_tools/merge.py", *args, "--output-prefix", out],
                          cwd=ROOT, capture_output=True, text=True)


def test_preprocess_writes_the_record_and_megatron_reads_the_pair(two):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    a = two["a"]
    with open(a["prefix"] + ".tokenizer.json") as f:
        rec = json.load(f)
    with open(a["tok"], "rb") as f:
        assert rec["sha256"] == hashlib.sha256(f.read()).hexdigest()  # an independent digest of the file
    sp = spm.SentencePieceProcessor(model_file=a["tok"])
    assert (rec["vocab_size"], rec["eod_id"], rec["path"]) == (sp.get_piece_size(), sp.eos_id(),
                                                                os.path.abspath(a["tok"]))
    ds = IndexedDataset(a["prefix"])  # megatron-core's own reader, beside the sidecar
    assert len(ds) > 0 and int(ds[len(ds) - 1][-1]) == sp.eos_id()  # the last document ends with EOD
    assert two["a"]["tok"] != two["b"]["tok"] and rec["vocab_size"] == V  # same size, other file


def test_merge_carries_the_record_and_refuses_two_tokenizers(two, tmp_path):
    a, b = two["a"], two["b"]
    # one input listed twice is read once: merge a with a copy of itself under another name
    for ext in (".bin", ".idx", ".tokenizer.json"):
        os.link(a["prefix"] + ext, str(tmp_path / "a2") + ext)
    out = merge(str(tmp_path / "aa"), a["prefix"], str(tmp_path / "a2"))
    assert out.returncode == 0, out.stderr
    with open(a["prefix"] + ".tokenizer.json") as f, open(tmp_path / "aa.tokenizer.json") as g:
        assert json.load(f) == json.load(g)
    bad = merge(str(tmp_path / "ab"), a["prefix"], b["prefix"])
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert a["tok"] in bad.stderr or b["tok"] in bad.stderr, bad.stderr
    assert not os.path.exists(tmp_path / "ab.idx") and not os.path.exists(tmp_path / "ab.tokenizer.json")


def test_merge_of_old_data_writes_no_record(two, tmp_path):
    a = two["a"]
    for name in ("o1", "o2"):
        for ext in (".bin", ".idx"):  # a pair from before records existed
            os.link(a["prefix"] + ext, str(tmp_path / name) + ext)
    out = merge(str(tmp_path / "oo"), str(tmp_path / "o1"), str(tmp_path / "o2"))
    assert out.returncode == 0 and "no tokenizer record" in out.stderr, out.stderr
    assert os.path.exists(tmp_path / "oo.idx") and not os.path.exists(tmp_path / "oo.tokenizer.json")


def test_overwrite_replaces_the_record(two, tmp_path):
    a, b = two["a"], two["b"]
    out = str(tmp_path / "x")
    assert preprocess(a["corpus"], a["tok"], out).returncode == 0
    assert preprocess(b["corpus"], b["tok"], out, "--overwrite").returncode == 0
    with open(out + "_text_document.tokenizer.json") as f:
        assert json.load(f)["path"] == os.path.abspath(b["tok"])


def _pretrain(run, prefix, tok) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml", f"model.vocab_size={V}",
           f"data.prefixes={prefix}", f"data.tokenizer_model={tok}", f"logging.run_dir={run}", "train.steps=1"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_training_refuses_data_of_another_tokenizer_of_the_same_size(two, tmp_path):
    a, b = two["a"], two["b"]
    out = _pretrain(tmp_path / "run", a["prefix"], b["tok"])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("input error")]
    assert len(lines) == 1, out.stderr
    assert os.path.abspath(a["tok"]) in lines[0] and os.path.abspath(b["tok"]) in lines[0]
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_data_without_a_record_is_accepted_with_a_warning(two, tmp_path, caplog):
    from loopmoe.config import load_config

    sys.path.insert(0, ROOT)
    import pretrain_loopmoe

    a = two["a"]
    for ext in (".bin", ".idx"):
        os.link(a["prefix"] + ext, str(tmp_path / "old") + ext)
    cfg = load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                      [f"data.prefixes={tmp_path / 'old'}", f"data.tokenizer_model={a['tok']}",
                       f"logging.run_dir={tmp_path / 'run'}"])
    with caplog.at_level(logging.WARNING):
        pretrain_loopmoe.check_before_writing(cfg, None)
    assert any("no tokenizer record" in r.getMessage() and str(tmp_path / "old") in r.getMessage()
               for r in caplog.records), caplog.text
    cfg.data.prefixes = [a["prefix"]]  # with its record and its own tokenizer: silent
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pretrain_loopmoe.check_before_writing(cfg, None)
    assert not caplog.records
    cfg.data.tokenizer_model = two["b"]["tok"]  # the same check refuses the other tokenizer
    from loopmoe.tokenizer_fingerprint import TokenizerMismatch

    with pytest.raises(TokenizerMismatch):
        pretrain_loopmoe.check_before_writing(cfg, None)
