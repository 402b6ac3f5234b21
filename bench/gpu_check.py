"""The prepared GPU check (`make gpu-check`, via scripts/gpu_check.sh): one run, under 8 minutes on one
H100/H200, of what a user runs, saying plainly what it ran and what it skipped. Report: docs/benchmarks/gpu.md.

    python bench/gpu_check.py [--out docs/benchmarks/gpu.md] [--budget-s 420]
    python bench/gpu_check.py --dry-run --out /tmp/gpu.md     # CPU: the same commands at tiny shapes
    python bench/gpu_check.py --print-commands                # the commands only, nothing run

In order of importance (each part starts only while the time budget lasts; what did not run is listed
with the reason):
1. the real trainer, ``torchrun --standalone --nproc-per-node 1 pretrain_loopmoe.py`` on one GPU (NCCL,
   bf16, ZeRO-1, megatron linears) at the LoopMoE-3B widths (1 prelude + 1 loop layer x 2 + 1 coda, the
   real 64,000 vocabulary, micro-batch 2 x 4,096 tokens):
   A: 6 steps uninterrupted; B: the same command with ``train.exit_interval=3`` (checkpoint at step 3 and
   stop), then the same command again (resumes from step 3 to 6). Steps 4-6 of B against A; step time and
   MFU (against the dense bf16 peak) and peak allocated / reserved memory from A's metrics.jsonl, beside
   ``python -m loopmoe.memory`` for the same layout;
2. bench/gpu_probe.py: host synchronisations per optimizer step under ``torch.cuda.set_sync_debug_mode``,
   a profiler table of one micro-batch, the SDPA backends of the 9/3-head layout and their error against
   the math backend;
3. FP8 through torchao (``train.precision=fp8 train.fp8_backend=torchao model.linear_backend=torch``): the
   6 steps of A again; its speed-up and loss gap against bf16;
4. FP8 through Transformer Engine where it imports (else one line why);
5. the GPU-marked tests.
Data: ``--data-dir`` (default wheels/gpu_data, made by `make gpu-wheels` where PyPI and the corpus are);
built here from data/corpus when missing. ``--dry-run`` runs everything on the CPU at tiny shapes
(configs/tiny_loopmoe.yaml) and never produces a GPU figure.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GPU_TEST_FILES = ["tests/test_grouped_experts.py", "tests/test_host_sync.py", "tests/test_model.py",
                  "tests/test_reshard.py", "tests/test_te_layout.py", "tests/test_fp8.py", "tests/test_bf16.py"]
CORPUS = os.path.join(ROOT, "data", "corpus", "python_docs.jsonl")
STEPS, STOP_AT = 6, 3


class Plan:
    """The shapes of one check: the real ones on a GPU, tiny ones in a dry run on the CPU."""

    def __init__(self, dry: bool):
        self.dry = dry
        if dry:
            self.config = "configs/tiny_loopmoe.yaml"
            self.shape = ["data.seq_len=64", "train.micro_batch=2", "model.vocab_size=512"]
            self.data_docs, self.data_vocab = 200, 512
        else:
            self.config = "configs/loopmoe_3b.yaml"  # the 3B widths, 4 executed layers, the real vocabulary
            self.shape = ["model.n_prelude=1", "model.n_loop=1", "model.n_coda=1", "model.loop_iters=2",
                          "data.seq_len=4096", "train.micro_batch=2"]
            self.data_docs, self.data_vocab = 1500, 8000  # ~1M tokens; token ids of an 8,000-piece tokenizer, 64,000-row model
        self.common = [*self.shape, "parallel.ep=1", "parallel.tp=1", "parallel.pp=1", "train.grad_accum=1",
                       f"train.steps={STEPS}", "train.log_interval=1", "train.eval_interval=1000",
                       "train.eval_iters=1", "optim.warmup_steps=2", "data.split=90,10,0", "train.zero_stage=1",
                       "logging.tensorboard=false", "logging.progress_bar=false", "checkpoint.interval=1000"]

    def bf16(self) -> list[str]:
        return ["train.precision=bf16", "model.linear_backend=megatron"]

    def fp8_torchao(self) -> list[str]:
        return ["train.precision=fp8", "train.fp8_backend=torchao", "model.linear_backend=torch"]

    def fp8_te(self) -> list[str]:
        return ["train.precision=fp8", "train.fp8_backend=te", "model.linear_backend=te"]


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def trainer_cmd(plan: Plan, data: list[str], precision: list[str], run_dir: str, extra=()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "pretrain_loopmoe.py", "--config", plan.config, *plan.common, *precision, *data,
            f"logging.run_dir={run_dir}", *extra]


def prepare_data(out_dir: str, n_docs: int, vocab: int) -> list[str]:
    """A sentencepiece tokenizer and .bin/.idx of the first ``n_docs`` documents of the demo corpus, made
    by our own data tools (skipped when they exist). Returns the data.* overrides."""
    tok, prefix = os.path.join(out_dir, "tok.model"), os.path.join(out_dir, "docs_text_document")
    if not (os.path.exists(tok) and os.path.exists(prefix + ".idx")):
        if not os.path.exists(CORPUS):
            raise FileNotFoundError(f"{CORPUS} is missing (make corpus) and {out_dir} holds no prepared data")
        os.makedirs(out_dir, exist_ok=True)
        src = os.path.join(out_dir, "slice.jsonl")
        with open(CORPUS) as f, open(src, "w") as out:
            for i, line in zip(range(n_docs), f):
                out.write(line)
        py = sys.executable
        subprocess.run([py, "data_tools/train_tokenizer.py", "--input", src, "--vocab-size", str(vocab),
                        "--output-prefix", os.path.join(out_dir, "tok")], cwd=ROOT, check=True, capture_output=True)
        subprocess.run([py, "data_tools/preprocess.py", "--input", src, "--tokenizer-model", tok, "--output-prefix",
                        os.path.join(out_dir, "docs"), "--append-eod", "--workers", "1"], cwd=ROOT, check=True,
                       capture_output=True)
        os.remove(src)
    return [f"data.prefixes={prefix}", f"data.tokenizer_model={tok}"]


class Check:
    def __init__(self, args, plan: Plan, work: str):
        self.args, self.plan, self.work = args, plan, work
        self.t0 = time.time()
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.sections: list[str] = []
        self.commands: list[str] = []

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def run(self, name: str, cmd: list[str], cap: float) -> tuple[int | str, str]:
        """Run ``cmd`` (logged, shown in the report); returns (exit code or "timeout", output tail)."""
        self.commands.append(shlex.join(cmd).replace(sys.executable, "python").replace(self.work, "$WORK"))
        print(f"== {name}: {self.commands[-1]}", flush=True)
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")}
        if self.plan.dry:
            env["OMP_NUM_THREADS"] = "1"
        try:
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(cap, 1))
            return res.returncode, (res.stdout + res.stderr)[-4000:]
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return "timeout", out[-4000:]


def metrics(run_dir: str) -> dict[int, dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in recs if "loss" in r}


def median_of(recs: dict[int, dict], key: str, steps) -> float | None:
    vals = [recs[s][key] for s in steps if s in recs and key in recs[s]]
    return statistics.median(vals) if vals else None


def part_trainer(c: Check, data: list[str]) -> dict[int, dict]:
    """A (uninterrupted) and B (stop at 3, resume): the real trainer with save and resume."""
    p = c.plan
    a_dir, b_dir = os.path.join(c.work, "bf16_A"), os.path.join(c.work, "bf16_B")
    rc, out = c.run("bf16 A (6 steps)", trainer_cmd(p, data, p.bf16(), a_dir), c.left())
    a = metrics(a_dir)
    if rc != 0:
        c.skipped.append(f"bf16 trainer run A: FAILED (exit {rc})")
        c.sections += ["## bf16 trainer run A failed", "", "```", out[-2500:], "```", ""]
        return a
    c.ran.append("pretrain_loopmoe.py, bf16, ZeRO-1, megatron linears: 6 steps (A)")
    b_cmd = trainer_cmd(p, data, p.bf16(), b_dir)
    b_ok = False
    if c.left() > 30:
        rc1, out1 = c.run("bf16 B1 (stop at step 3)", b_cmd + [f"train.exit_interval={STOP_AT}"], c.left())
        rc2, out2 = c.run("bf16 B2 (resume to 6)", b_cmd, c.left()) if rc1 == 0 else (None, "")
        b_ok = rc1 == 0 and rc2 == 0 and "resumed from" in out2
        if b_ok:
            c.ran.append(f"the same run stopped at step {STOP_AT} (checkpoint), then resumed to step {STEPS} (B)")
        else:
            c.skipped.append(f"stop-and-resume B: FAILED (exits {rc1}, {rc2})")
            c.sections += ["## stop-and-resume B failed", "", "```", (out1 + out2)[-2500:], "```", ""]
    else:
        c.skipped.append("stop-and-resume B: time budget spent")
    b = metrics(b_dir) if b_ok else {}
    tol = 0.0 if p.dry else 2e-3  # relative, on the LM loss; see the text below the table
    rows, worst = [], 0.0
    for s in range(1, STEPS + 1):
        la = a.get(s, {}).get("lm_loss")
        lb = b.get(s, {}).get("lm_loss")
        if la is not None and lb is not None and s > STOP_AT:
            worst = max(worst, abs(la - lb) / abs(la))
        rows.append(f"| {s} | {loss_txt(la)} | {loss_txt(lb)} | "
                    + (f"{abs(la - lb):.3g}" if la is not None and lb is not None else "n/a") + " |")
    verdict = ("n/a (B did not run)" if not b_ok else
               f"{'PASS' if worst <= tol else 'FAIL'}: largest relative difference over steps {STOP_AT + 1}-{STEPS} "
               f"{worst:.3g} (tolerance {tol:g})")
    c.sections += ["## Save, stop, resume: the resumed run against the uninterrupted one", "",
                   f"LM loss per step of A (uninterrupted) and B (checkpoint at step {STOP_AT}, process ended, "
                   f"same command again). Verdict: **{verdict}**.",
                   "" if p.dry else
                   "Tolerance: not bitwise on a GPU even without the stop, because CUDA's scatter-add "
                   "(index_add_, the MoE combine) and the flash-attention backward accumulate with atomics in "
                   "an order that changes from run to run; bf16 then rounds those differences up. 2e-3 of the "
                   "loss is far above that noise after 3 steps and far below what a lost optimizer state or "
                   "a wrong data position gives (the loss of a fresh model, or of other batches, differs by "
                   "more than 1e-2).", "",
                   "| step | A lm_loss | B lm_loss | abs diff |", "|---:|---:|---:|---:|", *rows, ""]
    return a


def gib(x: float | None, dry: bool) -> str:
    return "n/a (CPU)" if dry or x is None else f"{x:.2f}"


def loss_txt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.6f}"


def part_speed_memory(c: Check, a: dict[int, dict], data: list[str]) -> None:
    steady = range(2, STEPS)  # step 1 holds the warm-up, the last one the validation
    step_s = median_of(a, "step_time", steady)
    mfu = median_of(a, "mfu", steady)
    tok_s = median_of(a, "tokens_per_s", steady)
    alloc = max((r.get("mem_gib", 0) for r in a.values()), default=None)
    reserved = max((r.get("mem_reserved_gib", 0) for r in a.values()), default=None)
    peak = next((r.get("peak_tflops") for r in a.values() if "peak_tflops" in r), None)
    est_cmd = [sys.executable, "-m", "loopmoe.memory", c.plan.config, *c.plan.common, *c.plan.bf16(), "--world", "1"]
    if not c.plan.dry:
        import torch

        est_cmd += ["--device-gb", f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.1f}"]
    rc, est = c.run("memory estimate", est_cmd, 60)  # exit 1 = over the 80% budget: a finding, not a failure
    _, js = c.run("memory estimate (JSON)", est_cmd + ["--json"], 60)
    try:  # the estimate's allocated / reserved (recompute none) against the measured peaks
        stage = json.loads(js[js.index("[{"):])[0]
        e_alloc, e_res = stage["allocated"]["none"] / 2**30, stage["reserved"]["none"] / 2**30
        vs = (f"Estimator (GiB): allocated {e_alloc:.2f}, reserved {e_res:.2f} (the measured peaks above; its "
              f"total adds the CUDA context and NCCL buffers, which torch's counters do not see)"
              + ("" if c.plan.dry or alloc is None or reserved is None else
                 f"; measured / estimated: allocated {alloc / e_alloc:.2f}, reserved {reserved / e_res:.2f}") + ".")
    except (ValueError, KeyError, IndexError) as e:
        vs = f"Estimator JSON unreadable ({type(e).__name__})."
    if c.plan.dry:
        mfu_txt = "n/a (CPU)"
    else:
        mfu_txt = f"{100 * mfu:.1f}% of {peak:g} TFLOP/s (dense bf16)" if mfu is not None else "n/a"
    c.sections += ["## Step time, MFU and memory of A", "",
                   "| step time (s, median of steps 2-5) | tokens/s | MFU | peak allocated (GiB) | peak reserved (GiB) |",
                   "|---:|---:|---:|---:|---:|",
                   f"| {step_s if step_s is None else f'{step_s:.3f}'} | {tok_s if tok_s is None else f'{tok_s:,.0f}'} | "
                   f"{mfu_txt} | {gib(alloc, c.plan.dry)} | {gib(reserved, c.plan.dry)} |", "",
                   "Memory: torch.cuda.max_memory_allocated / max_memory_reserved over the run (n/a on the CPU).",
                   "", vs, "", f"Estimator report, same layout (exit {rc}; 1 = over the 80% budget):", "", "```",
                   est.strip()[-2500:], "```", ""]


def probe_cmd(plan: Plan, data: list[str], work: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "bench/gpu_probe.py", "--config", plan.config, "--out", os.path.join(work, "probe.json"), *plan.common,
            *plan.bf16(), *data, f"logging.run_dir={os.path.join(work, 'probe')}"]


def part_probe(c: Check, data: list[str]) -> None:
    out = os.path.join(c.work, "probe.json")
    rc, text = c.run("probes (host syncs, profiler, SDPA)", probe_cmd(c.plan, data, c.work), min(c.left(), 240))
    if not os.path.exists(out):
        c.skipped.append(f"probes: FAILED (exit {rc})")
        c.sections += ["## Probes failed", "", "```", text[-2500:], "```", ""]
        return
    with open(out) as f:
        res = json.load(f)
    c.ran.append("probes: host syncs per step, profiler table of one micro-batch, SDPA backends")
    hs = res.get("host_syncs", {})
    lines = ["## Host synchronisations per optimizer step", ""]
    if "step_error" in res:
        lines += ["The step failed:", "", "```", res["step_error"], "```"]
    elif hs.get("syncs") is None:
        lines.append(f"Not measured: {hs.get('why')}.")
    else:
        lines += [f"{hs['syncs']} synchronisations in one step (torch.cuda.set_sync_debug_mode('warn')), by the "
                  "first frame of this repository that caused them:", "",
                  *[f"- {where}: {n}" for where, n in hs.get("where", {}).items()]]
    lines += ["", "## SDPA backends for the preset's head layout", "",
              "| backend | runs | max abs error vs fp32 math | default pick |", "|---|---|---:|---|"]
    for r in res.get("sdpa", []):
        err = f"{r['max_abs_err']:.3g} ({r['dtype']})" if r["runs"] else r.get("why", "")
        lines.append(f"| {r['backend']} | {'yes' if r['runs'] else 'no'} | {err} | {'yes' if r.get('default') else ''} |")
    if "sdpa_error" in res:
        lines += ["", "```", res["sdpa_error"], "```"]
    if "profile_table" in res:
        lines += ["", "## Profiler: one micro-batch (forward + backward)", "", "```", res["profile_table"], "```"]
    c.sections += [*lines, ""]


def part_fp8(c: Check, a: dict[int, dict], data: list[str], backend: str) -> None:
    p = c.plan
    label = f"FP8 ({'torchao' if backend == 'torchao' else 'Transformer Engine'})"
    if backend == "te" and not has("transformer_engine"):
        c.skipped.append(f"{label}: transformer_engine is not importable here (its CUDA wheel is ~730 MB, over the "
                         "64 MiB that travels to the GPU machine); FP8 through TE was NOT run")
        return
    if backend == "torchao" and not has("torchao"):
        c.skipped.append(f"{label}: torchao is not importable (make gpu-wheels brings its wheel)")
        return
    if c.left() < 30:
        c.skipped.append(f"{label}: time budget spent")
        return
    run_dir = os.path.join(c.work, f"fp8_{backend}")
    rc, out = c.run(label, trainer_cmd(p, data, p.fp8_torchao() if backend == "torchao" else p.fp8_te(), run_dir),
                    c.left())
    f = metrics(run_dir)
    if rc != 0 or not f:
        c.skipped.append(f"{label}: FAILED (exit {rc})")
        c.sections += [f"## {label} failed", "", "```", out[-2500:], "```", ""]
        return
    c.ran.append(f"pretrain_loopmoe.py with {label}: 6 steps")
    steady = range(2, STEPS)
    sa, sf = median_of(a, "step_time", steady), median_of(f, "step_time", steady)
    la, lf = a.get(STEPS, {}).get("lm_loss"), f.get(STEPS, {}).get("lm_loss")
    speed = f"{sa / sf:.2f}x" if sa and sf else "n/a"
    gap = f"{lf - la:+.4f} ({(lf - la) / la:+.2%})" if la is not None and lf is not None else "n/a"
    c.sections += [f"## {label} against bf16", "",
                   "| | step time (s) | speed-up over bf16 | LM loss at step 6 | gap to bf16 |", "|---|---:|---:|---:|---:|",
                   f"| bf16 (A) | {sa if sa is None else f'{sa:.3f}'} | 1.00x | {loss_txt(la)} | |",
                   f"| {label} | {sf if sf is None else f'{sf:.3f}'} | {speed} | {loss_txt(lf)} | {gap} |", "",
                   "(the dry run's CPU times say nothing about FP8 speed)" if p.dry else "", ""]


def part_gpu_tests(c: Check) -> None:
    if c.args.skip_tests:
        c.skipped.append("GPU-marked tests (--skip-tests)")
        return
    if c.left() < 30:
        c.skipped.append("GPU-marked tests: time budget spent")
        return
    files = [f for f in GPU_TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", *files]
    if not has("pytest_timeout"):  # pyproject's addopts name --timeout
        cmd += ["-o", "addopts=-ra --strict-markers"]
    rc, out = c.run("GPU-marked tests", cmd, min(c.left(), 180))
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))
             or " passed" in ln or " failed" in ln or " skipped" in ln]
    c.ran.append(f"GPU-marked tests (exit {rc})")
    c.sections += ["## GPU-marked tests", "", "```", *(lines[-40:] or out.splitlines()[-30:]), "```", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="report (default docs/benchmarks/gpu.md; dry run: required)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same commands, no GPU figures")
    ap.add_argument("--print-commands", action="store_true", help="print the commands the check runs, run nothing")
    ap.add_argument("--budget-s", type=float, default=420, help="start no new part after this (default 420)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the GPU-marked tests")
    ap.add_argument("--skip-fp8", action="store_true", help="do not run the FP8 parts")
    ap.add_argument("--skip-probes", action="store_true", help="do not run bench/gpu_probe.py")
    ap.add_argument("--prepare-data", action="store_true", help="only build --data-dir (make gpu-wheels does)")
    ap.add_argument("--data-dir", default=os.path.join(ROOT, "wheels", "gpu_data"),
                    help="prepared tokenizer + .bin/.idx (default wheels/gpu_data; built when missing)")
    args = ap.parse_args()
    import torch

    dry = args.dry_run or args.print_commands or args.prepare_data  # no GPU needed for these
    if args.dry_run and not args.out:
        ap.error("--dry-run needs --out (a dry run never overwrites docs/benchmarks/gpu.md)")
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False): nothing measured. "
              "On a CPU machine use --dry-run or --print-commands.", file=sys.stderr)
        return 2
    plan = Plan(dry=args.dry_run)
    data_dir = args.data_dir if not args.dry_run else None
    if args.prepare_data:
        print(" ".join(prepare_data(data_dir, plan.data_docs, plan.data_vocab)))
        return 0
    if args.print_commands:  # what a real run launches, in order (paths relative to the repository)
        rel = os.path.relpath(data_dir, ROOT)
        data = [f"data.prefixes={rel}/docs_text_document", f"data.tokenizer_model={rel}/tok.model"]
        b = trainer_cmd(plan, data, plan.bf16(), "$WORK/bf16_B")
        for cmd in (trainer_cmd(plan, data, plan.bf16(), "$WORK/bf16_A"), b + [f"train.exit_interval={STOP_AT}"], b,
                    probe_cmd(plan, data, "$WORK"), trainer_cmd(plan, data, plan.fp8_torchao(), "$WORK/fp8_torchao"),
                    trainer_cmd(plan, data, plan.fp8_te(), "$WORK/fp8_te")):
            print(shlex.join(cmd).replace(sys.executable, "python"))
        return 0
    work = tempfile.mkdtemp(prefix="gpu_check_")
    c = Check(args, plan, work)
    data = prepare_data(data_dir or os.path.join(work, "data"), plan.data_docs, plan.data_vocab)
    gpu = "none (dry run on the CPU)" if dry else torch.cuda.get_device_name(0)
    a = part_trainer(c, data)
    if a:
        part_speed_memory(c, a, data)
    if args.skip_probes:
        c.skipped.append("probes (--skip-probes)")
    elif c.left() > 30:
        part_probe(c, data)
    else:
        c.skipped.append("probes: time budget spent")
    if args.skip_fp8:
        c.skipped.append("FP8 (--skip-fp8)")
    elif a:
        part_fp8(c, a, data, "torchao")
        part_fp8(c, a, data, "te")
    part_gpu_tests(c)

    env = {m: has(m) for m in ("megatron.core", "deepspeed", "transformer_engine", "torchao")}
    head = [f"# GPU check{' -- DRY RUN on the CPU: no GPU figures' if dry else ''}", "",
            f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: `python bench/gpu_check.py"
            f"{' --dry-run' if dry else ''}`. Device: {gpu}"
            + ("" if dry else f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
            + f"; torch {torch.__version__}" + ("" if dry else f", CUDA {torch.version.cuda}")
            + f"; Python {platform.python_version()}.",
            "Importable: " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in env.items()) + ".", ""]
    body = [*head, "## What ran", "", *[f"- {x}" for x in c.ran], "", "## What was skipped, and why", "",
            *([f"- {x}" for x in c.skipped] or ["- nothing"]), "", "## Commands", "", "```", *c.commands, "```", "",
            *c.sections, f"Total wall time {time.time() - c.t0:.0f} s.", ""]
    out_path = args.out or os.path.join(ROOT, "docs/benchmarks/gpu.md")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
        f.write("\n".join(body))
    os.replace(out_path + ".tmp", out_path)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
