"""Tokenizers for preprocess.py: a sentencepiece ``.model`` or a Hugging Face ``tokenizer.json``.

``open_tokenizer(path)`` decides by the file's content (a JSON object is a tokenizer.json, anything else
a sentencepiece model proto) and returns an ``Encoder``: ``vocab_size``, ``eod`` (-1 = none) and
``encode_documents(texts) -> (tokens, tokens_per_document, empty)``, the ids of a batch of documents
back to back in the output dtype, EOD appended when asked.

Sentencepiece, exact and faster than calling its encoder on every document: a word cache.
sentencepiece BPE never builds a piece across a point where no vocabulary piece can
span it. With the identity normaliser (what data_tools/train_tokenizer.py trains) a space becomes "▁",
and when no piece has a "▁" right after another character, a piece never crosses the start of a run
of spaces: the document splits there into chunks ("▁▁▁▁return", "▁x,\\n") that tokenise independently.
So each distinct chunk is encoded once (by sentencepiece itself) and its ids reused; the output is the
same as ``sp.encode(document)`` token for token (tests/test_word_cache.py checks it on random
strings of spaces, "▁", newlines, digits and non-ASCII, and bench/preprocess.py checks the bytes
against Megatron's own script). Text has a Zipf vocabulary, so most chunks are hits: about half the
CPU time of the encoder alone on real text. Models where the property does not hold (another
normaliser, removed extra spaces, pieces with inner "▁", unigram models) are encoded document by document, and the
reason is logged.

Hugging Face: ``tokenizers.Tokenizer.from_file`` and its batch encoder (Rust; it has its own word
cache). The EOD id is the tokenizer's end-of-text token: --eod-token NAME, else ``eos_token`` of a
``tokenizer_config.json`` beside the file, else the first special token among KNOWN_EOD_TOKENS; it
must exist in the vocabulary. Special tokens (a BOS a post-processor adds) are not added unless asked,
as megatron-core's HuggingFaceTokenizer does by default.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import sys
from collections.abc import Sequence

import numpy as np

from data_tools._common import DataToolError
from data_tools.indexed import optimal_dtype
from loopmoe.tokenizer_json import (  # noqa: F401  (shared with training: one definition of each)
    KNOWN_EOD_TOKENS,
    hf_eod_token,
    hf_vocab_size,
    is_tokenizer_json,
    load_hf_tokenizer,
    special_tokens,
    tokenizer_file,
)

MAX_CACHE = 2 << 20  # cached chunks per process (~300 MB); cleared when full
MAX_CACHED_CHUNK = 64  # characters; longer chunks (base64, minified code) are encoded but not kept

# A chunk: a run of spaces (or literal "▁", which sentencepiece treats alike), then non-space
# characters; spaces at the very end of the text stay with the last chunk. The text gets one space
# in front first (see SentencePieceEncoder.encode_documents), so every chunk starts with one.
_CHUNK = re.compile(r"[ \u2581]*[^ \u2581]+(?:[ \u2581]+\Z)?|[ \u2581]+\Z")


def join_documents(ids: Sequence[Sequence[int]], eod: int, dtype: type[np.integer]
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """Documents' ids back to back (each followed by ``eod`` when >= 0); tokens per document; empties."""
    counts = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
    empty = int((counts == 0).sum())
    parts: list = []
    if eod >= 0:
        eod_arr = np.array([eod], dtype=np.int32)
        for d in ids:
            parts.append(d)
            parts.append(eod_arr)
        counts += 1
    else:
        parts = [d for d in ids if len(d)]
    if not parts:
        return np.empty(0, dtype=dtype), counts, empty
    # Token ids are < vocab size, which optimal_dtype chose to fit: the cast cannot wrap.
    tokens = np.concatenate([np.asarray(p, dtype=np.int32) for p in parts]).astype(dtype, copy=False)
    return tokens, counts, empty


class Encoder:
    path: str
    vocab_size: int
    eod: int  # -1: append no EOD
    dtype: type[np.integer]
    kind: str  # "sentencepiece" or "huggingface"
    note: str = ""  # how it encodes, for the log

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        raise NotImplementedError


def open_tokenizer(path: str, append_eod: bool, eod_token: str | None = None,
                   add_special_tokens: bool = False) -> Encoder:
    """Load and check the tokenizer at ``path``; every problem is a DataToolError saying the fix."""
    path = tokenizer_file(path)
    if not os.path.isfile(path):
        raise DataToolError(f"--tokenizer-model {path!r}: no such file; give a sentencepiece .model (train one "
                            f"with python data_tools/train_tokenizer.py) or a Hugging Face tokenizer.json")
    if is_tokenizer_json(path):
        return HuggingFaceEncoder(path, append_eod, eod_token, add_special_tokens)
    if eod_token is not None:
        raise DataToolError("--eod-token is for Hugging Face tokenizer.json files; a sentencepiece model's EOD "
                            "is its eos piece (data_tools/train_tokenizer.py --eos-id)")
    return SentencePieceEncoder(path, append_eod)


# ---------------------------------------------------------------------------------------------------
# sentencepiece


def chunking_blocker(sp) -> str | None:
    """Why the chunk cache would not be exact for this model (None: it is exact)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf missing: the model's settings cannot be read
        return f"cannot read the model's settings ({e}; pip install protobuf)"
    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    n, t = m.normalizer_spec, m.trainer_spec
    if t.model_type != pb.TrainerSpec.BPE:
        # Unigram: its Viterbi path over unknown characters (byte fallback) was seen to differ once cut.
        return f"model type {pb.TrainerSpec.ModelType.Name(t.model_type)} (only BPE is cached)"
    if n.name != "identity" or n.precompiled_charsmap:
        return f"normaliser {n.name!r} (it may change spaces; only 'identity' is chunked)"
    if not (n.add_dummy_prefix and n.escape_whitespaces) or n.remove_extra_whitespaces:
        return "add_dummy_prefix/escape_whitespaces off or remove_extra_whitespaces on"
    if t.treat_whitespace_as_suffix:
        return "treat_whitespace_as_suffix"
    inner = re.compile("[^\u2581]\u2581")
    for p in m.pieces:
        if p.type != pb.ModelProto.SentencePiece.BYTE and inner.search(p.piece):
            return f"the piece {p.piece!r} has a '\u2581' after another character"
    return None


class SentencePieceEncoder(Encoder):
    kind = "sentencepiece"

    def __init__(self, path: str, append_eod: bool) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise DataToolError(f"--tokenizer-model {path!r} is neither a sentencepiece model nor a Hugging "
                                f"Face tokenizer.json ({e})") from None
        if append_eod and self.sp.eos_id() < 0:
            raise DataToolError(
                f"--append-eod: the tokenizer {path} has no end-of-document (EOS) piece (eos_id() == -1). "
                f"Retrain it with an EOS id (data_tools/train_tokenizer.py --eos-id 2), or drop --append-eod")
        self.path, self.vocab_size = path, self.sp.vocab_size()
        self.eod = self.sp.eos_id() if append_eod else -1
        self.dtype = optimal_dtype(self.vocab_size)
        self._le = np.dtype(self.dtype).newbyteorder("<")
        self._eod_bytes = np.array([self.eod], self._le).tobytes() if self.eod >= 0 else b""
        blocker = chunking_blocker(self.sp)
        self.chunked = blocker is None
        self.note = ("word cache (exact: no piece crosses a run of spaces)" if self.chunked else
                     f"document by document, no word cache: {blocker}")
        self._cache: dict[str, bytes] = {}
        try:  # sentencepiece >= 0.2.1 returns numpy arrays straight from C++ (no Python int lists)
            self.sp.encode(["a"], return_type="numpy", num_threads=1)
            self._numpy = True
        except (TypeError, ValueError):
            self._numpy = False

    def _encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        if self._numpy:
            return self.sp.encode(texts, return_type="numpy", num_threads=1)
        return [np.asarray(d, dtype=np.int32) for d in self.sp.encode(texts, out_type=int, num_threads=1)]

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        if not self.chunked:
            return join_documents(self._encode_arrays(texts), self.eod, self.dtype)
        findall, cache = _CHUNK.findall, self._cache
        # " " in front: every chunk then starts with a space, and encoding chunk[1:] with the model's
        # dummy prefix gives back that space as "▁" (for the first chunk it is the dummy prefix itself).
        chunked = [findall(" " + t) for t in texts]
        distinct = set().union(*chunked)
        miss = distinct.difference(cache)
        if len(cache) + len(miss) > MAX_CACHE:  # full: start again (the hits of this batch included)
            cache.clear()
            miss = distinct
        long: list[str] = []
        if miss:
            keys = list(miss)
            # Python int lists, flattened in C: faster here than sentencepiece's numpy output, which
            # wraps every (short) chunk in its own array.
            ids = self.sp.encode([k[1:] for k in keys], out_type=int, num_threads=1)
            total = sum(map(len, ids))
            flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=self._le, count=total).tobytes()
            size, pos = self._le.itemsize, 0
            for k, d in zip(keys, ids):
                end = pos + size * len(d)
                cache[k] = flat[pos:end]
                pos = end
                if len(k) > MAX_CACHED_CHUNK:
                    long.append(k)
        get, eod = cache.__getitem__, self._eod_bytes
        docs = [b"".join(map(get, c)) + eod for c in chunked]
        for k in long:
            del cache[k]
        counts = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs)) // self._le.itemsize
        tokens = np.frombuffer(b"".join(docs), dtype=self._le).astype(self.dtype, copy=False)
        empty = int((counts == (1 if eod else 0)).sum())
        return tokens, counts, empty


# ---------------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json


class HuggingFaceEncoder(Encoder):
    kind = "huggingface"

    def __init__(self, path: str, append_eod: bool, eod_token: str | None, add_special_tokens: bool) -> None:
        self.tok = load_hf_tokenizer(path)
        self.path, self.vocab_size = path, hf_vocab_size(self.tok)
        self.dtype = optimal_dtype(self.vocab_size)
        found = hf_eod_token(path, self.tok, eod_token)
        if append_eod and found is None:
            raise DataToolError(
                f"--append-eod: cannot tell the end-of-document token of {path} (no tokenizer_config.json "
                f"eos_token beside it, none of {', '.join(KNOWN_EOD_TOKENS)}); name it with --eod-token")
        self.eod_name = found[0] if found else None
        self.eod = found[1] if (found and append_eod) else -1
        self.add_special_tokens = add_special_tokens
        self.note = (f"tokenizers {type(self.tok.model).__name__}, EOD {self.eod_name!r}"
                     + (", special tokens added" if add_special_tokens else ""))

    def encode_documents(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=self.add_special_tokens) \
            if hasattr(self.tok, "encode_batch_fast") else \
            self.tok.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return join_documents([e.ids for e in encs], self.eod, self.dtype)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
