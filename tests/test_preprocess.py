"""data_tools/preprocess.py: megatron-core compatibility, equal output for any worker count, input
formats, every bad-input case, and interrupted runs leaving no valid-looking output."""
from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_tools import preprocess, train_tokenizer
from data_tools._common import DataToolError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "python_docs.jsonl")
SCRIPT = os.path.join(ROOT, "data_tools", "preprocess.py")

# Edge cases every test corpus carries: empty, whitespace only, non-ASCII, indentation, a long document.
EDGE_DOCS = [
    "Hello world.\nSecond line with  two  spaces.",
    "",
    "Unicode: ünïcødé 漢字 🙂 — dash",
    "    indented code\n\tdef f(x):\n        return x * 2\n",
    " ",
    "a",
]


def sample_docs(n: int, start: int = 0) -> list[str]:
    """``n`` real documents from the demo corpus when it is there, else generated English-like ones."""
    if os.path.exists(CORPUS):
        docs = []
        with open(CORPUS, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= start + n:
                    break
                if i >= start:
                    docs.append(json.loads(line)["text"])
        if len(docs) == n:
            return docs
    rng = random.Random(start)
    words = ("the module function returns a value list of objects when called with an argument "
             "python data class method import error file path string integer default").split()
    return ["\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
                      for _ in range(rng.randint(1, 30))) for _ in range(n)]


def write_jsonl(path, docs: list[str], key: str = "text", gz: bool = False, extra: dict | None = None) -> str:
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, **(extra or {})}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    """A 512-piece BPE model with EOS id 2, trained once (about a second) on a slice of the corpus."""
    d = tmp_path_factory.mktemp("tok")
    corpus = write_jsonl(d / "train.jsonl", sample_docs(300) + EDGE_DOCS)
    assert train_tokenizer.main(["--input", corpus, "--output-prefix", str(d / "spm"), "--vocab-size", "512",
                                 "--workers", "1"]) == 0
    return str(d / "spm.model")


@pytest.fixture(scope="module")
def sp(tokenizer):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tokenizer)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return EDGE_DOCS[:3] + sample_docs(60, start=300) + EDGE_DOCS[3:]


def run_main(*argv: str) -> int:
    return preprocess.main(list(argv))


def run_cli(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def expected_tokens(sp, docs: list[str], eod: bool) -> list[list[int]]:
    return [sp.encode(d) + ([sp.eos_id()] if eod else []) for d in docs]


def read_back(prefix: str) -> list[list[int]]:
    """Documents as megatron-core's own reader sees them (sequences joined per document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    di = ds.document_indices
    out = []
    for d in range(len(di) - 1):
        seqs = [ds[i] for i in range(di[d], di[d + 1])]
        out.append(np.concatenate(seqs).tolist() if seqs else [])
    return out


def megatron_builder_files(tmp_path, token_lists: list[list[int]], dtype) -> tuple[bytes, bytes]:
    """What megatron-core's IndexedDatasetBuilder writes for these documents, as Megatron's
    preprocess_data.py calls it: add_document(ids, [len(ids)]) per document ([] when empty), finalize."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    bin_path, idx_path = str(tmp_path / "ref.bin"), str(tmp_path / "ref.idx")
    builder = IndexedDatasetBuilder(bin_path, dtype=dtype)
    for ids in token_lists:
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(idx_path)
    with open(bin_path, "rb") as b, open(idx_path, "rb") as i:
        return b.read(), i.read()


def files_of(prefix: str) -> tuple[bytes, bytes]:
    with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as i:
        return b.read(), i.read()


# ---------------------------------------------------------------------------------------------------
# Correctness and compatibility


@pytest.mark.parametrize("eod", [True, False])
def test_megatron_reads_back_sentencepiece_ids_and_bytes_match_builder(tmp_path, tokenizer, sp, docs, eod):
    from megatron.core.datasets.indexed_dataset import DType

    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    prefix = str(tmp_path / "out" / "ds")
    assert run_main("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix", prefix,
                    "--workers", "1", *(["--append-eod"] if eod else [])) == 0
    out = prefix + "_text_document"
    want = expected_tokens(sp, docs, eod)
    assert read_back(out) == want
    if eod:  # the empty document is the single token EOS
        assert want[1] == [sp.eos_id()]
    else:  # the empty document is a document_indices entry without a sequence, as in Megatron
        assert want[1] == []
    dtype = DType.optimal_dtype(sp.vocab_size())
    assert dtype is np.uint16
    assert files_of(out) == megatron_builder_files(tmp_path, want, dtype)


def test_index_writer_matches_builder_for_int32_and_edge_cases(tmp_path):
    """The int32 path (vocab >= 65,500), empty documents at both ends, and no documents at all."""
    from megatron.core.datasets.indexed_dataset import DType

    for vocab in (1, 4096, 65499, 65500, 200_000):
        assert preprocess.optimal_dtype(vocab) is DType.optimal_dtype(vocab)
    rng = np.random.default_rng(0)
    cases = {
        "int32": ([[]] + [rng.integers(0, 200_000, rng.integers(0, 50)).tolist() for _ in range(40)] + [[]],
                  np.int32),
        "none": ([], np.uint16),
        "all_empty": ([[], [], []], np.uint16),
    }
    for name, (lists, dtype) in cases.items():
        out = preprocess.IndexedOutput(str(tmp_path / name), dtype)
        for chunk in (lists[:7], lists[7:]):  # two results, as from two worker tasks
            tokens, counts, _ = preprocess.join_documents(chunk, -1, dtype)
            out.add(tokens, counts)
        out.finish()
        preprocess.publish([out])
        (tmp_path / "ref").mkdir(exist_ok=True)
        assert files_of(str(tmp_path / name)) == megatron_builder_files(tmp_path / "ref", lists, dtype), name


def test_two_workers_equal_one_worker(tmp_path, tokenizer, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs * 3)
    for w in ("1", "2"):
        assert run_main("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / w),
                        "--workers", w, "--batch-size", "5", "--append-eod") == 0
    assert files_of(str(tmp_path / "1_text_document")) == files_of(str(tmp_path / "2_text_document"))


def test_gzip_input_equals_plain(tmp_path, tokenizer, docs):
    plain = write_jsonl(tmp_path / "in.jsonl", docs)
    gz = write_jsonl(tmp_path / "in.jsonl.gz", docs, gz=True)
    for name, inp in (("plain", plain), ("gz", gz)):
        assert run_main("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix",
                        str(tmp_path / name), "--append-eod", "--workers", "1") == 0
    assert files_of(str(tmp_path / "plain_text_document")) == files_of(str(tmp_path / "gz_text_document"))


def test_inputs_and_globs_keep_order_and_text_units(tmp_path, tokenizer, sp, docs):
    d = tmp_path / "shards"
    d.mkdir()
    a = write_jsonl(tmp_path / "a.jsonl", docs[:4])
    write_jsonl(d / "b2.jsonl.gz", docs[10:12], gz=True)  # sorted: b1 before b2 whatever the write order
    write_jsonl(d / "b1.jsonl", docs[4:10])
    (d / "notes.txt").write_text("not matched by the glob")
    text = "First paragraph,\ntwo lines.\n\n  \nSecond paragraph.\n\n\n\nThird.\n"
    (tmp_path / "c.txt").write_text(text, encoding="utf-8")
    common = ["--tokenizer-model", tokenizer, "--append-eod", "--workers", "2", "--batch-size", "3"]
    assert run_main("--input", a, "--input", str(d / "b*.json*"), "--input", str(tmp_path / "c.txt"),
                    "--input", a,  # a repeated input is read once
                    "--output-prefix", str(tmp_path / "file"), *common) == 0
    want = docs[:4] + docs[4:10] + docs[10:12] + [text]
    assert read_back(str(tmp_path / "file_text_document")) == expected_tokens(sp, want, True)
    assert run_main("--input", str(tmp_path / "c.txt"), "--text-unit", "paragraph",
                    "--output-prefix", str(tmp_path / "para"), *common) == 0
    paragraphs = ["First paragraph,\ntwo lines.", "Second paragraph.", "Third.\n"]
    assert read_back(str(tmp_path / "para_text_document")) == expected_tokens(sp, paragraphs, True)


def test_one_output_per_json_key(tmp_path, tokenizer, sp, docs):
    inp = tmp_path / "in.jsonl"
    with open(inp, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"title": f"Title {i}", "text": d, "id": i}) + "\n")
    assert run_main("--input", str(inp), "--json-keys", "text", "title", "--tokenizer-model", tokenizer,
                    "--output-prefix", str(tmp_path / "k"), "--workers", "1") == 0
    assert read_back(str(tmp_path / "k_text_document")) == expected_tokens(sp, docs, False)
    titles = [f"Title {i}" for i in range(len(docs))]
    assert read_back(str(tmp_path / "k_title_document")) == expected_tokens(sp, titles, False)


def test_summary_and_log_lines(tmp_path, tokenizer, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    r = run_cli("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "s"),
                "--append-eod", "--workers", "2", "--batch-size", "4", "--log-interval", "20")
    assert r.returncode == 0, r.stderr
    assert f"done: {len(docs)} documents" in r.stdout
    assert "bad lines skipped: 0" in r.stdout
    assert "empty documents: 1" in r.stdout  # "" (" " tokenises to a piece)
    assert "processed 20 documents" in r.stderr and "docs/s" in r.stderr and "MB/s" in r.stderr


def test_import_pulls_in_no_torch_megatron_or_transformer_engine():
    code = ("import sys, data_tools.preprocess, data_tools.train_tokenizer; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformer_engine')])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------
# Bad input: clear message (file, line, field, fix), exit code 2, nothing written


def assert_nothing_written(out_dir) -> None:
    assert not os.path.exists(out_dir) or os.listdir(out_dir) == [], os.listdir(out_dir)


def test_malformed_json_line_fails_with_file_and_line(tmp_path, tokenizer):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"text": "fine"}\n\n{"text": "broken"\n{"text": "fine"}\n')
    r = run_cli("--input", str(inp), "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "o" / "x"))
    assert r.returncode == 2
    assert f"{inp}:3: not valid JSON" in r.stderr and "--skip-bad-lines" in r.stderr
    assert "Traceback" not in r.stderr
    assert_nothing_written(tmp_path / "o")


def test_skip_bad_lines_counts_and_skips(tmp_path, tokenizer, sp):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"text": "one"}\n{"text": \n{"body": "no text"}\n[1, 2]\n{"text": 7}\n{"text": "two"}\n')
    r = run_cli("--input", str(inp), "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "x"),
                "--skip-bad-lines", "--append-eod")
    assert r.returncode == 0, r.stderr
    assert "bad lines skipped: 4" in r.stdout and "done: 2 documents" in r.stdout
    assert f"{inp}:2" in r.stderr and f"{inp}:5" in r.stderr
    assert read_back(str(tmp_path / "x_text_document")) == expected_tokens(sp, ["one", "two"], True)


@pytest.mark.parametrize("unit", ["file", "paragraph"])
def test_byte_order_mark_and_skipped_undecodable_text(tmp_path, tokenizer, sp, unit):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\n{"text": "second"}\n')  # as Windows tools write
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n\nau lait".encode("latin-1"))
    (tmp_path / "good.txt").write_text("one\n\ntwo", encoding="utf-8")
    assert run_main("--input", str(bom), "--input", str(tmp_path / "*.txt"), "--text-unit", unit,
                    "--skip-bad-lines", "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "x"),
                    "--workers", "1") == 0
    texts = ["first", "second"] + (["one\n\ntwo"] if unit == "file" else ["one", "two"])
    assert read_back(str(tmp_path / "x_text_document")) == expected_tokens(sp, texts, False)


@pytest.mark.parametrize("line,expect", [
    ('{"body": "x", "id": 1}', "field 'text' is missing (fields present: 'body', 'id')"),
    ('{"text": 12}', "field 'text' is a number, expected a string"),
    ('{"text": null}', "field 'text' is null, expected a string"),
    ('["text"]', "expected a JSON object"),
])
def test_bad_field_names_key_and_line(tmp_path, tokenizer, line, expect):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "fine"}\n' + line + "\n")
    r = run_cli("--input", str(inp), "--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "o" / "x"))
    assert r.returncode == 2
    assert f"{inp}:2: {expect}" in r.stderr, r.stderr
    assert_nothing_written(tmp_path / "o")


def test_append_eod_refused_for_tokenizer_without_eos_before_any_work(tmp_path, docs):
    model = tmp_path / "noeos"
    assert train_tokenizer.main(["--input", write_jsonl(tmp_path / "t.jsonl", sample_docs(100)),
                                 "--output-prefix", str(model), "--vocab-size", "400", "--eos-id", "-1",
                                 "--workers", "1"]) == 0
    inp = write_jsonl(tmp_path / "in.jsonl", docs)
    r = run_cli("--input", inp, "--tokenizer-model", f"{model}.model", "--append-eod",
                "--output-prefix", str(tmp_path / "o" / "x"))
    assert r.returncode == 2
    assert "no end-of-document (EOS) piece (eos_id() == -1)" in r.stderr and "--eos-id" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before even creating the output directory
    # Without --append-eod the same tokenizer is fine.
    assert run_main("--input", inp, "--tokenizer-model", f"{model}.model", "--workers", "1",
                    "--output-prefix", str(tmp_path / "o" / "x")) == 0


def test_existing_output_needs_overwrite(tmp_path, tokenizer, sp, docs):
    inp = write_jsonl(tmp_path / "in.jsonl", docs[:5])
    prefix = str(tmp_path / "x")
    assert run_main("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix", prefix, "--workers", "1") == 0
    before = files_of(prefix + "_text_document")
    r = run_cli("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix", prefix, "--append-eod")
    assert r.returncode == 2
    assert f"{prefix}_text_document.bin already exists; pass --overwrite" in r.stderr
    assert files_of(prefix + "_text_document") == before
    assert run_main("--input", inp, "--tokenizer-model", tokenizer, "--output-prefix", prefix, "--workers", "1",
                    "--append-eod", "--overwrite") == 0
    assert read_back(prefix + "_text_document") == expected_tokens(sp, docs[:5], True)
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "x_text_document.bin", "x_text_document.idx",
                                            "x_text_document.tokenizer.json"]  # and the tokenizer record


def test_input_errors_name_the_pattern_or_file(tmp_path, tokenizer):
    tok = ["--tokenizer-model", tokenizer, "--output-prefix", str(tmp_path / "o" / "x")]
    pattern = str(tmp_path / "nothing" / "*.jsonl")
    r = run_cli("--input", pattern, *tok)
    assert r.returncode == 2 and f"--input {pattern!r}: the pattern matches no files" in r.stderr
    r = run_cli("--input", str(tmp_path / "missing.jsonl"), *tok)
    assert r.returncode == 2 and "missing.jsonl': no such file" in r.stderr
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    r = run_cli("--input", str(tmp_path / "latin1.txt"), *tok)
    assert r.returncode == 2 and f"{tmp_path / 'latin1.txt'}: not valid UTF-8 at byte 3" in r.stderr
    lines = "".join(json.dumps({"text": os.urandom(32).hex()}) + "\n" for _ in range(1000)).encode()
    whole = gzip.compress(lines)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a truncated download
    r = run_cli("--input", str(tmp_path / "cut.jsonl.gz"), *tok)
    assert r.returncode == 2 and f"{tmp_path / 'cut.jsonl.gz'}: cannot read the file" in r.stderr
    r = run_cli("--input", str(tmp_path / "latin1.txt"), "--tokenizer-model", str(tmp_path / "none.model"))
    assert r.returncode == 2 and "none.model': no such file" in r.stderr
    with pytest.raises(DataToolError, match="is a directory; give a prefix such as"):
        run_main("--input", str(tmp_path / "latin1.txt"), "--tokenizer-model", tokenizer,
                 "--output-prefix", str(tmp_path))
    with pytest.raises(DataToolError, match="plain text, which has one document field"):
        run_main("--input", str(tmp_path / "latin1.txt"), "--json-keys", "a", "b", *tok)
    assert_nothing_written(tmp_path / "o")


# ---------------------------------------------------------------------------------------------------
# Interrupted runs


@pytest.fixture(scope="module")
def big_input(tmp_path_factory) -> str:
    """About 12 MB of JSON lines: a few seconds of work, so a signal lands mid-run."""
    d = tmp_path_factory.mktemp("big")
    docs = sample_docs(400)
    with open(d / "big.jsonl", "w") as f:
        while f.tell() < 12e6:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    return str(d / "big.jsonl")


@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "2"), (signal.SIGKILL, "2")])
def test_interrupted_run_leaves_no_valid_output(tmp_path, tokenizer, big_input, sig, workers):
    import psutil

    import fcntl
    import termios

    out = tmp_path / "o"
    # A progress line per 16 documents (300 in all) on a one-page stderr pipe nobody reads yet: once the
    # pipe is full the run blocks mid-way, so it cannot finish before the signal however fast or slow the
    # machine is.
    proc = subprocess.Popen([sys.executable, SCRIPT, "--input", big_input, "--tokenizer-model", tokenizer,
                             "--output-prefix", str(out / "x"), "--append-eod", "--workers", workers,
                             "--batch-size", "16", "--log-interval", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            # a test runner started in the background (nohup, `cmd &`) passes SIGINT down
                            # ignored, and Python then installs no Ctrl-C handler: give the run a terminal's
                            # default disposition, as a user's shell would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    capacity = fcntl.fcntl(proc.stderr.fileno(), 1031, 4096)  # F_SETPIPE_SZ: one page (~45 lines)

    def pending() -> int:  # bytes written to stderr and not read
        return int.from_bytes(fcntl.ioctl(proc.stderr.fileno(), termios.FIONREAD, b"\0" * 4), sys.byteorder)

    deadline = time.monotonic() + 600
    # The events: the temporary outputs exist (it started writing) and the stderr pipe is full (it is blocked).
    while not (out.exists() and any(".tmp-" in n for n in os.listdir(out)) and pending() > capacity - 512):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"stderr holds {pending()} of {capacity} bytes after 600 s"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) == (0 if workers == "1" else int(workers))
    assert proc.poll() is None, "the run finished before the signal; make big_input bigger"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -9}[sig], stderr
    left = os.listdir(out)
    assert "x_text_document.idx" not in left and "x_text_document.bin" not in left
    if sig != signal.SIGKILL:  # cleaned up, no traceback
        assert left == [] and "Traceback" not in stderr and "no output written" in stderr
    else:  # only the temporary names can remain
        assert all(".tmp-" in n for n in left)
    gone, alive = psutil.wait_procs(children, timeout=600)  # workers never outlive the main process
    assert not alive


def test_sigterm_while_workers_start_does_not_hang(tmp_path, tokenizer, big_input):
    """SIGTERM as soon as the first worker exists: Pool.terminate() must be able to stop workers that
    have not run their initializer yet (they once inherited our SIGTERM handler and hung the join)."""
    import psutil

    for attempt in range(3):
        out = tmp_path / str(attempt)
        proc = subprocess.Popen([sys.executable, SCRIPT, "--input", big_input, "--tokenizer-model", tokenizer,
                                 "--output-prefix", str(out / "x"), "--workers", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 600  # a cap: the event is the first worker
        while not parent.children():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 143, stderr
        assert not out.exists() or os.listdir(out) == []
