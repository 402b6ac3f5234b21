"""The tokenizer object megatron-core's datasets need: ``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``.

* From a sentencepiece ``.model``: megatron-core 0.16.1's own ``GPTTokenizer`` (via
  ``MegatronTokenizer.from_pretrained`` with the "sentencepiece" library). It works on the CPU with
  only ``sentencepiece`` installed; its ``eod`` is the model's ``eos`` id and ``pad`` its ``pad`` id
  (-1 when the model has none, which megatron's datasets treat as "no padding id").
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


def load_tokenizer(
    model_path: str | None = None, *, vocab_size: int | None = None, eod: int | None = None, pad: int = -1
) -> DatasetTokenizer:
    """A sentencepiece ``model_path`` -> megatron-core's GPTTokenizer; or explicit ``vocab_size``/``eod``."""
    if model_path:
        if vocab_size is not None or eod is not None:
            raise ValueError("load_tokenizer: give either model_path or vocab_size/eod, not both")
        if not os.path.isfile(model_path):
            raise ValueError(f"{model_path}: sentencepiece model not found; check data.tokenizer_model")
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
