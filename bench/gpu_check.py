"""The prepared GPU check (`make gpu-check`, via scripts/gpu_check.sh): one run, under 8 minutes on one
H100/H200, that says plainly what it ran and what it skipped. Results: docs/benchmarks/gpu.md.

    python bench/gpu_check.py [--out docs/benchmarks/gpu.md] [--budget-s 420]
    python bench/gpu_check.py --dry-run --out /tmp/gpu.md     # CPU: the plumbing only, tiny shapes

1. the GPU-marked tests (pytest -m gpu) of the files that have them;
2. bf16 training steps (forward + backward; the optimizer step is not timed) of the LoopMoE-3B layer-shape
   proxy (1 + 1x2 + 1 layers, the real 64,000 vocabulary, micro-batch 2 x 4096 tokens) and of a ~1B
   LoopMoE (the 3B widths, 2 + 3x2 + 2 layers), with MFU against the chip's dense bf16 peak (H100/H200
   SXM: 989 TFLOP/s) by the project's FLOP convention (loopmoe/flops.py);
3. FP8 through Transformer Engine (linear_backend=te, experts as TE GroupedLinear) when it is importable,
   else one line why not;
4. peak memory (torch.cuda.max_memory_allocated) next to the estimate of ``python -m loopmoe.memory``
   where that module exists.
``--dry-run`` runs the same code on the CPU at tiny shapes and writes a report that says so: it never
produces a GPU figure.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12}  # dense, SXM
GPU_TEST_FILES = ["tests/test_grouped_experts.py", "tests/test_host_sync.py", "tests/test_model.py",
                  "tests/test_reshard.py"]
PROXY_3B = ["model.n_prelude=1", "model.n_loop=1", "model.n_coda=1", "model.loop_iters=2"]
LOOPMOE_1B = ["model.n_prelude=2", "model.n_loop=3", "model.n_coda=2", "model.loop_iters=2"]
TINY = ["model.vocab_size=512"]


class Report:
    def __init__(self):
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.sections: list[str] = []

    def say(self, line: str) -> None:
        print(line, flush=True)


def has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def peak_flops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def run_gpu_tests(rep: Report, timeout: int) -> None:
    files = [f for f in GPU_TEST_FILES if os.path.exists(os.path.join(ROOT, f))]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", *files]
    if not has("pytest_timeout"):  # pyproject's addopts name --timeout
        cmd += ["-o", "addopts=-ra --strict-markers"]
    rep.say("== GPU-marked tests: " + " ".join(cmd[3:]))
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL"))
             or " passed" in ln or " failed" in ln or " skipped" in ln or " error" in ln]
    rep.ran.append(f"GPU-marked tests ({time.time() - t0:.0f} s, exit {rc})")
    rep.sections += ["## GPU-marked tests", "", f"`{' '.join(cmd[1:])}` -> exit {rc}", "", "```",
                     *(lines[-40:] or out.splitlines()[-30:]), "```", ""]


def train_steps(name: str, config: str, overrides: list[str], batch: int, seq: int, steps: int, device: str,
                backend: str = "torch", fp8: bool = False) -> dict:
    """bf16 forward+backward steps; returns timings, FLOPs, peak memory."""
    import contextlib

    import torch

    from loopmoe import flops
    from loopmoe.config import load_config
    from loopmoe.model import LoopMoEModel

    cfg = load_config(os.path.join(ROOT, config), [*overrides, f"data.seq_len={seq}",
                                                   f"model.linear_backend={backend}"]).model
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = LoopMoEModel(cfg).to(torch.bfloat16).train()
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    n_params = sum(p.numel() for p in model.parameters())
    ctx = contextlib.nullcontext()
    if fp8:
        import transformer_engine.pytorch as te

        ctx = te.fp8_autocast(enabled=True)

    def step():
        with ctx:
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        return loss

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    loss = step()  # warm-up: kernels, allocator, cuBLAS handles
    model.zero_grad(set_to_none=False)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    fpt = flops.train_flops_per_token(cfg, seq)
    out = {"name": name, "config": config, "overrides": overrides, "params": n_params, "tokens": batch * seq,
           "step_s": dt, "tokens_per_s": batch * seq / dt, "flops_per_s": fpt * batch * seq / dt,
           "loss": float(loss.detach()), "peak_mem_gib": None}
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    return out


def memory_estimate(config: str, overrides: list[str], batch: int, seq: int) -> str | None:
    """Output of ``python -m loopmoe.memory`` when the module exists (another part of the project)."""
    if not has("loopmoe.memory"):
        return None
    cmd = [sys.executable, "-m", "loopmoe.memory", config, *overrides, f"data.seq_len={seq}",
           f"train.micro_batch={batch}", "parallel.ep=1", "parallel.tp=1", "parallel.pp=1"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    return f"$ {' '.join(cmd[1:])}  (exit {res.returncode})\n" + (res.stdout + res.stderr).strip()[-2500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="report (default docs/benchmarks/gpu.md; dry run: required)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: test the plumbing, no GPU figures")
    ap.add_argument("--budget-s", type=float, default=420, help="stop starting new parts after this (default 420)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the GPU-marked tests")
    args = ap.parse_args()
    import torch

    t_start = time.time()
    rep = Report()
    dry = args.dry_run
    if dry and not args.out:
        ap.error("--dry-run needs --out (a dry run never overwrites docs/benchmarks/gpu.md)")
    out_path = args.out or os.path.join(ROOT, "docs/benchmarks/gpu.md")
    if not dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False): nothing measured. "
              "On a CPU machine use --dry-run.", file=sys.stderr)
        sys.exit(2)
    device = "cpu" if dry else "cuda"
    gpu = "none (dry run on the CPU)" if dry else torch.cuda.get_device_name(0)
    peak = None if dry else peak_flops(gpu)
    env = {m: has(m) for m in ("megatron.core", "deepspeed", "transformer_engine")}
    head = [f"# GPU check{' -- DRY RUN on the CPU: no GPU figures' if dry else ''}", "",
            f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: `python bench/gpu_check.py"
            f"{' --dry-run' if dry else ''}`. Device: {gpu}"
            + ("" if dry else f", {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
            + f"; torch {torch.__version__}"
            + ("" if dry else f", CUDA {torch.version.cuda}") + f"; Python {platform.python_version()}.",
            "Importable: " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in env.items()) + ".",
            f"bf16 dense peak used for MFU: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'n/a'}.", ""]

    def time_left() -> bool:
        return time.time() - t_start < args.budget_s

    # 1. GPU-marked tests
    if args.skip_tests:
        rep.skipped.append("GPU-marked tests (--skip-tests)")
    else:
        run_gpu_tests(rep, timeout=60 if dry else 180)

    # 2. bf16 training steps
    runs = []
    shape = dict(batch=1, seq=64, steps=1) if dry else dict(batch=2, seq=4096, steps=3)
    cases = [("LoopMoE-3B layer-shape proxy (1+1x2+1 layers)", "configs/loopmoe_3b.yaml", PROXY_3B),
             ("LoopMoE ~1B (3B widths, 2+3x2+2 layers)", "configs/loopmoe_3b.yaml", LOOPMOE_1B)]
    if dry:
        cases = [(n + " [tiny stand-in: tiny_loopmoe]", "configs/tiny_loopmoe.yaml", TINY) for n, _, _ in cases]
    for name, config, ov in cases:
        if not time_left():
            rep.skipped.append(f"bf16 steps of {name}: time budget spent")
            continue
        rep.say(f"== bf16 steps: {name}")
        try:
            r = train_steps(name, config, ov, device=device, **shape)
            r["memory_estimate"] = memory_estimate(config, ov, shape["batch"], shape["seq"])
            runs.append(r)
            rep.ran.append(f"bf16 training steps: {name}")
        except Exception as e:  # report and go on: the other parts still say something
            rep.skipped.append(f"bf16 steps of {name}: FAILED ({type(e).__name__}: {str(e)[:300]})")

    # 3. FP8 through Transformer Engine
    if dry:
        rep.skipped.append("FP8 (Transformer Engine): dry run")
    elif not env["transformer_engine"]:
        rep.skipped.append("FP8 (Transformer Engine): transformer_engine is not importable here (not installed; "
                           "its CUDA wheel is ~730 MB and is not among the wheels brought along). "
                           "Install `pip install .[fp8]` on the GPU machine to run it.")
    elif not env["megatron.core"]:
        rep.skipped.append("FP8 (Transformer Engine): megatron.core missing (TE's block linears use its RNG tracker)")
    elif not time_left():
        rep.skipped.append("FP8 (Transformer Engine): time budget spent")
    else:
        try:
            import torch.distributed as dist
            from megatron.core import parallel_state

            if not dist.is_initialized():
                dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29571", rank=0, world_size=1)
            if not parallel_state.model_parallel_is_initialized():
                parallel_state.initialize_model_parallel(1, 1)
            name, config, ov = cases[0]
            r = train_steps(name + ", FP8 (TE, experts as GroupedLinear)", config, ov, device=device,
                            backend="te", fp8=True, **shape)
            r["memory_estimate"] = None
            runs.append(r)
            rep.ran.append("FP8 training steps through Transformer Engine")
        except Exception as e:
            rep.skipped.append(f"FP8 (Transformer Engine): FAILED ({type(e).__name__}: {str(e)[:300]})")

    if runs:
        rep.sections += ["## bf16 / FP8 training steps (forward + backward)", "",
                         f"micro-batch {shape['batch']} x {shape['seq']} tokens, {shape['steps']} timed steps after "
                         "one warm-up; linear_backend=torch unless FP8. MFU: training FLOPs by loopmoe/flops.py "
                         "(3 x forward) per second over the dense bf16 peak.", "",
                         "| run | parameters | step (s) | tokens/s | TFLOP/s | MFU | peak memory (GiB) |",
                         "|---|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            mfu = f"{100 * r['flops_per_s'] / peak:.1f}%" if peak else "n/a"
            mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a (CPU)"
            rep.sections.append(f"| {r['name']} | {r['params'] / 1e6:.0f} M | {r['step_s']:.3f} | "
                                f"{r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e12:.2f} | {mfu} | {mem} |")
        rep.sections.append("")
        rep.sections += ["## Peak memory against the estimator", ""]
        for r in runs:
            if r["memory_estimate"] is None:
                continue
            rep.sections += [f"{r['name']}: measured peak "
                             + (f"{r['peak_mem_gib']:.2f} GiB (parameters + gradients + activations; no optimizer "
                                "state: the timed steps run no optimizer)" if r["peak_mem_gib"] is not None else
                                "n/a on the CPU") + "; estimator:", "", "```", r["memory_estimate"], "```", ""]
        if all(r["memory_estimate"] is None for r in runs):
            msg = ("peak memory vs estimator: loopmoe.memory is not in this tree" if not has("loopmoe.memory")
                   else "peak memory vs estimator: not run")
            rep.skipped.append(msg)

    body = head + ["## What ran", "", *[f"- {x}" for x in rep.ran], "", "## What was skipped, and why", "",
                   *([f"- {x}" for x in rep.skipped] or ["- nothing"]), "", *rep.sections,
                   f"Total wall time {time.time() - t_start:.0f} s.", ""]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path + ".tmp", "w") as f:
        f.write("\n".join(body))
    os.replace(out_path + ".tmp", out_path)
    print("\n".join(body[:12] + ["..."]))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
