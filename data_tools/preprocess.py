"""Tokenise documents into megatron-core's indexed dataset: PREFIX_KEY_document.bin / .idx.

    python data_tools/preprocess.py --append-eod            # demo corpus, data/tokenizer/spm.model
    python data_tools/preprocess.py --input 'shards/*.jsonl.gz' --tokenizer-model tok/spm.model \\
        --output-prefix data/tokens/web --append-eod --workers 16

Megatron's tools/preprocess_data.py flags, for sentencepiece tokenizers (not supported: other
tokenizer types, --split-sentences/--keep-newlines, --partitions). What a document is:
* JSON lines (*.jsonl / *.json / *.ndjson, optionally gzipped): one document per line; each
  --json-keys field gives its own output PREFIX_KEY_document. Blank lines are ignored.
* Plain text (any other name): one document per file (--text-unit file, the default: a text file is
  usually one work, and cutting it would put end-of-document tokens inside it), or one per
  blank-line-separated paragraph (--text-unit paragraph).
Inputs are read in the order given (each glob's matches sorted by name); documents keep that order.

Output: the exact bytes megatron-core's IndexedDatasetBuilder writes (add_document per document, then
finalize; the tests prove it byte for byte), token ids as uint16 when the vocabulary has fewer than
65,500 pieces, else int32. Each document is one sequence; a document that tokenises to nothing adds a
document_indices entry and no sequence, as Megatron's writer does - except with --append-eod, where it
is the one token EOS (Megatron appends EOS only to non-empty documents; an empty document here still
marks a document boundary).

Speed: worker processes each load the tokenizer once, parse JSON and tokenise whole batches
(sentencepiece's batched encode into numpy arrays); the main process only reads lines and appends
the returned arrays to the .bin in input order. The .idx is computed with numpy at the end. This
module imports neither torch nor megatron-core (megatron-core pulls in torch and Transformer Engine).

Safety: outputs are written as NAME.tmp-PID and renamed only when every output is complete (.bin
first, .idx last, the old .idx removed first with --overwrite), so a pair whose .idx exists is whole.
Ctrl-C and SIGTERM remove the temporary files; after SIGKILL, leftover *.tmp-PID files are safe to
delete. Bad input stops the run (exit code 2) with the file, line, field and fix, writing nothing.
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import multiprocessing.pool
import os
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import sentencepiece as spm

from data_tools._common import (
    DEFAULT_CORPUS,
    DEFAULT_TOKENIZER_PREFIX,
    BadLine,
    DataToolError,
    HelpFormatter,
    InputFile,
    InputFormat,
    SignalsDeferred,
    bad_line_message,
    cpu_count,
    expand_inputs,
    input_format,
    json_fields,
    non_negative_int,
    positive_int,
    read_error,
    run_cli,
    split_paragraphs,
    temp_name,
)

# megatron-core's indexed dataset format (megatron/core/datasets/indexed_dataset.py, _IndexWriter).
INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
MAX_TASK_BYTES = 8 << 20  # a task never holds more than ~8 MB of text, whatever --batch-size says
MAX_BAD_LINE_NOTES = 5  # skipped lines reported one by one; the rest only counted
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def optimal_dtype(vocab_size: int) -> type[np.integer]:
    """megatron-core's DType.optimal_dtype: uint16 below 65,500 ids, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess.py", description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", action="append", metavar="PATH_OR_GLOB",
                   help="documents to tokenise; repeat the flag for several inputs; globs allowed (quote "
                        f"them); jsonl, jsonl.gz or plain text (default: {DEFAULT_CORPUS})")
    g.add_argument("--input-format", choices=("auto", "jsonl", "text"), default="auto",
                   help="how to read the inputs; auto decides by file name (*.jsonl/.json/.ndjson[.gz] = "
                        "JSON lines, anything else plain text)")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="fields of each JSON line to tokenise; one output per field. Plain text inputs "
                        "take a single key (it names the output)")
    g.add_argument("--text-unit", choices=("file", "paragraph"), default="file",
                   help="what one document is in a plain text input: the whole file, or each paragraph "
                        "(separated by blank lines)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSON lines, lines missing a field or with a non-string "
                        "field, and plain text files that are not UTF-8, instead of stopping with an error")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", default=DEFAULT_TOKENIZER_PREFIX + ".model",
                   help="sentencepiece .model (train one with data_tools/train_tokenizer.py)")
    g.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's end-of-document (EOS) id after every document; refused "
                        "when the tokenizer has no EOS piece")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", default="data/tokens/python_docs",
                   help="writes PREFIX_KEY_document.bin and .idx for every --json-keys KEY")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (only once all is done)")
    g = p.add_argument_group("speed and progress")
    g.add_argument("--workers", type=positive_int, default=cpu_count(),
                   help="tokenising processes; 1 tokenises in the main process (default: the CPUs this "
                        "process may use)")
    g.add_argument("--batch-size", type=positive_int, default=64,
                   help=f"documents per worker task (a task also stops at {MAX_TASK_BYTES >> 20} MB of text)")
    g.add_argument("--log-interval", type=non_negative_int, default=1000,
                   help="when stderr is not a terminal, print a progress line every this many documents "
                        "(0 = none); on a terminal a progress bar is shown instead")
    return p


# ---------------------------------------------------------------------------------------------------
# Reading: the main process cuts the inputs into tasks of raw lines, in order


@dataclass
class Task:
    path: str
    fmt: InputFormat
    first_line: int  # JSON lines: line number of items[0]; text: index of items[0] among its file's units
    items: list[bytes]  # raw JSON lines (blank ones included, to keep line numbers) or text documents


def iter_tasks(files: Sequence[str], args: argparse.Namespace,
               progress: Progress | None = None) -> Iterator[Task]:
    for path in files:
        fmt = input_format(path, args.input_format)
        with InputFile(path) as f:
            try:
                if fmt == "text":
                    data = f.stream.read()
                    if progress:
                        progress.read_bytes(f.position())
                    if args.text_unit == "file":
                        yield Task(path, fmt, 0, [data])
                        continue
                    text = _decode_text(data, path, args)
                    if text is None:  # not UTF-8 and --skip-bad-lines: the worker counts and skips it
                        yield Task(path, fmt, 0, [data])
                        continue
                    units = [p.encode("utf-8") for p in split_paragraphs(text)]
                    for start in range(0, len(units), args.batch_size):
                        yield Task(path, fmt, start, units[start:start + args.batch_size])
                    continue
                items: list[bytes] = []
                first, size, before = 1, 0, 0
                for lineno, line in enumerate(f.stream, 1):
                    items.append(line)
                    size += len(line)
                    if len(items) >= args.batch_size or size >= MAX_TASK_BYTES:
                        if progress:
                            pos = f.position()
                            progress.read_bytes(pos - before)
                            before = pos
                        yield Task(path, fmt, first, items)
                        items, first, size = [], lineno + 1, 0
                if items:
                    yield Task(path, fmt, first, items)
                if progress:
                    progress.read_bytes(f.position() - before)
            except (OSError, EOFError) as e:  # unreadable file, truncated or corrupt .gz
                raise read_error(path, e) from None


def _decode_text(data: bytes, path: str, args: argparse.Namespace) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if args.skip_bad_lines:
            return None
        raise DataToolError(f"{path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8 "
                            f"(or pass --skip-bad-lines to skip it)") from None


# ---------------------------------------------------------------------------------------------------
# Tokenising: in worker processes (or the main one with --workers 1)


@dataclass
class Result:
    tokens: list[np.ndarray]  # per key: every document's ids back to back, in the output dtype
    doc_tokens: list[np.ndarray]  # per key: tokens per document (int64), EOD included
    empty: list[int]  # per key: documents that tokenised to nothing (before the EOD)
    documents: int = 0
    bad: int = 0
    bad_notes: list[str] = field(default_factory=list)
    text_bytes: int = 0  # UTF-8 bytes of the tokenised text
    error: str | None = None  # a bad line when not skipping: the run stops with this message


_worker: dict = {}  # this process's tokenizer and settings, set once by init_worker


def init_worker(model_path: str, keys: Sequence[str], append_eod: bool, skip_bad: bool,
                parent_pid: int | None) -> None:
    """Load the tokenizer once per process (the Pool initializer; ``parent_pid`` None: main process)."""
    if parent_pid is not None:
        # Ctrl-C goes to the whole process group; the main process alone decides what happens.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(parent_pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by Tokenizers.__enter__
    sp = spm.SentencePieceProcessor(model_file=model_path)
    try:  # sentencepiece >= 0.2.1 returns numpy arrays straight from C++ (no Python int lists)
        sp.encode([""], return_type="numpy", num_threads=1)
        encode_kwargs: dict = {"return_type": "numpy"}
    except (TypeError, ValueError):
        encode_kwargs = {"out_type": int}
    _worker.update(sp=sp, keys=list(keys), eod=sp.eos_id() if append_eod else -1, skip_bad=skip_bad,
                   dtype=optimal_dtype(sp.vocab_size()), encode_kwargs=encode_kwargs)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: a worker gets SIGKILL when the main process dies, even by SIGKILL (no orphans left)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def encode_task(task: Task) -> Result:
    w = _worker
    keys: list[str] = w["keys"]
    columns: list[list[str]] = [[] for _ in keys]
    res = Result(tokens=[], doc_tokens=[], empty=[])
    for i, raw in enumerate(task.items):
        where = task.first_line + i
        if task.fmt == "text":
            try:
                values = [raw.decode("utf-8")]
            except UnicodeDecodeError as e:
                msg = f"{task.path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8"
                if not w["skip_bad"]:
                    res.error = msg + " (or pass --skip-bad-lines to skip it)"
                    return res
                res.bad += 1
                if len(res.bad_notes) < MAX_BAD_LINE_NOTES:
                    res.bad_notes.append(msg)
                continue
        else:
            if not raw.strip():
                continue
            try:
                values = json_fields(raw, keys)
            except BadLine as e:
                if not w["skip_bad"]:
                    res.error = bad_line_message(task.path, where, e)
                    return res
                res.bad += 1
                if len(res.bad_notes) < MAX_BAD_LINE_NOTES:
                    res.bad_notes.append(f"{task.path}:{where}: {e}")
                continue
        for column, value in zip(columns, values):
            column.append(value)
        res.text_bytes += sum(len(v.encode("utf-8")) for v in values)
    res.documents = len(columns[0])
    for column in columns:
        ids = w["sp"].encode(column, num_threads=1, **w["encode_kwargs"]) if column else []
        tokens, counts, empty = join_documents(ids, w["eod"], w["dtype"])
        res.tokens.append(tokens)
        res.doc_tokens.append(counts)
        res.empty.append(empty)
    return res


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


class Tokenizers:
    """The tokenising processes (or, with one worker, the main process), as a context manager so the
    pool is always stopped on the way out, also on errors and Ctrl-C, not when garbage is collected."""

    def __init__(self, init_args: tuple, workers: int) -> None:
        self.init_args, self.workers = init_args, workers
        self.pool: mp.pool.Pool | None = None
        self.worker_pids: set[int] = set()

    def __enter__(self) -> Tokenizers:
        if self.workers == 1:
            init_worker(*self.init_args, None)
            return self
        # fork: workers start in milliseconds and need nothing re-imported; no threads exist yet here.
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        others = {p.pid for p in mp.active_children()}  # children not ours (when called as a library)
        # Workers must never run our SIGTERM handler: Pool.terminate() sends SIGTERM and then joins, and
        # a worker stopped before its initializer ran used to raise an exception at a random point
        # instead of dying, which could hang the join. So fork with SIGINT/SIGTERM blocked; each worker
        # sets their actions and then unblocks them in init_worker (a pending SIGTERM kills it there),
        # and the main process unblocks them once the pool exists.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.pool = ctx.Pool(self.workers, initializer=init_worker, initargs=(*self.init_args, os.getpid()))
            self.worker_pids = {p.pid for p in mp.active_children()} - others
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a signal that came is raised here
        except BaseException:
            try:
                self.__exit__(None, None, None)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()  # workers stop now, mid-task if need be
            self.pool.join()
            self.pool = None

    def results(self, tasks: Iterator[Task]) -> Iterator[Result]:
        """Results in task order. With a pool, at most 4 tasks per worker are in flight, so reading
        never runs further ahead than that (Pool.imap would read the whole input into memory)."""
        if self.pool is None:
            yield from map(encode_task, tasks)
            return
        pending: deque = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(encode_task, (task,)))
            if len(pending) >= 4 * self.workers:
                yield _wait(pending.popleft(), self.worker_pids)
        while pending:
            yield _wait(pending.popleft(), self.worker_pids)


def _wait(async_result: mp.pool.AsyncResult, worker_pids: set[int]) -> Result:
    # Pool never reports a worker killed from outside (e.g. by the OOM killer): its task just never
    # finishes. Poll, and stop if one of the original workers has gone.
    while True:
        async_result.wait(1.0)
        if async_result.ready():
            return async_result.get()
        alive = {p.pid for p in mp.active_children()}
        if not worker_pids <= alive:
            raise DataToolError("a worker process died (killed, or out of memory?); nothing was written. "
                                "Try fewer --workers or a smaller --batch-size")


# ---------------------------------------------------------------------------------------------------
# Writing: .bin appended in order, .idx computed at the end, both renamed into place when complete


def index_bytes(doc_tokens: np.ndarray, dtype: type[np.integer]) -> bytes:
    """The .idx of documents with ``doc_tokens`` tokens each, exactly as megatron-core's builder writes it.

    Each non-empty document is one sequence; an empty one adds only a document_indices entry.
    """
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    seq_lengths = doc_tokens[doc_tokens > 0]
    if seq_lengths.size and seq_lengths.max() > np.iinfo(np.int32).max:
        raise DataToolError("a document has more than 2^31 tokens, more than the .idx format can hold")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(seq_lengths.size, dtype=np.int64)
    np.cumsum(seq_lengths[:-1] * itemsize, out=pointers[1:])
    document_indices = np.zeros(doc_tokens.size + 1, dtype=np.int64)
    np.cumsum(doc_tokens > 0, out=document_indices[1:])
    header = (INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype])
              + struct.pack("<Q", seq_lengths.size) + struct.pack("<Q", document_indices.size))
    return b"".join([header, seq_lengths.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
                     document_indices.astype("<i8").tobytes()])


class IndexedOutput:
    """One PREFIX.bin/.idx pair, written under temporary names; ``publish`` renames it into place."""

    def __init__(self, prefix: str, dtype: type[np.integer]) -> None:
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self.bin_tmp, self.idx_tmp = temp_name(self.bin_path), temp_name(self.idx_path)
        self.dtype = dtype
        self._doc_tokens: list[np.ndarray] = []
        self.tokens = 0
        self.empty = 0
        self._bin = open(self.bin_tmp, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in finish/discard

    def add(self, tokens: np.ndarray, doc_tokens: np.ndarray, empty: int = 0) -> None:
        assert tokens.dtype == self.dtype
        self._bin.write(tokens.astype(np.dtype(self.dtype).newbyteorder("<"), copy=False).data)
        self._doc_tokens.append(doc_tokens)
        self.tokens += int(tokens.size)
        self.empty += empty

    def finish(self) -> None:
        """Complete both temporary files on disk (flushed and fsynced); nothing is visible yet."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        counts = np.concatenate(self._doc_tokens) if self._doc_tokens else np.zeros(0, np.int64)
        with open(self.idx_tmp, "wb") as f:
            f.write(index_bytes(counts, self.dtype))
            f.flush()
            os.fsync(f.fileno())

    def discard(self) -> None:
        self._bin.close()
        for path in (self.bin_tmp, self.idx_tmp):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def publish(outputs: Sequence[IndexedOutput]) -> None:
    """Rename every finished output into place: old .idx removed first, then the .bin, the .idx last.

    A reader opens PREFIX.idx first; it exists again only when its .bin is the matching new one.
    """
    with SignalsDeferred():
        for out in outputs:
            if os.path.exists(out.idx_path):
                os.unlink(out.idx_path)
        for out in outputs:
            os.replace(out.bin_tmp, out.bin_path)
        for out in outputs:
            os.replace(out.idx_tmp, out.idx_path)


# ---------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A tqdm bar over the input bytes (rate in MB/s, docs/s alongside) on a terminal; log lines otherwise."""

    def __init__(self, total_bytes: int, log_interval: int) -> None:
        self.start = time.perf_counter()
        self.documents = self.tokens = self.text_bytes = 0
        self.log_interval = log_interval
        self._next_log = log_interval
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                            dynamic_ncols=True, smoothing=0.1)

    def read_bytes(self, n: int) -> None:
        if self.bar is not None and n > 0:
            self.bar.update(n)

    def done(self, res: Result, tokens: int) -> None:
        self.documents += res.documents
        self.tokens += tokens
        self.text_bytes += res.text_bytes
        seconds = max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.documents:,} docs, {self.documents / seconds:,.0f} docs/s, "
                                     f"{self.tokens / seconds / 1e6:.2f}M tok/s", refresh=False)
        elif self.log_interval and self.documents >= self._next_log:
            print(f"processed {self.documents:,} documents, {self.tokens:,} tokens "
                  f"({self.documents / seconds:,.0f} docs/s, {self.text_bytes / seconds / 1e6:.2f} MB/s, "
                  f"{seconds:.1f} s)", file=sys.stderr, flush=True)
            self._next_log = (self.documents // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------
# The run


@dataclass
class Summary:
    files: int
    documents: int
    tokens: dict[str, int]
    empty: dict[str, int]
    bad_lines: int
    text_bytes: int
    seconds: float
    outputs: list[str]
    dtype: str


def load_tokenizer(path: str, append_eod: bool) -> spm.SentencePieceProcessor:
    if not os.path.isfile(path):
        raise DataToolError(f"--tokenizer-model {path!r}: no such file; train one with "
                            f"python data_tools/train_tokenizer.py")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
        raise DataToolError(f"--tokenizer-model {path!r} is not a sentencepiece model ({e})") from None
    if append_eod and sp.eos_id() < 0:
        raise DataToolError(
            f"--append-eod: the tokenizer {path} has no end-of-document (EOS) piece (eos_id() == -1). "
            f"Retrain it with an EOS id (data_tools/train_tokenizer.py --eos-id 2), or drop --append-eod")
    return sp


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def run(args: argparse.Namespace) -> Summary:
    """Check everything that can be checked, then tokenise, write, and publish the outputs."""
    t0 = time.perf_counter()
    keys: list[str] = args.json_keys
    for key in keys:
        if not key or os.sep in key:
            raise DataToolError(f"--json-keys {key!r}: a key must be non-empty and contain no {os.sep!r}")
    if len(set(keys)) != len(keys):
        raise DataToolError(f"--json-keys {' '.join(keys)}: a key is repeated")
    if os.path.isdir(args.output_prefix) or args.output_prefix.endswith(os.sep):
        raise DataToolError(f"--output-prefix {args.output_prefix!r} is a directory; give a prefix such as "
                            f"'{os.path.join(args.output_prefix, 'corpus')}' (writes corpus_text_document.bin)")
    files = expand_inputs(args.input or [DEFAULT_CORPUS])
    texts = [f for f in files if input_format(f, args.input_format) == "text"]
    if texts and len(keys) > 1:
        raise DataToolError(f"{texts[0]} is plain text, which has one document field, but --json-keys "
                            f"names {len(keys)}; give one key (it names the output) or only JSON lines inputs")
    sp = load_tokenizer(args.tokenizer_model, args.append_eod)
    dtype = optimal_dtype(sp.vocab_size())
    prefixes = [output_prefix(args.output_prefix, k) for k in keys]
    if not args.overwrite:
        for prefix in prefixes:
            for path in (prefix + ".bin", prefix + ".idx"):
                if os.path.exists(path):
                    raise DataToolError(f"{path} already exists; pass --overwrite to replace it or choose "
                                        f"another --output-prefix")
    if not args.append_eod:
        print("note: no --append-eod: documents will follow each other without an end-of-document token",
              file=sys.stderr)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)

    outputs: list[IndexedOutput] = []
    progress = Progress(sum(os.path.getsize(f) for f in files), args.log_interval)
    bad, notes = 0, []
    init_args = (args.tokenizer_model, keys, args.append_eod, args.skip_bad_lines)
    try:
        with Tokenizers(init_args, args.workers) as tokenizers:
            for prefix in prefixes:
                outputs.append(IndexedOutput(prefix, dtype))
            for res in tokenizers.results(iter_tasks(files, args, progress)):
                if res.error:
                    raise DataToolError(res.error)
                for out, tokens, counts, empty in zip(outputs, res.tokens, res.doc_tokens, res.empty):
                    out.add(tokens, counts, empty)
                bad += res.bad
                notes += res.bad_notes[:MAX_BAD_LINE_NOTES - len(notes)]
                progress.done(res, sum(int(t.size) for t in res.tokens))
        for out in outputs:
            out.finish()
        publish(outputs)
    except BaseException:
        for out in outputs:
            out.discard()
        raise
    finally:
        progress.close()
    for note in notes:
        print(f"skipped {note}", file=sys.stderr)
    return Summary(files=len(files), documents=progress.documents,
                   tokens={k: o.tokens for k, o in zip(keys, outputs)},
                   empty={k: o.empty for k, o in zip(keys, outputs)}, bad_lines=bad,
                   text_bytes=progress.text_bytes, seconds=time.perf_counter() - t0,
                   outputs=prefixes, dtype=np.dtype(dtype).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    s = run(args)
    secs = max(s.seconds, 1e-9)
    total_tokens = sum(s.tokens.values())
    print(f"done: {s.documents:,} documents from {s.files} file(s) in {s.seconds:.2f} s "
          f"({s.documents / secs:,.0f} docs/s, {s.text_bytes / secs / 1e6:.2f} MB/s, "
          f"{total_tokens / secs:,.0f} tokens/s); bad lines skipped: {s.bad_lines:,}")
    for key, prefix in zip(args.json_keys, s.outputs):
        print(f"  {prefix}.bin/.idx: {s.tokens[key]:,} tokens ({s.dtype}), empty documents: "
              f"{s.empty[key]:,}{', EOD appended' if args.append_eod else ''}")
    return 0


if __name__ == "__main__":
    run_cli(main)
