"""Hugging Face tokenizer.json in preprocess.py, training (load_tokenizer), generation and export.

The tokenizers are built offline here with the tokenizers library's own trainer on a slice of the corpus
(no hub). The reference for the files is megatron-core's IndexedDatasetBuilder fed with the ids that
tokenizers' single-document ``encode`` gives (plus the EOD), and its IndexedDataset reads them back."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_tools import preprocess
from data_tools._common import DataToolError
from tests.test_preprocess import EDGE_DOCS, files_of, megatron_builder_files, read_back, run_cli, sample_docs, \
    write_jsonl

tokenizers = pytest.importorskip("tokenizers")


def train_bpe(path, specials=("<|endoftext|>",), vocab=600) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_docs(200) + EDGE_DOCS, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> str:
    return train_bpe(tmp_path_factory.mktemp("hf") / "tokenizer.json")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return EDGE_DOCS + sample_docs(50, start=300)


def hf_ids(path: str, docs: list[str], eod: int | None) -> list[list[int]]:
    tok = tokenizers.Tokenizer.from_file(path)
    return [tok.encode(d, add_special_tokens=False).ids + ([eod] if eod is not None else []) for d in docs]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_tokenizer_json_bytes_match_megatron_builder(tmp_path, hf_json, docs, workers):
    from megatron.core.datasets.indexed_dataset import DType

    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    r = run_cli("--input", inp, "--tokenizer-model", hf_json, "--append-eod", "--workers", workers,
                "--batch-size", "7", "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 0, r.stderr
    eod = tokenizers.Tokenizer.from_file(hf_json).token_to_id("<|endoftext|>")
    assert f"EOD id {eod}" in r.stderr and "huggingface" in r.stderr
    want = hf_ids(hf_json, docs, eod)
    vocab = tokenizers.Tokenizer.from_file(hf_json).get_vocab_size()
    assert DType.optimal_dtype(vocab) is np.uint16
    assert files_of(str(tmp_path / "x_text_document")) == megatron_builder_files(tmp_path, want, np.uint16)
    assert read_back(str(tmp_path / "x_text_document")) == want


def test_eod_from_tokenizer_config_or_named_and_checked(tmp_path, docs):
    d = tmp_path / "tok"
    d.mkdir()
    path = train_bpe(d / "tokenizer.json", specials=("<|endoftext|>", "<|im_end|>"))
    tok = tokenizers.Tokenizer.from_file(path)
    inp = write_jsonl(tmp_path / "in.jsonl", docs[:8])
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert preprocess.main(["--input", inp, "--tokenizer-model", str(d), "--append-eod", "--workers", "1",
                            "--output-prefix", str(tmp_path / "cfg")]) == 0  # a directory works too
    assert read_back(str(tmp_path / "cfg_text_document")) == hf_ids(path, docs[:8], tok.token_to_id("<|im_end|>"))
    assert preprocess.main(["--input", inp, "--tokenizer-model", path, "--append-eod", "--workers", "1",
                            "--eod-token", "<|endoftext|>", "--output-prefix", str(tmp_path / "named")]) == 0
    assert read_back(str(tmp_path / "named_text_document")) == hf_ids(path, docs[:8],
                                                                      tok.token_to_id("<|endoftext|>"))
    r = run_cli("--input", inp, "--tokenizer-model", path, "--append-eod", "--eod-token", "<eot>",
                "--output-prefix", str(tmp_path / "o" / "x"))
    assert r.returncode == 2 and "--eod-token '<eot>'" in r.stderr and "'<|im_end|>'" in r.stderr
    assert not (tmp_path / "o").exists()


def test_tokenizer_without_eod_refused_with_the_fix(tmp_path, docs):
    path = train_bpe(tmp_path / "tokenizer.json", specials=("<pad>",))
    inp = write_jsonl(tmp_path / "in.jsonl", docs[:3])
    r = run_cli("--input", inp, "--tokenizer-model", path, "--append-eod", "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "name it with --eod-token" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": ')
    r = run_cli("--input", inp, "--tokenizer-model", str(tmp_path / "broken.json"), "--output-prefix",
                str(tmp_path / "y"))
    assert r.returncode == 2 and "not a valid tokenizer.json" in r.stderr


def test_vocabulary_over_65500_is_int32(tmp_path):
    """megatron-core's rule: uint16 below 65,500 ids, int32 above; ids above 65,535 survive."""
    from megatron.core.datasets.indexed_dataset import DType
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70_000)}
    words["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    docs = ["w1 w65535 w65536 w69999", "", "w70 w7"]
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    assert preprocess.main(["--input", inp, "--tokenizer-model", path, "--append-eod", "--workers", "1",
                            "--output-prefix", str(tmp_path / "big")]) == 0
    want = [[1, 65535, 65536, 69999, 70000], [70000], [70, 7, 70000]]
    assert DType.optimal_dtype(70_001) is np.int32
    assert files_of(str(tmp_path / "big_text_document")) == megatron_builder_files(tmp_path, want, np.int32)
    assert read_back(str(tmp_path / "big_text_document")) == want


def test_training_and_generation_accept_tokenizer_json(hf_json):
    from loopmoe.data.tokenizer import HFJsonTokenizer, TextTokenizer, load_tokenizer

    tok = tokenizers.Tokenizer.from_file(hf_json)
    t = load_tokenizer(hf_json)  # what training builds its datasets with (data.tokenizer_model)
    assert isinstance(t, HFJsonTokenizer)
    assert t.eod == tok.token_to_id("<|endoftext|>") and t.vocab_size == tok.get_vocab_size()
    assert t.unique_identifiers["path"] == os.path.abspath(hf_json)
    text = TextTokenizer(hf_json)  # what generate.py and the export use
    ids = text.encode("Hello world, ünïcødé.")
    assert ids == tok.encode("Hello world, ünïcødé.", add_special_tokens=False).ids
    assert text.decode(ids) == "Hello world, ünïcødé." and text.eos_id == t.eod
    with pytest.raises(ValueError, match="tokenizer not found"):
        load_tokenizer(hf_json + ".missing")


def test_export_wraps_tokenizer_json(hf_json, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from loopmoe.data.tokenizer import TextTokenizer
    from loopmoe.export.hf import json_tokenizer

    text = TextTokenizer(hf_json)
    json_tokenizer(text, model_max_length=128).save_pretrained(str(tmp_path / "hf"))
    back = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    s = "Exported:\n    def f(x): return x  # ünï"
    assert back(s, add_special_tokens=False).input_ids == text.encode(s)
    assert back.eos_token == "<|endoftext|>" and back.eos_token_id == text.eos_id


def test_eod_token_flag_is_for_tokenizer_json_only(tmp_path):
    from tests.test_preprocess import train_tokenizer

    corpus = write_jsonl(tmp_path / "t.jsonl", sample_docs(50))
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", str(tmp_path / "spm"), "--vocab-size", "500",
                                 "--workers", "1"]) == 0
    with pytest.raises(DataToolError, match="--eod-token is for Hugging Face tokenizer.json"):
        preprocess.main(["--input", corpus, "--tokenizer-model", str(tmp_path / "spm.model"), "--eod-token", "</s>",
                         "--output-prefix", str(tmp_path / "x")])


def test_full_export_with_tokenizer_json(hf_json, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, GenerationConfig

    from loopmoe.export.hf import SPM_COPY, export
    from tests.test_export import build

    m, cfg = build("tiny_loopmoe", vocab_size=1024)
    out = str(tmp_path / "hf")
    summary = export(m, cfg, out, tokenizer=hf_json)
    eod = tokenizers.Tokenizer.from_file(hf_json).token_to_id("<|endoftext|>")
    assert summary["tokenizer"] == hf_json and SPM_COPY not in os.listdir(out)
    assert GenerationConfig.from_pretrained(out).eos_token_id == eod
    back = AutoTokenizer.from_pretrained(out)
    assert back("a b  c\n", add_special_tokens=False).input_ids == \
        tokenizers.Tokenizer.from_file(hf_json).encode("a b  c\n", add_special_tokens=False).ids
