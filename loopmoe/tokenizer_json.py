"""Facts of a Hugging Face ``tokenizer.json`` that preprocessing and training must agree on: whether a file is
one, its end-of-document token and id, its vocabulary size. Imports only the standard library and, when a
file is loaded, the ``tokenizers`` package: data_tools (no torch) and loopmoe.data both use this module.
"""
from __future__ import annotations

import json
import os

# End-of-text tokens of common tokenizers: GPT-2/Qwen/StarCoder, Llama 3, Llama 2/Mistral/T5, Gemma.
KNOWN_EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class TokenizerFileError(ValueError):
    """A tokenizer file cannot be used; the message names the file and the fix."""


def tokenizer_file(path: str) -> str:
    """A folder holding a tokenizer.json (a Hugging Face model folder) means that file; else ``path``."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return os.path.join(path, "tokenizer.json")
    return path


def is_tokenizer_json(path: str) -> bool:
    """A Hugging Face tokenizer.json (a JSON object) rather than a sentencepiece model (a protobuf)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def hf_eod_token(path: str, tok, name: str | None = None) -> tuple[str, int] | None:
    """The end-of-document token of a tokenizer.json and its id; None when it has none.

    ``name`` (--eod-token) wins; else ``eos_token`` of tokenizer_config.json beside it; else the
    first of KNOWN_EOD_TOKENS that the tokenizer has. A named token that does not exist is an error.
    """
    if name is not None:
        tid = tok.token_to_id(name)
        if tid is None:
            raise TokenizerFileError(f"--eod-token {name!r}: {path} has no such token; special tokens it has: "
                                f"{', '.join(repr(t) for t in special_tokens(tok)[:20]) or 'none'}")
        return name, tid
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
        except (OSError, ValueError) as e:
            raise TokenizerFileError(f"{config}: cannot read it as JSON ({e}); fix or remove it") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            tid = tok.token_to_id(eos)
            if tid is None:
                raise TokenizerFileError(f"{config}: eos_token {eos!r} is not in {path}; name the EOD with --eod-token")
            return eos, tid
    specials = set(special_tokens(tok))
    for cand in KNOWN_EOD_TOKENS:
        if cand in specials and tok.token_to_id(cand) is not None:
            return cand, tok.token_to_id(cand)
    return None


def special_tokens(tok) -> list[str]:
    return [t.content for t in tok.get_added_tokens_decoder().values() if t.special]


def hf_vocab_size(tok) -> int:
    """Ids run below this (the added tokens included; ids may have gaps)."""
    return max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab(with_added_tokens=True).values()) + 1)


def load_hf_tokenizer(path: str):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerFileError(f"{path} is a Hugging Face tokenizer.json, which needs the tokenizers package: "
                            f"pip install tokenizers") from None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise TokenizerFileError(f"{path}: not a valid tokenizer.json ({e})") from None
