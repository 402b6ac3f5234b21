"""What the two data tools share: finding inputs, reading documents, clean errors, signals, temp names.

Kept free of torch and megatron on purpose: the data tools must import in a fraction of a second on a
machine without a GPU (importing megatron-core pulls in torch and tries Transformer Engine).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO, Literal, NoReturn

from loopmoe.tokenizer_json import TokenizerFileError

InputFormat = Literal["jsonl", "text", "parquet"]

# The demo corpus made by `make corpus` (scripts/get_corpus.py); the tools' default input.
DEFAULT_CORPUS = "data/corpus/python_docs.jsonl"
# Where train_tokenizer.py writes by default and preprocess.py looks by default.
DEFAULT_TOKENIZER_PREFIX = "data/tokenizer/spm"

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
EXIT_USAGE = 2  # bad flags or bad input (argparse uses 2 as well)
EXIT_SIGINT = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_SIGTERM = 143  # 128 + SIGTERM


class DataToolError(Exception):
    """A problem with the flags or the input. The message says what and how to fix it; no traceback."""


class BadLine(ValueError):
    """One input line cannot be used (bad JSON, missing field, ...). Fatal unless --skip-bad-lines."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException like KeyboardInterrupt, so ``except Exception`` does not eat it."""


def cpu_count() -> int:
    """CPUs this process may use (honours taskset / cgroup CPU sets, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "integer >= 1"  # what argparse prints in "invalid ... value"


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


non_negative_int.__name__ = "integer >= 0"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout in --help and appends "(default: X)" where a default exists."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {shown})"


# ---------------------------------------------------------------------------------------------------
# Inputs


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Files for ``--input`` values, in the order given; each glob's matches sorted by name.

    A pattern that matches nothing is an error (a typo must not silently shrink a dataset). The same
    file reached twice (two overlapping globs) is read once, at its first position.
    """
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        if _is_glob(pattern):
            matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
            if not matches:
                raise DataToolError(
                    f"--input {pattern!r}: the pattern matches no files; check the directory and the "
                    f"extension (quote the pattern so the shell does not expand it)")
        elif os.path.isdir(pattern):
            raise DataToolError(
                f"--input {pattern!r} is a directory; give files or a glob such as "
                f"'{os.path.join(pattern, '*.jsonl')}'")
        elif not os.path.isfile(pattern):
            hint = (" (`make corpus` creates the demo corpus; paths are relative to the current directory, "
                    "so run from the repository root)" if pattern == DEFAULT_CORPUS else "")
            raise DataToolError(f"--input {pattern!r}: no such file{hint}")
        else:
            matches = [pattern]
        for path in matches:
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def input_format(path: str, forced: str = "auto") -> InputFormat:
    """``parquet`` for *.parquet, ``jsonl`` for *.jsonl / *.json / *.ndjson (optionally .gz / .zst),
    else ``text``; ``forced`` wins."""
    if forced in ("jsonl", "text", "parquet"):
        return forced  # type: ignore[return-value]
    name = path.lower()
    for ext in COMPRESSED_SUFFIXES:
        if name.endswith(ext):
            name = name[:-len(ext)]
            break
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


class InputFile:
    """An input opened for reading bytes: gzip, zstandard or plain (decided by the magic bytes, not the name).

    ``position()`` is the offset in the file on disk (compressed bytes for .gz), for progress bars.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._raw: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed in close()
        self.stream: BinaryIO = self._raw
        magic = self._raw.peek(4)[:4]
        if magic[:2] == b"\x1f\x8b":
            self.stream = gzip.GzipFile(fileobj=self._raw, mode="rb")  # type: ignore[assignment]
        elif magic == ZSTD_MAGIC:
            try:
                import zstandard
            except ImportError:
                self._raw.close()
                raise DataToolError(f"{path} is zstandard-compressed, which needs the zstandard package: "
                                    f"pip install zstandard") from None
            self.stream = io.BufferedReader(ZstdFrames(self._raw, zstandard), 1 << 20)  # type: ignore[assignment]

    def position(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        if self.stream is not self._raw:
            self.stream.close()
        self._raw.close()

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ZstdFrames(io.RawIOBase):
    """Decompressed bytes of a .zst file: every frame (pzstd and `cat a.zst b.zst` write several), and an
    EOFError when the file ends inside a frame. zstandard's stream_reader returns a truncated download's
    partial data as if the file were complete; a dataset must not silently lose its tail."""

    def __init__(self, raw: BinaryIO, zstandard) -> None:
        self._raw, self._d = raw, zstandard.ZstdDecompressor()
        self._obj = self._d.decompressobj()
        self._buf, self._pos = b"", 0
        self._in_frame = self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while self._pos >= len(self._buf) and not self._eof:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the zstandard data ends inside a frame (a truncated file?)")
                self._eof = True
                break
            self._buf, self._pos = self._decompress(chunk), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._obj.decompress(data))
            if not self._obj.eof:
                break
            data = self._obj.unused_data  # the next frame starts here
            self._obj = self._d.decompressobj()
            self._in_frame = False
        return b"".join(out)


def read_error(path: str, err: Exception) -> DataToolError:
    """A read failure (truncated .gz/.zst, corrupt parquet, permission...) as an error that names the file."""
    return DataToolError(f"{path}: cannot read the file ({type(err).__name__}: {err})")


def read_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a corrupt or truncated input raises while it is read."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    for mod, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        m = sys.modules.get(mod)  # only when that library is in use already: never imported for this
        if m is not None and hasattr(m, name):
            errors.append(getattr(m, name))
    return tuple(errors)


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def json_fields(line: bytes | str, keys: Sequence[str]) -> list[str]:
    """The string values of ``keys`` in one JSON line. Raises ``BadLine`` saying what is wrong and the fix.

    The message does not name the file and line: the caller adds them (it knows them).
    """
    if line[:3] == b"\xef\xbb\xbf":  # a UTF-8 byte order mark opening the file; json.loads rejects it
        line = line[3:]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        # e.colno would count from the line's own trailing newline; e.pos is the offset in the line.
        raise BadLine(f"not valid JSON ({e.msg} at column {e.pos + 1}); fix or remove the line") from None
    except UnicodeDecodeError as e:
        raise BadLine(f"not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    if not isinstance(obj, dict):
        raise BadLine(f"expected a JSON object like {{\"text\": ...}}, got {_json_type(obj)}")
    values = []
    for key in keys:
        if key not in obj:
            present = ", ".join(repr(k) for k in list(obj)[:12]) + (", ..." if len(obj) > 12 else "")
            raise BadLine(f"field {key!r} is missing (fields present: {present or 'none'}); "
                          f"choose the field(s) with --json-keys")
        value = obj[key]
        if not isinstance(value, str):
            raise BadLine(f"field {key!r} is {_json_type(value)}, expected a string")
        values.append(value)
    return values


def bad_line_message(path: str, lineno: int, err: BadLine, skip_flag: bool = True) -> str:
    hint = " (or pass --skip-bad-lines to skip such lines)" if skip_flag else ""
    return f"{path}:{lineno}: {err}{hint}"


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs = runs of lines separated by one or more blank (empty or whitespace-only) lines.

    Inner newlines are kept; paragraphs that are only whitespace are dropped.
    """
    return [p for p in re.split(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*", text) if p.strip()]


def temp_name(final: str) -> str:
    """Where ``final`` is written until it is complete: same directory (so os.replace is atomic)."""
    return f"{final}.tmp-{os.getpid()}"


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    raise Terminated()


def install_sigterm_handler() -> None:
    """Turn SIGTERM (kill, Slurm, timeout) into an exception so ``finally`` blocks clean up."""
    signal.signal(signal.SIGTERM, _raise_terminated)


class SignalsDeferred:
    """Block SIGINT/SIGTERM for a few renames, so a Ctrl-C cannot leave half a set of outputs renamed."""

    _SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGNALS)

    def __exit__(self, *exc: object) -> None:
        # A signal that arrived meanwhile is delivered here, after the renames.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self._SIGNALS)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a tool's ``main`` and exit: 0 ok, 2 bad input (message, no traceback), 130/143 interrupted."""
    install_sigterm_handler()
    try:
        code = main(argv)
    except (DataToolError, TokenizerFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: no output written (temporary files removed)", file=sys.stderr)
        code = EXIT_SIGINT
    except Terminated:
        print("terminated: no output written (temporary files removed)", file=sys.stderr)
        code = EXIT_SIGTERM
    sys.exit(code)

