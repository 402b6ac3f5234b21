"""Train a sentencepiece tokenizer (BPE by default) for preprocess.py and the model.

    python data_tools/train_tokenizer.py                      # demo corpus -> data/tokenizer/spm.model
    python data_tools/train_tokenizer.py --input 'corpus/*.jsonl.gz' --vocab-size 32000 --output-prefix tok/my

Choices and why:
* Documents are split into lines before training: sentencepiece trains on "sentences" and silently
  drops any longer than ``max_sentence_length`` bytes, which would throw away most long documents.
  Lines still longer than that are cut at spaces.
* Lossless by default (the recipe Llama's tokenizer uses): no Unicode normalisation, runs of spaces
  kept (indentation in code matters), digits split, unknown characters fall back to their UTF-8 bytes,
  so decode(encode(text)) == text. Newlines never occur in the training lines, so each "\\n" becomes
  the byte piece <0x0A> (one token).
* Explicit special ids (unk=0, bos=1, eos=2, pad=3 by default): the EOS id is what
  ``preprocess.py --append-eod`` writes after every document, and it is printed at the end.
* Written atomically: trained into a temporary directory beside the output, then renamed (.vocab
  first, .model last), so a crash never leaves a truncated .model; an existing model is only replaced
  with --overwrite.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm

from data_tools._common import (
    DEFAULT_CORPUS,
    DEFAULT_TOKENIZER_PREFIX,
    DataToolError,
    HelpFormatter,
    cpu_count,
    expand_inputs,
    input_format,
    non_negative_int,
    positive_int,
    run_cli,
)
from data_tools.inputs import iter_texts

MODEL_TYPES = ("bpe", "unigram", "char", "word")
NORMALIZATIONS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_tokenizer.py",
        description=__doc__, formatter_class=HelpFormatter)
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--input", action="append", metavar="PATH_OR_GLOB",
                     help="training text; repeat the flag for several inputs; globs allowed (quote them). "
                          "*.jsonl / *.json / *.ndjson are JSON lines (optionally .gz), anything else plain "
                          f"text, read line by line (default: {DEFAULT_CORPUS})")
    io_.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                     help="how to read the inputs; auto decides by file name")
    io_.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                     help="fields of each JSON line whose text is used (all of them are pooled)")
    io_.add_argument("--skip-bad-lines", action="store_true",
                     help="skip malformed JSON lines / missing fields (counted) instead of stopping")
    io_.add_argument("--output-prefix", default=DEFAULT_TOKENIZER_PREFIX,
                     help="writes PREFIX.model and PREFIX.vocab")
    io_.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model/.vocab")
    m = p.add_argument_group("model")
    m.add_argument("--model-type", choices=MODEL_TYPES, default="bpe", help="sentencepiece model type")
    m.add_argument("--vocab-size", type=positive_int, default=4096,
                   help="pieces in the vocabulary, special and byte pieces included (preprocess stores ids "
                        "as uint16 below 65,500, else int32)")
    m.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="encode characters outside the vocabulary as their UTF-8 bytes (256 pieces) instead "
                        "of <unk>")
    m.add_argument("--character-coverage", type=float, default=0.9995,
                   help="fraction of characters covered by the vocabulary; the rarest rest become bytes/unk")
    m.add_argument("--normalization", choices=NORMALIZATIONS, default="identity",
                   help="Unicode normalisation rule; identity keeps the text exactly (lossless)")
    m.add_argument("--split-digits", action=argparse.BooleanOptionalAction, default=True,
                   help="one piece per digit (numbers tokenise consistently)")
    for name, default in (("unk", 0), ("bos", 1), ("eos", 2), ("pad", 3)):
        m.add_argument(f"--{name}-id", type=int, default=default,
                       help=f"id of the {name.upper()} piece" + ("" if name == "unk" else "; -1 = none"))
    s = p.add_argument_group("sampling and speed")
    s.add_argument("--max-sentences", type=non_negative_int, default=300_000,
                   help="train on a uniform random sample of at most this many lines (0 = all); the demo "
                        "corpus has about 205,000")
    s.add_argument("--max-sentence-length", type=positive_int, default=4192,
                   help="longest training line in bytes (sentencepiece's limit); longer lines are cut at spaces")
    s.add_argument("--seed", type=int, default=1234, help="seed of the line sample")
    s.add_argument("--workers", type=positive_int, default=cpu_count(),
                   help="sentencepiece trainer threads (default: the CPUs this process may use)")
    s.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    return p


# ---------------------------------------------------------------------------------------------------
# Training lines


def line_chunks(line: str, limit: int) -> Iterator[str]:
    """``line`` cut into pieces of at most ``limit`` UTF-8 bytes: at spaces, or inside an overlong word."""
    if len(line) * 4 <= limit or len(line.encode("utf-8")) <= limit:
        yield line
        return
    piece: list[str] = []
    size = 0
    for word in re.split(r"(?<= )", line):  # each word keeps the space after it
        n = len(word.encode("utf-8"))
        if piece and size + n > limit:
            yield "".join(piece)
            piece, size = [], 0
        while n > limit:  # one word longer than the limit: cut at a character boundary
            head = word.encode("utf-8")[:limit].decode("utf-8", "ignore")
            yield head
            word = word[len(head):]
            n = len(word.encode("utf-8"))
        if word:
            piece.append(word)
            size += n
    if piece:
        yield "".join(piece)


def training_lines(texts: Iterable[str], limit: int) -> Iterator[str]:
    """Non-blank lines of every text, each at most ``limit`` bytes. Indentation is kept."""
    for text in texts:
        for line in text.split("\n"):
            line = line.rstrip("\r")
            if line.strip():
                yield from line_chunks(line, limit)


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of ``k`` items in one pass with O(k) memory (Algorithm R); and how many there were.

    ``k == 0`` keeps everything. The sample keeps the input order of the kept items' slots, so equal
    inputs and seed give an identical tokenizer.
    """
    rng = random.Random(seed)
    sample: list[str] = []
    n = 0
    for n, item in enumerate(items, 1):
        if k == 0 or n <= k:
            sample.append(item)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = item
    return sample, n


# ---------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainStats:
    documents: int
    lines_total: int
    lines_used: int
    bytes_used: int
    bad_skipped: int
    seconds: float


def _check_special_ids(args: argparse.Namespace) -> None:
    ids = {name: getattr(args, f"{name}_id") for name in ("unk", "bos", "eos", "pad")}
    if ids["unk"] < 0:
        raise DataToolError("--unk-id must be >= 0: sentencepiece always needs an <unk> piece")
    used = {n: i for n, i in ids.items() if i >= 0}
    for name, i in used.items():
        if i >= args.vocab_size:
            raise DataToolError(f"--{name}-id {i} is outside the vocabulary (--vocab-size {args.vocab_size})")
    if len(set(used.values())) != len(used):
        raise DataToolError(f"special ids must differ: {', '.join(f'{n}={i}' for n, i in used.items())}")
    reserved = len(used) + (256 if args.byte_fallback else 0)
    if args.vocab_size <= reserved:
        raise DataToolError(
            f"--vocab-size {args.vocab_size} leaves no room for learned pieces: {reserved} ids are taken by "
            f"special pieces{' and the 256 byte pieces (--byte-fallback)' if args.byte_fallback else ''}")


def _existing_outputs(prefix: str) -> list[str]:
    return [p for p in (prefix + ".model", prefix + ".vocab") if os.path.exists(p)]


def train(args: argparse.Namespace) -> TrainStats:
    """Read, sample, train into a temporary directory, then rename into place."""
    t0 = time.perf_counter()
    _check_special_ids(args)
    files = expand_inputs(args.input or [DEFAULT_CORPUS])
    prefix = args.output_prefix
    if os.path.isdir(prefix) or prefix.endswith(os.sep):
        raise DataToolError(f"--output-prefix {prefix!r} is a directory; give a prefix such as "
                            f"'{os.path.join(prefix, 'spm')}' (writes spm.model and spm.vocab)")
    existing = _existing_outputs(prefix)
    if existing and not args.overwrite:
        raise DataToolError(f"{existing[0]} already exists; pass --overwrite to replace it or choose "
                            f"another --output-prefix")

    bad: list[str] = []
    counts = {"documents": 0}

    def texts() -> Iterator[str]:
        for path in files:
            for text in iter_texts(path, input_format(path, args.input_format), args.json_keys,
                                   args.skip_bad_lines, on_bad=bad.append):
                counts["documents"] += 1
                yield text

    lines, total = reservoir_sample(training_lines(texts(), args.max_sentence_length),
                                    args.max_sentences, args.seed)
    if not lines:
        raise DataToolError(f"no text found in {', '.join(files)} (keys {args.json_keys}); check --json-keys")
    for msg in bad[:5]:
        print(f"warning: skipped {msg}", file=sys.stderr)

    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.basename(prefix)
    # Same directory as the output, so the final os.replace is a rename within one file system.
    tmp_dir = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir)
    try:
        tmp_prefix = os.path.join(tmp_dir, name)
        options = dict(
            model_prefix=tmp_prefix, model_type=args.model_type, vocab_size=args.vocab_size,
            byte_fallback=args.byte_fallback, character_coverage=args.character_coverage,
            normalization_rule_name=args.normalization,
            remove_extra_whitespaces=False,  # keep runs of spaces (code indentation) -> lossless
            allow_whitespace_only_pieces=True,  # so "    " can be one piece
            split_digits=args.split_digits,
            unk_id=args.unk_id, bos_id=args.bos_id, eos_id=args.eos_id, pad_id=args.pad_id,
            max_sentence_length=args.max_sentence_length,
            input_sentence_size=0,  # we sampled already
            num_threads=args.workers,
            minloglevel=0 if args.verbose else 2,
        )
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), **options)
        except RuntimeError as e:
            hint = " (lower --vocab-size or give more text)" if "vocab" in str(e).lower() else ""
            raise DataToolError(f"sentencepiece training failed: {e}{hint}") from None
        # .vocab is informational; .model is what everything loads, so it is renamed last.
        os.replace(tmp_prefix + ".vocab", prefix + ".vocab")
        os.replace(tmp_prefix + ".model", prefix + ".model")
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return TrainStats(documents=counts["documents"], lines_total=total, lines_used=len(lines),
                      bytes_used=sum(len(s.encode("utf-8")) for s in lines), bad_skipped=len(bad),
                      seconds=time.perf_counter() - t0)


def describe(model_path: str) -> str:
    """The facts preprocessing and training depend on, read back from the written model."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    eos = sp.eos_id()
    eod = (f"end-of-document (EOS) id: {eos} ({sp.id_to_piece(eos)}) - what preprocess.py --append-eod "
           f"appends" if eos >= 0 else
           "end-of-document (EOS) id: none - preprocess.py --append-eod will refuse this tokenizer")
    return "\n".join([
        f"tokenizer: {model_path}",
        f"vocabulary size: {sp.vocab_size()}",
        eod,
        f"special ids: unk={sp.unk_id()} bos={sp.bos_id()} eos={eos} pad={sp.pad_id()}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stats = train(args)
    print(describe(args.output_prefix + ".model"))
    print(f"trained ({args.model_type}, byte fallback {'on' if args.byte_fallback else 'off'}) on "
          f"{stats.lines_used:,} of {stats.lines_total:,} lines ({stats.bytes_used / 1e6:.1f} MB) from "
          f"{stats.documents:,} documents in {stats.seconds:.1f} s"
          + (f"; {stats.bad_skipped:,} bad lines skipped" if stats.bad_skipped else ""))
    return 0


if __name__ == "__main__":
    run_cli(main)
