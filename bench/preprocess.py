"""Benchmark data_tools/preprocess.py against Megatron-LM's own tools/preprocess_data.py; writes a Markdown report.

    git clone --branch core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /tmp/megatron-lm   # outside this repo
    python bench/preprocess.py --megatron-lm /tmp/megatron-lm          # -> docs/benchmarks/preprocess.md

Both run as whole processes (start-up, imports, workers, writes: the wall time a user waits), with the
same corpus, the same sentencepiece model, --append-eod and the same --workers; every round checks that
both wrote byte-identical .bin/.idx files. Rounds interleave the two (ours, Megatron's, ours, ...) so a
noisy neighbour hits both alike; the table gives the best and the median of --repeats rounds, and the
CPU seconds of each process tree (user + system of the process and its workers), which a shared
machine distorts far less than wall time.

Also measured: "start-up" (each script with --help: interpreter, imports, argument parsing; Megatron's
imports torch and megatron.training) and "the floor": sentencepiece's C++ encoder alone over the
already-parsed texts with num_threads = --workers (no reading, no JSON, no writing).

The corpus: --corpus, or built by bench/local_corpus.py from the text installed on this machine (Debian
documentation and manual pages, and the Python sources of the venv); it is not the demo corpus. The
tokenizer: --tokenizer-model, or trained by data_tools/train_tokenizer.py on the corpus (BPE, 8,000).

Megatron's script runs from the checkout with this venv's python (megatron-core 0.16.1 installed). Its
megatron.training imports megatron-core's batch-invariant Triton kernels, and CPU-only torch has no
triton, so the benchmark puts a sitecustomize.py that registers an empty module under that one name on
its PYTHONPATH (in a temporary directory; preprocess_data.py never calls those kernels). Nothing of
Megatron-LM's code is copied into this repository.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402

from bench import local_corpus  # noqa: E402
from data_tools import train_tokenizer  # noqa: E402
from data_tools.indexed import optimal_dtype  # noqa: E402

DEFAULT_OUT = os.path.join(ROOT, "docs", "benchmarks", "preprocess.md")
TRITON_SHIM = '''\
# Written by bench/preprocess.py: megatron.training imports megatron-core's batch-invariant Triton kernels,
# and CPU-only torch has no triton. preprocess_data.py never calls them: an empty module stands in.
import sys, types
_m = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
def _unavailable(*a, **k):
    raise RuntimeError("batch-invariant kernels need triton (benchmark shim)")
_m.enable_batch_invariant_mode = _m.set_batch_invariant_mode = _m.disable_batch_invariant_mode = _unavailable
_m.is_batch_invariant_mode_enabled = lambda: False
sys.modules[_m.__name__] = _m
'''


@dataclass
class Variant:
    name: str
    argv: list[str]  # the command; "{out}" is replaced by the output prefix
    env: dict[str, str]
    output: str  # the .bin/.idx prefix it writes, from "{out}"
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_timed(v: Variant, out: str) -> tuple[float, float]:
    argv = [a.replace("{out}", out) for a in v.argv]
    c0 = children_cpu()
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=v.env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"error: {v.name} failed ({r.returncode}):\n{shlex.join(argv)}\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return wall, children_cpu() - c0


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("sentencepiece", "numpy", "megatron-core", "torch"))


def floor(texts: list[str], model: str, threads: int) -> tuple[float, float]:
    """sentencepiece's batch encoder alone over parsed texts, ``threads`` C++ threads: wall and CPU s."""
    sp = spm.SentencePieceProcessor(model_file=model)
    c0, t0 = time.process_time(), time.perf_counter()
    sp.encode(texts, out_type=int, num_threads=threads)
    return time.perf_counter() - t0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-lm", required=True, metavar="DIR",
                   help="a Megatron-LM checkout (tag core_v0.16.1) outside this repository")
    p.add_argument("--corpus", help="JSON lines with a 'text' field (default: built by bench/local_corpus.py)")
    p.add_argument("--megabytes", type=float, default=80, help="size of the built corpus (default: 80)")
    p.add_argument("--tokenizer-model", help="sentencepiece model (default: trained, BPE 8,000, on the corpus)")
    p.add_argument("--workers", type=int, default=2, help="--workers of both scripts (default: 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default: 3)")
    p.add_argument("--work-dir", help="where corpus, tokenizer and outputs go (default: a temporary directory)")
    p.add_argument("--out", default=DEFAULT_OUT, help="Markdown report (default: %(default)s)")
    args = p.parse_args(argv)
    script = os.path.join(args.megatron_lm, "tools", "preprocess_data.py")
    if not os.path.isfile(script):
        sys.exit(f"error: {script} not found; check out Megatron-LM (tag core_v0.16.1) and pass --megatron-lm DIR")

    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    corpus = args.corpus
    corpus_note = f"`{corpus}`" if corpus else ""
    if not corpus:
        corpus = os.path.join(work, "corpus.jsonl")
        if not os.path.exists(corpus):
            local_corpus.main(["--out", corpus, "--megabytes", str(args.megabytes)])
        corpus_note = ("built by `bench/local_corpus.py` from this machine's installed text: Debian package "
                       "documentation and manual pages (prose, much non-ASCII) and the venv's Python sources "
                       "(code), about half each by bytes, one document per file")
    model = args.tokenizer_model
    tok_note = f"`{model}`" if model else ""
    if not model:
        model = os.path.join(work, "spm8k.model")
        reused = os.path.exists(model)
        if not reused:
            with contextlib.redirect_stdout(io.StringIO()):
                train_tokenizer.main(["--input", corpus, "--output-prefix", model[:-6], "--vocab-size", "8000",
                                      "--max-sentences", "300000"])
        tok_note = ("trained on the corpus with data_tools/train_tokenizer.py --vocab-size 8000 --max-sentences "
                    "300000 (BPE, byte fallback)" + (", reused from --work-dir" if reused else ""))
    sp = spm.SentencePieceProcessor(model_file=model)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    corpus_bytes = os.path.getsize(corpus)

    shim = os.path.join(work, "megatron_shim")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "sitecustomize.py"), "w") as f:
        f.write(TRITON_SHIM)
    py = sys.executable
    w = str(args.workers)
    ours_env = dict(os.environ, PYTHONPATH=ROOT)
    meg_env = dict(os.environ, PYTHONPATH=shim, PYTHONWARNINGS="ignore")
    ours = Variant(f"data_tools/preprocess.py --workers {w}",
                   [py, os.path.join(ROOT, "data_tools", "preprocess.py"), "--input", corpus, "--tokenizer-model", model,
                    "--append-eod", "--workers", w, "--log-interval", "0", "--overwrite", "--output-prefix", "{out}"],
                   ours_env, "{out}_text_document")
    meg = Variant(f"Megatron-LM tools/preprocess_data.py --workers {w}",
                  [py, script, "--input", corpus, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                   model, "--append-eod", "--workers", w, "--log-interval", "1000000", "--output-prefix", "{out}"],
                  meg_env, "{out}_text_document")
    starts = [Variant("start-up only: data_tools/preprocess.py --help", [py, ours.argv[1], "--help"], ours_env, ""),
              Variant("start-up only: preprocess_data.py --help", [py, script, "--help"], meg_env, "")]
    variants = [ours, meg]

    loads: list[tuple[float, float]] = []
    floors: list[tuple[float, float]] = []
    floors1: list[tuple[float, float]] = []
    for rnd in range(args.repeats + 1):  # round 0: warm-up (page cache, .pyc), not counted
        before = os.getloadavg()[0]
        order = variants if rnd % 2 else variants[::-1]
        ref = None
        for v in order:
            out = os.path.join(work, f"out_{v is meg}")
            wall, cpu = run_timed(v, out)
            prefix = v.output.replace("{out}", out)
            with open(prefix + ".bin", "rb") as b, open(prefix + ".idx", "rb") as x:
                got = (b.read(), x.read())
            for ext in (".bin", ".idx"):
                os.unlink(prefix + ext)
            if ref is None:
                ref = got
            elif got != ref:
                sys.exit("error: preprocess.py and Megatron's preprocess_data.py wrote different bytes")
            if rnd:
                v.times.append(wall)
                v.cpu.append(cpu)
            print(f"round {rnd}{' (warm-up)' if not rnd else ''}: {v.name}: {wall:.2f} s wall, {cpu:.2f} s CPU",
                  flush=True)
        for v in starts:
            wall, cpu = run_timed(v, "")
            if rnd:
                v.times.append(wall)
                v.cpu.append(cpu)
        if rnd:
            floors.append(floor(texts, model, args.workers))
            floors1.append(floor(texts, model, 1))
            loads.append((before, os.getloadavg()[0]))
            print(f"round {rnd}: floor {floors[-1][0]:.2f} s wall ({args.workers} threads), load {loads[-1]}",
                  flush=True)
    n_tokens = len(ref[0]) // np.dtype(optimal_dtype(sp.vocab_size())).itemsize
    report = render(args, command, variants, starts, floors, floors1, loads, corpus_note, tok_note, sp,
                    len(texts), corpus_bytes, n_tokens)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.write(report)
    os.replace(args.out + ".tmp", args.out)
    print(report)
    print(f"wrote {args.out}")
    return 0


def render(args, command, variants, starts, floors, floors1, loads, corpus_note, tok_note, sp, docs,
           corpus_bytes, tokens) -> str:
    ours, meg = variants
    best = {v.name: min(v.times) for v in variants + starts}
    med = {v.name: statistics.median(v.times) for v in variants + starts}
    cpu = {v.name: statistics.median(v.cpu) for v in variants + starts}
    fw, fc = min(f[0] for f in floors), statistics.median(f[1] for f in floors)
    f1w, f1c = min(f[0] for f in floors1), statistics.median(f[1] for f in floors1)
    rows = [f"| {v.name} | {best[v.name]:.2f} | {med[v.name]:.2f} | {cpu[v.name]:.2f} | "
            f"{corpus_bytes / best[v.name] / 1e6:.2f} | {tokens / best[v.name] / 1e6:.2f} |" for v in variants]
    rows += [f"| {v.name} | {best[v.name]:.2f} | {med[v.name]:.2f} | {cpu[v.name]:.2f} | | |" for v in starts]
    rows += [f"| floor: sentencepiece encode alone, {args.workers} threads | {fw:.2f} | "
             f"{statistics.median(f[0] for f in floors):.2f} | {fc:.2f} | {corpus_bytes / fw / 1e6:.2f} | "
             f"{tokens / fw / 1e6:.2f} |",
             f"| encoder alone, 1 thread | {f1w:.2f} | {statistics.median(f[0] for f in floors1):.2f} | {f1c:.2f} | "
             f"{corpus_bytes / f1w / 1e6:.2f} | {tokens / f1w / 1e6:.2f} |"]
    ratio_best = best[meg.name] / best[ours.name]
    ratio_med = med[meg.name] / med[ours.name]
    ratio_cpu = cpu[meg.name] / cpu[ours.name]
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    noisy = max(max(a, b) for a, b in loads) > 1.5 * (os.cpu_count() or 1)
    return "\n".join([
        "# Preprocessing benchmark: data_tools/preprocess.py vs Megatron-LM's tools/preprocess_data.py",
        "",
        f"Generated by `{command}` on {date}. Do not edit by hand: rerun the command.",
        "",
        f"- Machine: {machine()}",
        f"- Libraries: {versions()}; Megatron-LM's script from `{args.megatron_lm}` (tag core_v0.16.1)",
        f"- Corpus: {corpus_note}; {docs:,} documents, {corpus_bytes / 1e6:.1f} MB of JSON lines, "
        f"{tokens:,} tokens with EOD",
        f"- Tokenizer: {tok_note}; vocabulary {sp.vocab_size():,}, EOD id {sp.eos_id()}",
        f"- Load (1-minute load average before / after each timed round, {os.cpu_count()} CPUs): "
        + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in loads)
        + (" - **the machine was shared and heavily loaded: wall times are inflated and noisy; the CPU "
           "seconds and the ratios are the better guide**" if noisy else ""),
        f"- Method: 1 warm-up round, then {args.repeats} rounds, the two scripts interleaved (the order "
        f"alternates). Whole-process wall time; CPU s = median user+system seconds of the process tree. "
        f"Both wrote byte-identical .bin/.idx files in every round (checked).",
        "",
        "| variant | best s | median s | CPU s | MB/s | M tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"**preprocess.py is {ratio_best:.2f}x faster than Megatron's script (best times; median "
        f"{ratio_med:.2f}x) and uses {ratio_cpu:.2f}x less CPU** at --workers {args.workers}. "
        f"Goal >= 2x: {'met' if min(ratio_best, ratio_med) >= 2 else 'not met'}.",
        "",
    ])


if __name__ == "__main__":
    sys.exit(main())
