"""The tokenizer object megatron-core's datasets need: ``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``.

* From a sentencepiece ``.model``: megatron-core 0.16.1's own ``GPTTokenizer`` (via
  ``MegatronTokenizer.from_pretrained`` with the "sentencepiece" library). It works on the CPU with
  only ``sentencepiece`` installed; its ``eod`` is the model's ``eos`` id and ``pad`` its ``pad`` id
  (-1 when the model has none, which megatron's datasets treat as "no padding id").
* From a Hugging Face ``tokenizer.json`` (the same ``data.tokenizer_model`` path; told apart by content):
  ``HFJsonTokenizer`` below, through the ``tokenizers`` library. Its ``eod`` is the end-of-text token
  data_tools/preprocess.py appends (``eos_token`` of a tokenizer_config.json beside it, else
  <|endoftext|>, <|end_of_text|>, </s>, <eos>; loopmoe.tokenizer_json.hf_eod_token), so training cuts
  documents where the data has them. megatron-core's HuggingFaceTokenizer would need transformers'
  AutoTokenizer and a tokenizer_config.json; a bare tokenizer.json is what people have.
* From explicit ids (tests, synthetic data): ``FixedIdsTokenizer`` below. megatron-core has no class
  for this: its ``NullTokenizer`` forces ``eod = vocab_size`` and reports ``vocab_size + 1``.

``unique_identifiers`` is hashed into the names of the cached dataset indices, so it must be stable
across runs (it is: class name plus model path, or class name plus the ids).
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DatasetTokenizer(Protocol):
    """What megatron-core's GPTDataset reads from ``config.tokenizer``."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod(self) -> int: ...

    @property
    def pad(self) -> int: ...

    @property
    def unique_identifiers(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class FixedIdsTokenizer:
    """Only the ids: no text encoding. For tests and data whose tokenizer lives elsewhere."""

    vocab_size: int
    eod: int
    pad: int = -1  # -1: no padding id (megatron's datasets then never mask real tokens as padding)

    def __post_init__(self) -> None:
        check_tokenizer(self)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("vocab_size", self.vocab_size), ("eod", self.eod), ("pad", self.pad)]
        )


def check_tokenizer(tok: Any) -> None:
    """Raise ``ValueError`` when the ids cannot work (e.g. a sentencepiece model trained without eos)."""
    vocab, eod = int(tok.vocab_size), int(tok.eod)
    if vocab < 1:
        raise ValueError(f"tokenizer vocab_size={vocab} must be >= 1")
    if not 0 <= eod < vocab:
        raise ValueError(
            f"tokenizer end-of-document id eod={eod} is not in [0, vocab_size={vocab}); a sentencepiece model "
            f"needs an eos piece (train it with eos_id >= 0, the default is 2) because its eos id is the EOD"
        )


@dataclass(frozen=True)
class HFJsonTokenizer:
    """A Hugging Face tokenizer.json: ids for the datasets, and text encode/decode for generation."""

    path: str
    vocab_size: int
    eod: int
    eod_token: str
    pad: int = -1

    def __post_init__(self) -> None:
        check_tokenizer(self)

    @property
    def unique_identifiers(self) -> dict[str, Any]:
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"), ("path", self.path),
                            ("vocab_size", self.vocab_size), ("eod", self.eod)])

    @property
    def _tok(self):
        from loopmoe.tokenizer_json import load_hf_tokenizer

        tok = self.__dict__.get("_cached")
        if tok is None:
            tok = load_hf_tokenizer(self.path)
            object.__setattr__(self, "_cached", tok)
        return tok

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def is_tokenizer_json(path: str) -> bool:
    from loopmoe.tokenizer_json import is_tokenizer_json as check

    return check(path)


def load_hf_json(path: str, eod_token: str | None = None) -> HFJsonTokenizer:
    """tokenizer.json -> HFJsonTokenizer; ValueError when it has no end-of-text token (name it)."""
    from loopmoe.tokenizer_json import TokenizerFileError, hf_eod_token, hf_vocab_size, load_hf_tokenizer

    try:
        tok = load_hf_tokenizer(path)
        found = hf_eod_token(path, tok, eod_token)
    except TokenizerFileError as e:
        raise ValueError(str(e)) from None
    if found is None:
        raise ValueError(f"{path}: cannot tell its end-of-document token (no tokenizer_config.json eos_token beside "
                         f"it and none of the usual names); put a tokenizer_config.json with \"eos_token\" beside it")
    return HFJsonTokenizer(path=os.path.abspath(path), vocab_size=hf_vocab_size(tok), eod=found[1], eod_token=found[0])


def load_tokenizer(
    model_path: str | None = None, *, vocab_size: int | None = None, eod: int | None = None, pad: int = -1
) -> DatasetTokenizer:
    """A sentencepiece ``model_path`` -> megatron-core's GPTTokenizer; a tokenizer.json -> HFJsonTokenizer;
    or explicit ``vocab_size``/``eod``."""
    if model_path:
        if vocab_size is not None or eod is not None:
            raise ValueError("load_tokenizer: give either model_path or vocab_size/eod, not both")
        from loopmoe.tokenizer_json import tokenizer_file

        model_path = tokenizer_file(model_path)
        if not os.path.isfile(model_path):
            raise ValueError(f"{model_path}: tokenizer not found (a sentencepiece .model or a tokenizer.json); "
                             f"check data.tokenizer_model")
        if is_tokenizer_json(model_path):
            return load_hf_json(model_path)
        from megatron.core.tokenizers import MegatronTokenizer  # heavy import (~3 s): only here

        # The absolute path: it is part of unique_identifiers, so the dataset cache does not depend on cwd.
        tok = MegatronTokenizer.from_pretrained(
            tokenizer_path=os.path.abspath(model_path),
            metadata_path={"library": "sentencepiece", "model_type": "gpt"},
        )
        check_tokenizer(tok)
        return tok  # type: ignore[return-value]
    if vocab_size is None or eod is None:
        raise ValueError("load_tokenizer: give a sentencepiece model_path, or both vocab_size and eod")
    return FixedIdsTokenizer(vocab_size=vocab_size, eod=eod, pad=pad)


class TextTokenizer:
    """Text <-> ids for generation and export, from either kind of tokenizer file.

    ``eos_id`` is the end-of-document id the training data has between documents (sentencepiece: the eos
    piece; tokenizer.json: its end-of-text token); ids that do not exist are None.
    """

    def __init__(self, path: str) -> None:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise ValueError(f"{path}: tokenizer not found (a sentencepiece .model or a tokenizer.json)")
        self.path = path
        self.is_json = is_tokenizer_json(path)
        if self.is_json:
            self.hf = load_hf_json(path)
            self.vocab_size, self.eos_id = self.hf.vocab_size, self.hf.eod
            tok = self.hf._tok
            specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
            pick = lambda *names: next((tok.token_to_id(n) for n in names if n in specials), None)  # noqa: E731
            self.bos_id = pick("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[BOS]")
            self.pad_id = pick("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
            self.unk_id = pick("<unk>", "[UNK]", "<|unk|>")
        else:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=path)
            get = lambda i: i if i >= 0 else None  # noqa: E731
            self.vocab_size = self.sp.vocab_size()
            self.eos_id, self.bos_id = get(self.sp.eos_id()), get(self.sp.bos_id())
            self.pad_id, self.unk_id = get(self.sp.pad_id()), get(self.sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self.hf.tokenize(text) if self.is_json else self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.hf.detokenize(ids) if self.is_json else self.sp.decode(list(ids))
