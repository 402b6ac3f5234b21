"""Reading the inputs of preprocess.py into tasks: batches of raw JSON lines, text documents or parquet values.

The main process only cuts the input into tasks (cheap); the workers parse and tokenise them. Formats:
* JSON lines (*.jsonl / *.json / *.ndjson), plain, gzip or zstandard (by magic bytes): raw lines go to
  the workers, which parse them, so a bad line is named by file and line number.
* Parquet (*.parquet): pyarrow streams it one record batch at a time (never the whole file), reading
  only the --json-keys / --text-column columns; a bad value is named by file and row (0-based).
* Plain text (anything else): one document per file, or per blank-line-separated paragraph.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from data_tools._common import BadLine, DataToolError, InputFile, InputFormat, bad_line_message, input_format, \
    json_fields, read_error, read_errors, split_paragraphs

MAX_TASK_BYTES = 8 << 20  # a task never holds more than ~8 MB of text, whatever --batch-size says


@dataclass
class Task:
    path: str
    fmt: InputFormat
    first_line: int  # JSON lines: line number of items[0]; parquet: row index; text: index among the file's units
    items: list[bytes]  # raw JSON lines (blank ones included, to keep line numbers) or text documents
    columns: list[list[Any]] | None = None  # parquet: per key, the values of rows first_line...


def parquet_file(path: str, keys: Sequence[str]):
    """Open a parquet file and check that every key is a string column. Errors name file and column."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataToolError(f"{path} is parquet, which needs the pyarrow package: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise read_error(path, e) from None
    schema = pf.schema_arrow
    for key in keys:
        if key not in schema.names:
            present = ", ".join(repr(n) for n in schema.names[:12]) + (", ..." if len(schema.names) > 12 else "")
            raise DataToolError(f"{path}: no column {key!r} (columns: {present}); choose the text column "
                                f"with --text-column (or --json-keys)")
        t = schema.field(key).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
            raise DataToolError(f"{path}: column {key!r} has type {t}, expected a string column; choose the "
                                f"text column with --text-column (or --json-keys)")
    return pf


def iter_parquet_columns(path: str, keys: Sequence[str], batch_rows: int) -> Iterator[tuple[int, list[list]]]:
    """(first row index, per key the values of the next rows): record batches, streamed."""
    pf = parquet_file(path, keys)
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(keys), use_threads=False):
            cols = [batch.column(k).to_pylist() for k in keys]
            yield row, cols
            row += batch.num_rows
    except read_errors() as e:
        raise read_error(path, e) from None


def iter_tasks(files: Sequence[str], args: argparse.Namespace, progress: Any = None) -> Iterator[Task]:
    keys = args.json_keys
    for path in files:
        fmt = input_format(path, args.input_format)
        if fmt == "parquet":
            for first, cols in iter_parquet_columns(path, keys, args.batch_size):
                yield Task(path, fmt, first, [], cols)
            if progress:
                import os

                progress.read_bytes(os.path.getsize(path))
            continue
        with InputFile(path) as f:
            try:
                if fmt == "text":
                    data = f.stream.read()
                    if progress:
                        progress.read_bytes(f.position())
                    if args.text_unit == "file":
                        yield Task(path, fmt, 0, [data])
                        continue
                    text = decode_text(data, path, args.skip_bad_lines)
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
            except read_errors() as e:  # unreadable file, truncated or corrupt .gz / .zst
                raise read_error(path, e) from None


def decode_text(data: bytes, path: str, skip_bad_lines: bool) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if skip_bad_lines:
            return None
        raise DataToolError(f"{path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8 "
                            f"(or pass --skip-bad-lines to skip it)") from None


def iter_texts(path: str, fmt: InputFormat, keys: Sequence[str], skip_bad_lines: bool,
               on_bad: Callable[[str], None] | None = None) -> Iterator[str]:
    """Every text of one input file: the ``keys`` fields of each JSON line, or a text file's content.

    For the tokenizer trainer (the preprocessor has its own batched, multi-process reader).
    Blank JSON lines are ignored. ``on_bad`` is told about each skipped line (or null parquet value).
    """
    if fmt == "parquet":
        for first, cols in iter_parquet_columns(path, keys, 1024):
            for i, values in enumerate(zip(*cols)):
                for key, value in zip(keys, values):
                    if isinstance(value, str):
                        yield value
                        continue
                    msg = f"{path}: row {first + i}: column {key!r} is null (rows count from 0)"
                    if not skip_bad_lines:
                        raise DataToolError(msg + "; drop such rows or pass --skip-bad-lines to skip them")
                    if on_bad:
                        on_bad(msg)
        return
    with InputFile(path) as f:
        try:
            if fmt == "text":
                data = f.stream.read()
                try:
                    yield data.decode("utf-8")
                except UnicodeDecodeError as e:
                    msg = f"{path}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8"
                    if not skip_bad_lines:
                        raise DataToolError(msg + " (or pass --skip-bad-lines to skip it)") from None
                    if on_bad:
                        on_bad(msg)
                return
            for lineno, line in enumerate(f.stream, 1):
                if not line.strip():
                    continue
                try:
                    values = json_fields(line, keys)
                except BadLine as e:
                    if not skip_bad_lines:
                        raise DataToolError(bad_line_message(path, lineno, e)) from None
                    if on_bad:
                        on_bad(f"{path}:{lineno}: {e}")
                    continue
                yield from values
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise read_error(path, e) from None


# ---------------------------------------------------------------------------------------------------
# Outputs, signals, exit codes
