"""data_tools/encoders.py's sentencepiece word cache (BPE models): token for token what sp.encode gives per document.

The cache is exact only by an argument about the vocabulary (no piece crosses the start of a run of
spaces), so it is checked against sentencepiece itself on adversarial random strings (spaces, literal
"▁", newlines, tabs, digits, non-ASCII, long runs), for BPE models (unigram ones are refused the cache
and checked too), with and without EOD,
when the cache fills and restarts, and for a model the argument does not cover (another normaliser),
which must be refused the cache and still be exact."""
from __future__ import annotations

import random

import numpy as np
import pytest

from data_tools import encoders, train_tokenizer
from tests.test_preprocess import EDGE_DOCS, sample_docs, write_jsonl

ALPHABET = [" ", " ", " ", "\u2581", "\n", "\t", "a", "b", "e", "th", "the", "1", "23", "é", "漢", "🙂", ".", ",",
            "def", "    ", "\r\n", "<", "/s>", "\x00"]


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "  ", "\u2581", " \u2581 ", "a ", " a", "a  ", "\n", " \n ", "a\u2581 b", "x" * 300 + " y"]
    for _ in range(n):
        out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))))
    return out


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def model(request, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp(f"tok_{request.param}")
    corpus = write_jsonl(d / "train.jsonl", sample_docs(300) + EDGE_DOCS + random_texts(200, 1))
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", str(d / "spm"), "--vocab-size", "600",
                                 "--workers", "1", "--model-type", request.param]) == 0
    return str(d / "spm.model")


def reference(sp, texts: list[str], eod: int) -> list[list[int]]:
    return [sp.encode(t) + ([eod] if eod >= 0 else []) for t in texts]


def split(tokens: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    ends = np.cumsum(counts)
    return [tokens[e - c:e].tolist() for e, c in zip(ends, counts)]


@pytest.mark.parametrize("append_eod", [True, False])
def test_cache_equals_sentencepiece_on_adversarial_text(model, append_eod):
    enc = encoders.open_tokenizer(model, append_eod)
    # BPE with the project's tokenizer settings gets the cache; unigram is encoded document by document.
    assert enc.chunked == ("model type UNIGRAM" not in enc.note), enc.note
    texts = random_texts(3000, 2) + sample_docs(40, start=300) + EDGE_DOCS
    want = reference(enc.sp, texts, enc.eod)
    for start in range(0, len(texts), 97):  # many batches: later ones mostly hit the cache
        batch = texts[start:start + 97]
        tokens, counts, empty = enc.encode_documents(batch)
        assert tokens.dtype == np.uint16
        assert split(tokens, counts) == want[start:start + 97]
        assert empty == sum(1 for t in batch if not enc.sp.encode(t))


def test_cache_restart_when_full_is_still_exact(model, monkeypatch):
    monkeypatch.setattr(encoders, "MAX_CACHE", 50)  # fills in every batch
    monkeypatch.setattr(encoders, "MAX_CACHED_CHUNK", 3)
    enc = encoders.open_tokenizer(model, True)
    texts = random_texts(600, 3)
    got = []
    for start in range(0, len(texts), 31):
        tokens, counts, _ = enc.encode_documents(texts[start:start + 31])
        got += split(tokens, counts)
    assert got == reference(enc.sp, texts, enc.eod)
    assert len(enc._cache) <= 50 + 31 * 40


def test_other_normaliser_is_refused_the_cache_and_still_exact(tmp_path):
    corpus = write_jsonl(tmp_path / "t.jsonl", sample_docs(200))
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", str(tmp_path / "nfkc"), "--vocab-size", "400",
                                 "--workers", "1", "--normalization", "nmt_nfkc"]) == 0
    enc = encoders.open_tokenizer(str(tmp_path / "nfkc.model"), True)
    assert not enc.chunked and "normaliser 'nmt_nfkc'" in enc.note
    texts = random_texts(300, 4)
    tokens, counts, _ = enc.encode_documents(texts)
    assert split(tokens, counts) == reference(enc.sp, texts, enc.eod)
