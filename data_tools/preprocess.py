"""Tokenise documents into megatron-core's indexed dataset: PREFIX_KEY_document.bin / .idx.

(Why ~520 lines in one file: the command line, the worker pool and the run loop that ties readers to the
writer, most of it the --help text and its flag checks; the readers are in inputs.py, the tokenizers in
encoders.py, the .bin/.idx format in indexed.py.)

    python data_tools/preprocess.py --append-eod            # demo corpus, data/tokenizer/spm.model
    python data_tools/preprocess.py --input 'shards/*.jsonl.zst' --tokenizer-model tok/spm.model \\
        --output-prefix data/tokens/web --append-eod --workers 16
    python data_tools/preprocess.py --input 'hf_dataset/data/train-*.parquet' --text-column text \\
        --tokenizer-model llama3/tokenizer.json --output-prefix data/tokens/web --append-eod

Megatron's tools/preprocess_data.py flags (not supported: --split-sentences/--keep-newlines,
--partitions: use --file-slice and data_tools/merge.py, or slurm/preprocess.sbatch, instead).
Tokenizers (--tokenizer-model, told apart by content; data_tools/encoders.py): a sentencepiece .model
or a Hugging Face tokenizer.json (its EOD: --eod-token, else the eos_token of a tokenizer_config.json
beside it, else <|endoftext|>, <|end_of_text|>, </s>, <eos>). What a document is:
* JSON lines (*.jsonl / *.json / *.ndjson, plain, gzip or zstandard): one document per line; each
  --json-keys field gives its own output PREFIX_KEY_document. Blank lines are ignored.
* Parquet (*.parquet): one document per row of the --text-column (or each --json-keys column),
  streamed one record batch at a time.
* Plain text (any other name): one document per file (--text-unit file, the default: a text file is
  usually one work, and cutting it would put end-of-document tokens inside it), or one per
  blank-line-separated paragraph (--text-unit paragraph).
Inputs are read in the order given (each glob's matches sorted by name); documents keep that order.
--file-slice I/N takes the I-th of N contiguous runs of those files (a Slurm array task's share).

Output: the exact bytes megatron-core's IndexedDatasetBuilder writes (add_document per document, then
finalize; the tests prove it byte for byte), token ids as uint16 when the vocabulary has fewer than
65,500 pieces, else int32. Each document is one sequence; a document that tokenises to nothing adds a
document_indices entry and no sequence, as Megatron's writer does - except with --append-eod, where it
is the one token EOS (Megatron appends EOS only to non-empty documents; an empty document here still
marks a document boundary).

Speed: worker processes each load the tokenizer once, parse JSON and tokenise whole batches; the
main process only reads lines and appends the returned arrays to the .bin in input order; the .idx is
computed with numpy at the end. A sentencepiece BPE model is encoded through an exact word cache
(data_tools/encoders.py: each distinct run-of-spaces-plus-word is encoded once, by sentencepiece),
which costs about half the CPU of the encoder alone on real text. This module imports neither torch
nor megatron-core (megatron-core pulls in torch and Transformer Engine). docs/benchmarks/preprocess.md
compares it with Megatron's own script.

Safety: outputs are written as NAME.tmp-PID and renamed only when every output is complete (.bin
first, .idx last, the old .idx removed first with --overwrite), so a pair whose .idx exists is whole.
Ctrl-C and SIGTERM remove the temporary files; after SIGKILL, leftover *.tmp-PID files are safe to
delete. Bad input stops the run (exit code 2) with the file, line, field and fix, writing nothing.
Beside each pair, PREFIX.tokenizer.json records the tokenizer that wrote it (sha256 of its file, vocabulary,
EOD id; loopmoe/tokenizer_fingerprint.py): the trainer refuses the data with another tokenizer.
"""
from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import multiprocessing.pool
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from data_tools._common import (
    DEFAULT_CORPUS,
    DEFAULT_TOKENIZER_PREFIX,
    BadLine,
    DataToolError,
    HelpFormatter,
    SignalsDeferred,  # noqa: F401  (re-exported)
    Terminated,
    bad_line_message,
    cpu_count,
    expand_inputs,
    input_format,
    json_fields,
    non_negative_int,
    positive_int,
    run_cli,
)
from data_tools.encoders import Encoder, join_documents, open_tokenizer  # noqa: F401  (join_documents re-exported)
from data_tools.indexed import (  # noqa: F401  (the format's names, re-exported for callers of this module)
    DTYPE_CODES,
    INDEX_HEADER,
    INDEX_VERSION,
    IndexedOutput,
    index_bytes,
    optimal_dtype,
    publish,
)
from data_tools.inputs import MAX_TASK_BYTES, Task, iter_parquet_columns, iter_tasks, parquet_file  # noqa: F401
from loopmoe.tokenizer_fingerprint import fingerprint, remove_sidecar, write_sidecar

MAX_BAD_LINE_NOTES = 5  # skipped lines reported one by one; the rest only counted
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess.py", description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("input")
    g.add_argument("--input", action="append", metavar="PATH_OR_GLOB",
                   help="documents to tokenise; repeat the flag for several inputs; globs allowed (quote "
                        f"them); jsonl, jsonl.gz or plain text (default: {DEFAULT_CORPUS})")
    g.add_argument("--input-format", choices=("auto", "jsonl", "parquet", "text"), default="auto",
                   help="how to read the inputs; auto decides by file name (*.jsonl/.json/.ndjson[.gz|.zst] = "
                        "JSON lines, *.parquet = parquet, anything else plain text)")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="fields of each JSON line (columns of a parquet file) to tokenise; one output per "
                        "field. Plain text inputs take a single key (it names the output)")
    g.add_argument("--text-column", metavar="NAME",
                   help="the one field / parquet column to tokenise (same as --json-keys NAME)")
    g.add_argument("--file-slice", type=parse_slice, metavar="I/N",
                   help="tokenise only part I (0-based) of N of the input files, a contiguous run of them "
                        "(for Slurm job arrays: merge the N outputs in order with data_tools/merge.py)")
    g.add_argument("--text-unit", choices=("file", "paragraph"), default="file",
                   help="what one document is in a plain text input: the whole file, or each paragraph "
                        "(separated by blank lines)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed JSON lines, lines missing a field or with a non-string "
                        "field, parquet rows with a null value, and plain text files that are not UTF-8, "
                        "instead of stopping with an error")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", default=DEFAULT_TOKENIZER_PREFIX + ".model",
                   help="sentencepiece .model (train one with data_tools/train_tokenizer.py) or a Hugging "
                        "Face tokenizer.json (or its directory); told apart by content")
    g.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's end-of-document (EOS) id after every document; refused "
                        "when the tokenizer has no EOS piece")
    g.add_argument("--eod-token", metavar="TOKEN",
                   help="tokenizer.json only: the end-of-document token (default: eos_token of a "
                        "tokenizer_config.json beside it, else <|endoftext|>, <|end_of_text|>, </s>, <eos>)")
    g.add_argument("--add-special-tokens", action="store_true",
                   help="tokenizer.json only: let its post-processor add special tokens (e.g. a BOS) to "
                        "every document (off by default, as in megatron-core's HuggingFaceTokenizer)")
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

    def bad_row(self, note: str, error: str, skip: bool) -> bool:
        """A row that cannot be used: with ``skip`` counted (and noted, up to MAX_BAD_LINE_NOTES) and
        skipped; else the run stops with ``error``. True when the task must stop."""
        if not skip:
            self.error = error
            return True
        self.bad += 1
        if len(self.bad_notes) < MAX_BAD_LINE_NOTES:
            self.bad_notes.append(note)
        return False


_worker: dict = {}  # this process's tokenizer and settings, set once by init_worker


def init_worker(tokenizer: tuple | Encoder, keys: Sequence[str], skip_bad: bool,
                parent_pid: int | None) -> None:
    """Load the tokenizer once per process (the Pool initializer; ``parent_pid`` None: main process).

    ``tokenizer``: the open_tokenizer arguments (a worker loads its own), or the main process's Encoder.
    """
    if parent_pid is not None:
        # Ctrl-C goes to the whole process group; the main process alone decides what happens.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(parent_pid)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by Tokenizers.__enter__
        # One thread per worker (tokenizers' Rust batch encoder would start one per CPU in each).
        os.environ["RAYON_NUM_THREADS"] = "1"
    enc = tokenizer if isinstance(tokenizer, Encoder) else open_tokenizer(*tokenizer)
    _worker.update(enc=enc, keys=list(keys), skip_bad=skip_bad)


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
    n_rows = len(task.columns[0]) if task.columns is not None else len(task.items)
    for i in range(n_rows):
        where = task.first_line + i
        raw = task.items[i] if task.columns is None else b""
        if task.columns is not None:  # parquet: values already read, one list per key
            values = [col[i] for col in task.columns]
            bad_key = next((k for k, v in zip(keys, values) if not isinstance(v, str)), None)
            if bad_key is not None:
                msg = f"{task.path}: row {where}: column {bad_key!r} is null (rows count from 0)"
                if res.bad_row(msg, msg + "; drop such rows or pass --skip-bad-lines to skip them", w["skip_bad"]):
                    return res
                continue
        elif task.fmt == "text":
            try:
                values = [raw.decode("utf-8")]
            except UnicodeDecodeError as e:
                msg = f"{task.path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8"
                if res.bad_row(msg, msg + " (or pass --skip-bad-lines to skip it)", w["skip_bad"]):
                    return res
                continue
        else:
            if not raw.strip():
                continue
            try:
                values = json_fields(raw, keys)
            except BadLine as e:
                if res.bad_row(f"{task.path}:{where}: {e}", bad_line_message(task.path, where, e), w["skip_bad"]):
                    return res
                continue
        for column, value in zip(columns, values):
            column.append(value)
        res.text_bytes += sum(len(v.encode("utf-8")) for v in values)
    res.documents = len(columns[0])
    for column in columns:
        tokens, counts, empty = w["enc"].encode_documents(column)
        res.tokens.append(tokens)
        res.doc_tokens.append(counts)
        res.empty.append(empty)
    return res


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
            # While the pool runs, a stop signal only sets a flag, raised at the next safe point (check_stop):
            # an exception raised at a random bytecode could land while this thread holds one of the pool's
            # locks, and Pool.terminate() would then wait for it forever (seen: a SIGTERM while the main
            # process was blocked writing progress to a full stderr pipe). Blocking the signal instead
            # does not help: the pool's threads would take it.
            self._stop_signal = None
            self._old_handlers = {s: signal.signal(s, self._note_stop) for s in STOP_SIGNALS}
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a signal that came is noted here
        except BaseException:
            try:
                self.__exit__(None, None, None)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            raise
        return self

    def _note_stop(self, signum: int, frame: object) -> None:
        self._stop_signal = signum

    def check_stop(self) -> None:
        """Raise the noted stop signal (KeyboardInterrupt for SIGINT, Terminated for SIGTERM), if any."""
        sig = getattr(self, "_stop_signal", None)
        if sig == signal.SIGINT:
            raise KeyboardInterrupt
        if sig is not None:
            raise Terminated()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, handler)
        self._old_handlers = {}
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
            self.check_stop()
            pending.append(self.pool.apply_async(encode_task, (task,)))
            if len(pending) >= 4 * self.workers:
                yield _wait(pending.popleft(), self.worker_pids, self.check_stop)
        while pending:
            yield _wait(pending.popleft(), self.worker_pids, self.check_stop)


def _wait(async_result: mp.pool.AsyncResult, worker_pids: set[int], check_stop) -> Result:
    # Pool never reports a worker killed from outside (e.g. by the OOM killer): its task just never
    # finishes. Poll, and stop if one of the original workers has gone (or a stop signal came).
    while True:
        check_stop()
        async_result.wait(1.0)
        if async_result.ready():
            return async_result.get()
        alive = {p.pid for p in mp.active_children()}
        if not worker_pids <= alive:
            raise DataToolError("a worker process died (killed, or out of memory?); nothing was written. "
                                "Try fewer --workers or a smaller --batch-size")


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


def parse_slice(text: str) -> tuple[int, int]:
    """argparse type for --file-slice I/N: 0 <= I < N."""
    i, n = (int(x) for x in text.split("/"))
    if not 0 <= i < n:
        raise ValueError(text)
    return i, n


parse_slice.__name__ = "I/N with 0 <= I < N"


def file_slice(files: Sequence[str], part: tuple[int, int]) -> list[str]:
    """Part I of N of the files: contiguous, so outputs of parts 0..N-1 merged in order equal one run."""
    i, n = part
    return list(files[len(files) * i // n:len(files) * (i + 1) // n])


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
    if args.file_slice:
        files = file_slice(files, args.file_slice)
    for f in files:  # a missing or non-string column is found before any work starts
        if input_format(f, args.input_format) == "parquet":
            parquet_file(f, keys)
    tok_args = (args.tokenizer_model, args.append_eod, args.eod_token, args.add_special_tokens)
    enc = open_tokenizer(*tok_args)
    dtype = enc.dtype
    print(f"tokenizer: {enc.path} ({enc.kind}, {enc.vocab_size:,} ids, stored as {np.dtype(dtype).name}"
          f"{f', EOD id {enc.eod}' if enc.eod >= 0 else ''}): {enc.note}", file=sys.stderr)
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
    init_args = (enc if args.workers == 1 else tok_args, keys, args.skip_bad_lines)
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
        for prefix in prefixes:  # an old record must not outlive the pair it described (crash window)
            remove_sidecar(prefix)
        publish(outputs)
        for prefix in prefixes:  # which tokenizer wrote the pair: the trainer and merge.py compare it
            write_sidecar(prefix, fingerprint(enc.path, enc.vocab_size, enc.eod, enc.kind))
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
    if args.text_column:
        if argv is not None and "--json-keys" in argv or argv is None and "--json-keys" in sys.argv:
            raise DataToolError("give either --text-column or --json-keys, not both")
        args.json_keys = [args.text_column]
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
