"""Which tokenizer wrote a ``.bin/.idx`` pair: a small sidecar ``PREFIX.tokenizer.json`` beside it.

    {"sha256": "<of the tokenizer file's bytes>", "vocab_size": 4096, "eod_id": 2, "kind": "sentencepiece",
     "path": "/abs/path/tokenizer.model"}

data_tools/preprocess.py writes it, data_tools/merge.py carries it (and refuses inputs of different
tokenizers), pretrain_loopmoe.py compares it with ``data.tokenizer_model`` before training: two tokenizers
of the same vocabulary size give ids in range either way, so only the file's digest tells them apart. The
path is informative only (the same file copied elsewhere is the same tokenizer). megatron-core's reader
opens PREFIX.bin and PREFIX.idx only, so the pair stays readable unchanged. Old data without a sidecar is
accepted with a warning. Standard library only: data_tools (no torch) and the trainer share it.
"""
from __future__ import annotations

import hashlib
import json
import os

from loopmoe.tokenizer_json import tokenizer_file

SIDECAR_SUFFIX = ".tokenizer.json"


class TokenizerMismatch(ValueError):
    """Data and tokenizer (or two data inputs) come from different tokenizers; the message names both."""


def sidecar_path(prefix: str) -> str:
    return prefix + SIDECAR_SUFFIX


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: str, vocab_size: int, eod_id: int, kind: str) -> dict:
    """The sidecar's content for the tokenizer file at ``path`` (a folder: its tokenizer.json)."""
    path = tokenizer_file(path)
    return {"sha256": file_sha256(path), "vocab_size": int(vocab_size), "eod_id": int(eod_id), "kind": kind,
            "path": os.path.abspath(path)}


def write_sidecar(prefix: str, fp: dict) -> None:
    """Temporary name, then rename: a reader sees the old sidecar or the new one, never half of one."""
    final = sidecar_path(prefix)
    tmp = f"{final}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fp, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, final)


def remove_sidecar(prefix: str) -> None:
    """Before a pair is replaced: a crash between the new pair and its sidecar must not leave the old
    sidecar describing the new data (no sidecar is a warning; a wrong one would be a false refusal)."""
    try:
        os.unlink(sidecar_path(prefix))
    except FileNotFoundError:
        pass


def read_sidecar(prefix: str) -> dict | None:
    """The recorded fingerprint, or None for data written before sidecars existed."""
    path = sidecar_path(prefix)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            fp = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerMismatch(f"{path}: unreadable tokenizer record ({e}); re-create the data with "
                                f"data_tools/preprocess.py or delete the file to skip the check") from None
    if not isinstance(fp, dict) or not isinstance(fp.get("sha256"), str):
        raise TokenizerMismatch(f"{path}: no sha256 in the tokenizer record; re-create the data with "
                                f"data_tools/preprocess.py or delete the file to skip the check")
    return fp


def describe(fp: dict) -> str:
    """One short phrase naming a tokenizer: its file, digest prefix, vocabulary and EOD."""
    return (f"{fp.get('path', '?')} (sha256 {fp['sha256'][:12]}, {fp.get('vocab_size', '?')} ids, "
            f"EOD {fp.get('eod_id', '?')})")


def check_prefix(prefix: str, tokenizer_path: str, where: str = "data.prefixes") -> bool:
    """Refuse (TokenizerMismatch) when ``prefix`` was written by another tokenizer than the file at
    ``tokenizer_path``. Returns False when the data has no record (old data: the caller warns)."""
    recorded = read_sidecar(prefix)
    if recorded is None:
        return False
    path = tokenizer_file(tokenizer_path)
    digest = file_sha256(path)
    if digest != recorded["sha256"]:
        raise TokenizerMismatch(
            f"{where}: {prefix} was made with the tokenizer {describe(recorded)} but data.tokenizer_model is "
            f"{os.path.abspath(path)} (sha256 {digest[:12]}): a different tokenizer; give the one that made "
            f"the data, or re-create the data with data_tools/preprocess.py --tokenizer-model {path}")
    return True


def common_fingerprint(prefixes: list[str]) -> tuple[dict | None, list[str]]:
    """The one fingerprint that the ``prefixes`` (inputs of a merge) share, and those without a record.
    TokenizerMismatch when two recorded ones differ."""
    first: tuple[str, dict] | None = None
    missing: list[str] = []
    for p in prefixes:
        fp = read_sidecar(p)
        if fp is None:
            missing.append(p)
        elif first is None:
            first = (p, fp)
        elif fp["sha256"] != first[1]["sha256"]:
            raise TokenizerMismatch(f"{p} was made with the tokenizer {describe(fp)} but {first[0]} with "
                                    f"{describe(first[1])}; merge only outputs of one tokenizer")
    return (first[1] if first else None), missing
