"""loopmoe.data samples: megatron-core GPT datasets over .bin/.idx fixtures, the index cache, the blend,
the splits, and the resumable data-parallel sampler.

Every sample is checked against the raw document arrays the fixture wrote, independently of
megatron-core's index arrays: a sample must be a tail of one document, then whole documents, then a
head of another, all from the documents of its prefix and split.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from loopmoe.config import DataConfig
from loopmoe.data import FixedIdsTokenizer, ResumableBatchSampler, build_datasets, collate, load_tokenizer
from tests.test_indexed_reader import random_docs, write_prefix

pytestmark = pytest.mark.timeout(120)  # megatron-core loops forever on some bad inputs: fail instead

VOCAB, EOD, SEQ = 1000, 1, 32
RANGE_A, RANGE_B = (10, 500), (500, 1000)  # distinguishable token ids per prefix (EOD shared)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two prefixes of 400 documents each (lengths 0-59 plus EOD) and their raw documents."""
    root = tmp_path_factory.mktemp("corpus")
    docs_a = random_docs(400, *RANGE_A, seed=10)
    docs_b = random_docs(400, *RANGE_B, seed=11)
    a = write_prefix(str(root / "a_text_document"), docs_a)
    b = write_prefix(str(root / "b_text_document"), docs_b)
    return {"a": a, "b": b, "docs": {a: docs_a, b: docs_b}, "root": root}


@pytest.fixture
def tok() -> FixedIdsTokenizer:
    return FixedIdsTokenizer(vocab_size=VOCAB, eod=EOD)


def cfg_for(prefixes, cache_dir, **kw) -> DataConfig:
    base = DataConfig(prefixes=list(prefixes), split="80,10,10", seq_len=SEQ, seed=1234, cache_dir=str(cache_dir))
    return replace(base, **kw)


def text(sample) -> np.ndarray:
    """The seq_len + 1 tokens a sample was cut from: tokens then the last label."""
    return np.concatenate([np.asarray(sample["tokens"]), np.asarray(sample["labels"][-1:])])


def decompose(seq: np.ndarray, docs: list[np.ndarray], allowed: range) -> list[int] | None:
    """Document ids whose concatenation (tail of the first, whole middle ones, head of the last)
    equals ``seq``, using only documents in ``allowed``; None when impossible."""
    allowed_docs = [d for d in allowed if len(docs[d])]
    n = len(seq)

    def rest(pos: int) -> list[int] | None:  # seq[pos:] = whole docs ... + head of one doc
        if pos == n:
            return []
        for d in allowed_docs:
            k = min(len(docs[d]), n - pos)
            if np.array_equal(docs[d][:k], seq[pos:pos + k]):
                tail = [] if pos + k == n else rest(pos + k)
                if tail is not None:
                    return [d] + tail
        return None

    for d in allowed_docs:  # the first piece: a suffix of some document, starting at any offset
        doc = docs[d]
        for off in np.nonzero(doc == seq[0])[0]:
            k = min(len(doc) - int(off), n)
            if np.array_equal(doc[off:off + k], seq[:k]):
                tail = [] if k == n else rest(k)
                if tail is not None:
                    return [d] + tail
    return None


def split_ranges(n_docs: int, split=(0.8, 0.1, 0.1)) -> list[range]:
    """Contiguous document ranges of train/valid/test, the documented split rule."""
    edges = np.concatenate([[0], np.cumsum(split)]) / sum(split)
    return [range(int(round(edges[i] * n_docs)), int(round(edges[i + 1] * n_docs))) for i in range(3)]


# ---------------------------------------------------------------------------------------------------
# Samples


def test_sample_fields_and_contiguity(corpus, tok, tmp_path, single_process_group):
    train, valid, test = build_datasets(cfg_for([corpus["a"]], tmp_path), tok, 300, 30, 30)
    docs = corpus["docs"][corpus["a"]]
    assert len(train) >= 300 and len(valid) >= 30 and len(test) >= 30
    for ds, allowed in zip((train, valid, test), split_ranges(len(docs))):
        for i in range(0, len(ds), max(1, len(ds) // 40)):
            s = ds[i]
            assert s["tokens"].shape == (SEQ,) and s["tokens"].dtype == torch.int64
            assert torch.equal(s["labels"][:-1], s["tokens"][1:])  # labels = tokens shifted by one
            assert torch.equal(s["loss_mask"], torch.ones(SEQ))
            assert torch.equal(s["position_ids"], torch.arange(SEQ))
            used = decompose(text(s), docs, allowed)
            assert used is not None, f"sample {i} is not a run of consecutive document pieces of its split"


def test_samples_cross_document_boundaries(corpus, tok, tmp_path, single_process_group):
    # documents average ~30 tokens, samples are 33: most samples must span several documents
    train, _, _ = build_datasets(cfg_for([corpus["a"]], tmp_path), tok, 300, 30, 30)
    docs = corpus["docs"][corpus["a"]]
    spans = [len(decompose(text(train[i]), docs, split_ranges(len(docs))[0])) for i in range(60)]
    assert np.mean([k > 1 for k in spans]) > 0.5
    assert sum(int((text(train[i]) == EOD).sum()) for i in range(60)) > 0


def test_splits_disjoint_by_documents(corpus, tok, tmp_path, single_process_group):
    docs = corpus["docs"][corpus["a"]]
    datasets = build_datasets(cfg_for([corpus["a"]], tmp_path), tok, 300, 30, 30)
    ranges = split_ranges(len(docs))
    seen: list[set[int]] = []
    for ds, allowed in zip(datasets, ranges):
        ids: set[int] = set()
        for i in range(len(ds)):
            used = decompose(text(ds[i]), docs, allowed)
            assert used is not None, f"a sample uses documents outside its split {allowed}"
            ids.update(used)
        seen.append(ids)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    # and a split really is restricted: a train sample cannot be explained by the valid documents alone
    assert decompose(text(datasets[0][0]), docs, ranges[1]) is None


def test_deterministic_for_a_seed_and_different_across_seeds(corpus, tok, tmp_path, single_process_group):
    def first(seed: int, cache: str) -> list[np.ndarray]:
        train, _, _ = build_datasets(cfg_for([corpus["a"]], tmp_path / cache, seed=seed), tok, 300, 30, 30)
        return [text(train[i]) for i in range(50)]

    a1, a2, b = first(1, "c1"), first(1, "c2"), first(2, "c3")  # separate caches: really rebuilt
    assert all(np.array_equal(x, y) for x, y in zip(a1, a2))
    assert sum(np.array_equal(x, y) for x, y in zip(a1, b)) < 5


def test_second_build_reuses_the_cached_index(corpus, tok, tmp_path, single_process_group, caplog):
    cfg = cfg_for([corpus["a"], corpus["b"]], tmp_path / "cache", weights=[0.5, 0.5])
    train1, valid1, _ = build_datasets(cfg, tok, 500, 40, 40)
    files = {f: os.stat(tmp_path / "cache" / f).st_mtime_ns for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")}
    # 3 splits x (3 GPTDataset arrays x 2 prefixes + 2 BlendedDataset arrays)
    assert len(files) == 3 * (3 * 2 + 2), sorted(files)
    with caplog.at_level(logging.INFO, logger="loopmoe.data.samples"):
        train2, valid2, _ = build_datasets(cfg, tok, 500, 40, 40)
    after = {f: os.stat(tmp_path / "cache" / f).st_mtime_ns for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")}
    assert after == files  # same files, none rewritten
    assert any("0 .npy file(s) written" in r.getMessage() for r in caplog.records)
    assert len(train1) == len(train2)
    for i in range(0, len(train1), 7):
        assert np.array_equal(text(train1[i]), text(train2[i]))
        assert int(train1[i]["dataset_id"]) == int(train2[i]["dataset_id"])
    for i in range(len(valid1)):
        assert np.array_equal(text(valid1[i]), text(valid2[i]))


def test_blend_proportions_follow_weights(corpus, tok, tmp_path, single_process_group):
    a, b = corpus["a"], corpus["b"]
    train, _, _ = build_datasets(cfg_for([a, b], tmp_path, weights=[0.7, 0.3]), tok, 3000, 40, 40)
    assert len(train) >= 3000
    origin = []
    for i in range(3000):
        s = train[i]
        body = text(s)[text(s) != EOD]
        in_a = bool(((body >= RANGE_A[0]) & (body < RANGE_A[1])).all())
        in_b = bool(((body >= RANGE_B[0]) & (body < RANGE_B[1])).all())
        assert in_a != in_b, "a sample mixes the two prefixes"
        assert int(s["dataset_id"]) == (0 if in_a else 1)
        origin.append(in_a)
    assert abs(np.mean(origin) - 0.7) < 0.02
    assert abs(np.mean(origin[:500]) - 0.7) < 0.02  # mixed throughout, not in blocks
    # a blended sample is still a contiguous run of its own prefix's training documents
    for i in range(0, 3000, 150):
        prefix = a if origin[i] else b
        docs = corpus["docs"][prefix]
        assert decompose(text(train[i]), docs, split_ranges(len(docs))[0]) is not None


def test_empty_weights_mean_equal(corpus, tok, tmp_path, single_process_group):
    train, _, _ = build_datasets(cfg_for([corpus["a"], corpus["b"]], tmp_path), tok, 2000, 40, 40)
    share_a = np.mean([int(train[i]["dataset_id"]) == 0 for i in range(2000)])
    assert abs(share_a - 0.5) < 0.02


def test_split_without_documents_is_an_error_not_a_hang(tmp_path, tok, single_process_group):
    prefix = write_prefix(str(tmp_path / "tiny"), random_docs(5, 10, 500, seed=3))
    with pytest.raises(ValueError, match=r"tiny\.idx.*valid split"):
        build_datasets(cfg_for([prefix], tmp_path / "cache", split="98,1,1"), tok, 10, 2, 2)
    train, valid, test = build_datasets(cfg_for([prefix], tmp_path / "cache", split="100,0,0"), tok, 10, 0, 0)
    assert len(train) >= 10 and valid is None and test is None


def test_bad_inputs_are_named(corpus, tmp_path, single_process_group):
    small_vocab = FixedIdsTokenizer(vocab_size=600, eod=EOD)  # prefix b holds ids up to 999
    with pytest.raises(ValueError, match=r"b_text_document\.bin.*vocabulary"):
        build_datasets(cfg_for([corpus["a"], corpus["b"]], tmp_path), small_vocab, 100, 10, 10)
    with pytest.raises(ValueError, match=r"missing_prefix\.idx: file not found"):
        build_datasets(cfg_for([str(tmp_path / "missing_prefix")], tmp_path), small_vocab, 100, 10, 10)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_datasets(cfg_for([corpus["a"]], tmp_path), None, 100, 10, 10)
    with pytest.raises(ValueError, match="data.cache_dir"):
        build_datasets(cfg_for([corpus["a"]], ""), small_vocab, 100, 10, 10)


def test_needs_a_process_group(corpus, tmp_path):
    # in a fresh interpreter (the session's group exists here): a clear error, before any megatron import
    code = (
        "from loopmoe.config import DataConfig\n"
        "from loopmoe.data import build_datasets, FixedIdsTokenizer\n"
        f"cfg = DataConfig(prefixes=[{corpus['a']!r}], split='80,10,10', seq_len=32, cache_dir={str(tmp_path)!r})\n"
        "try:\n"
        "    build_datasets(cfg, FixedIdsTokenizer(1000, 1), 10, 1, 1)\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert "ERR build_datasets needs torch.distributed initialised" in out.stdout, out.stderr


# ---------------------------------------------------------------------------------------------------
# Tokenizer


def test_sentencepiece_tokenizer_through_megatron(tmp_path):
    import sentencepiece as spm

    words = ["alpha", "beta", "gamma", "delta", "loop", "expert", "router", "token"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, 10)) for _ in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=50, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert tok.vocab_size == sp.get_piece_size() == 50
    assert tok.eod == sp.eos_id() >= 0
    assert tok.pad == sp.pad_id()
    assert dict(tok.unique_identifiers)["tokenizer_path"] == str(tmp_path / "sp.model")

    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=50, model_type="bpe", minloglevel=2, eos_id=-1)
    with pytest.raises(ValueError, match="eos"):
        load_tokenizer(str(tmp_path / "noeos.model"))
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.model"))


def test_fixed_ids_tokenizer():
    tok = FixedIdsTokenizer(vocab_size=100, eod=7)
    assert tok.unique_identifiers["eod"] == 7 and tok.pad == -1
    assert FixedIdsTokenizer(100, 7).unique_identifiers != FixedIdsTokenizer(100, 8).unique_identifiers
    with pytest.raises(ValueError, match="eod=100"):
        FixedIdsTokenizer(vocab_size=100, eod=100)


# ---------------------------------------------------------------------------------------------------
# Sampler and collate


def run_batches(total: int, mb: int, dp_size: int, consumed: int = 0, steps: int | None = None) -> list[list[list[int]]]:
    """Per step, the micro-batch of every rank."""
    iters = [iter(ResumableBatchSampler(total, mb, r, dp_size, consumed)) for r in range(dp_size)]
    out = []
    for step in range(steps if steps is not None else 10**9):
        try:
            out.append([next(it) for it in iters])
        except StopIteration:
            break
    return out


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resumed_sampler_continues_exactly(dp_size):
    total, mb = 103, 4
    full = run_batches(total, mb, dp_size)
    g = mb * dp_size
    assert len(full) == total // g  # whole global batches only
    for step in (0, 1, 5, len(full) - 1, len(full)):
        resumed = run_batches(total, mb, dp_size, consumed=step * g)
        assert resumed == full[step:]
    for step, ranks in enumerate(full):  # the ranks together cover each global batch exactly once
        union = sorted(i for batch in ranks for i in batch)
        assert union == list(range(step * g, (step + 1) * g))
        assert all(len(batch) == mb for batch in ranks)


def test_sampler_resume_with_a_different_layout():
    # consumed_samples counts samples, so a resume with another dp_size starts at the right sample
    before = run_batches(100, 4, 2, steps=3)  # 24 samples consumed
    after = run_batches(100, 3, 4, consumed=24, steps=1)
    assert sorted(i for b in after[0] for i in b) == list(range(24, 36))
    assert max(i for ranks in before for b in ranks for i in b) == 23


def test_sampler_len_and_errors():
    s = ResumableBatchSampler(50, 4, dp_rank=1, dp_size=2, consumed_samples=16)
    assert len(s) == len(list(s)) == (50 - 16) // 8
    with pytest.raises(ValueError, match="consumed_samples=60"):
        ResumableBatchSampler(50, 4, 0, 2, consumed_samples=60)
    with pytest.raises(ValueError, match="dp_rank=2"):
        ResumableBatchSampler(50, 4, 2, 2)


def test_dataloader_resume_gives_identical_batches(corpus, tok, tmp_path, single_process_group):
    train, _, _ = build_datasets(cfg_for([corpus["a"], corpus["b"]], tmp_path, weights=[0.7, 0.3]), tok, 400, 20, 20)
    mb, dp = 3, 2

    def loader(rank: int, consumed: int):
        sampler = ResumableBatchSampler(len(train), mb, rank, dp, consumed)
        return iter(torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate))

    full = [loader(r, 0) for r in range(dp)]
    steps = [[next(it) for it in full] for _ in range(8)]
    resumed = [loader(r, 5 * mb * dp) for r in range(dp)]
    for step in range(5, 8):
        for r in range(dp):
            got = next(resumed[r])
            for key in ("tokens", "labels", "loss_mask", "dataset_id"):
                assert torch.equal(got[key], steps[step][r][key])
    batch = steps[0][0]
    assert batch["tokens"].shape == batch["labels"].shape == batch["loss_mask"].shape == (mb, SEQ)
    assert batch["tokens"].dtype == batch["labels"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["dataset_id"].shape == (mb,)
    # collate keeps each sample's own tokens, in order
    for j, idx in enumerate(range(mb)):
        assert torch.equal(batch["tokens"][j], train[idx]["tokens"])
