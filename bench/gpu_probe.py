"""In-process probes of the training step for the GPU check (bench/gpu_check.py runs this under torchrun,
one process): the step ``pretrain_loopmoe.py`` runs (same config, model build, ``parallelize``, DeepSpeed
engine, ``make_step``), on synthetic tokens, then

1. host synchronisations per optimizer step: ``torch.cuda.set_sync_debug_mode("warn")`` over one whole
   step after two warm-up steps; every warning is counted with the first frame of ours that caused it;
2. a profiler table of one micro-batch (forward + backward), top kernels by device time;
3. the SDPA backends for the preset's head layout (9 query / 3 KV heads, head_dim 128): which ones run,
   which one the default dispatch picks (by kernel name), and each one's error against the math backend
   computed in fp32.

    torchrun --standalone --nproc-per-node 1 bench/gpu_probe.py --config configs/loopmoe_3b.yaml \
        --out probe.json [section.key=value ...]

On the CPU (the GPU check's dry run) the same code runs at tiny shapes: the sync count is then "n/a (CPU)"
and the profiler table has CPU times only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from loopmoe.config import load_config  # noqa: E402


def synthetic_batches(vocab: int, micro_batch: int, seq: int, device: str):
    """Endless micro-batches of random tokens (the step's cost does not depend on the text)."""
    g = torch.Generator().manual_seed(0)
    while True:
        t = torch.randint(0, vocab, (micro_batch, seq + 1), generator=g)
        yield {"tokens": t[:, :-1].to(device), "labels": t[:, 1:].to(device),
               "loss_mask": torch.ones(micro_batch, seq, device=device)}


def our_frame(stack_summary) -> str:
    """The innermost frame under this repository (not torch/deepspeed/megatron): who asked for the sync."""
    for fr in reversed(stack_summary):
        if fr.filename.startswith(ROOT) and "/.venv/" not in fr.filename and "site-packages" not in fr.filename \
                and not fr.filename.endswith("gpu_probe.py"):
            return f"{os.path.relpath(fr.filename, ROOT)}:{fr.lineno} ({fr.name})"
    return "library code"


def count_host_syncs(step, device: str) -> dict:
    """One optimizer step under CUDA's sync debug mode; returns the count and where they came from."""
    if device != "cuda":
        return {"syncs": None, "why": "n/a on the CPU (no device to wait for)"}
    import traceback as tb

    where: dict[str, int] = {}
    orig_showwarning = warnings.showwarning
    n = 0

    def record(message, category, filename, lineno, file=None, line=None):
        nonlocal n
        if "synchroniz" in str(message):
            n += 1
            key = our_frame(tb.extract_stack())
            where[key] = where.get(key, 0) + 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = orig_showwarning
    return {"syncs": n, "where": dict(sorted(where.items(), key=lambda kv: -kv[1]))}


def profile_micro_batch(engine, batch, layout, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    from loopmoe.parallel.parallelize import backward_loss

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        out = engine(batch["tokens"], labels=batch["labels"], loss_mask=batch["loss_mask"])
        engine.backward(backward_loss(out, layout))
        if device == "cuda":
            torch.cuda.synchronize()
    engine.zero_grad() if hasattr(engine, "zero_grad") else None
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)


def sdpa_backends(n_heads: int, n_kv: int, head_dim: int, seq: int, batch: int, device: str) -> list[dict]:
    """Each SDPA backend on the preset's layout (causal, GQA): runs or not, error against fp32 math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, n_heads, seq, head_dim, generator=g).to(device, dt)
    k = torch.randn(batch, n_kv, seq, head_dim, generator=g).to(device, dt)
    v = torch.randn(batch, n_kv, seq, head_dim, generator=g).to(device, dt)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    rows = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name)
        try:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            rows.append({"backend": name, "runs": True, "max_abs_err": float((out.float() - ref).abs().max()),
                         "dtype": str(dt).replace("torch.", "")})
        except RuntimeError as e:
            rows.append({"backend": name, "runs": False, "why": str(e).splitlines()[0][:200]})
    # which one the default dispatch picks: the kernel names of one default call
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    names = " ".join(e.key.lower() for e in prof.key_averages())
    picked = next((b for b, pat in (("FLASH_ATTENTION", "flash"), ("CUDNN_ATTENTION", "cudnn"),
                                    ("EFFICIENT_ATTENTION", "efficient"), ("MATH", "_scaled_dot_product_attention_math"))
                   if pat in names), "unknown")
    for r in rows:
        r["default"] = r["backend"] == picked
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True, help="JSON results")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from loopmoe.quiet import quiet_start

    quiet_start(report=False, device_line=False)
    from loopmoe.parallel.distributed import init_distributed, shutdown
    from loopmoe.parallel.layout import validate_layout
    from loopmoe.parallel.parallelize import parallelize
    from loopmoe.train import setup
    from loopmoe.train.engine import build_engine, make_step

    cfg = load_config(args.config, args.overrides)
    layout = validate_layout(cfg, 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    try:
        p = cfg.parallel
        init_distributed(p.tp, p.pp, p.backend, p.timeout_minutes, ep=p.ep)
        setup.seed_everything(cfg.train.seed)
        module = parallelize(setup.build_model(cfg, layout), cfg, layout)
        engine, _, _ = build_engine(module, cfg, layout)
        batches = synthetic_batches(cfg.model.vocab_size, cfg.train.micro_batch, cfg.data.seq_len, device)
        step_fn = make_step(engine, cfg, layout)
        state = {"step": 0}

        def step():
            state["step"] += 1
            return step_fn(batches, state["step"])

        for _ in range(2):  # warm-up: allocator, cuBLAS handles, DeepSpeed's buffers
            step()
        t0 = time.perf_counter()
        res["host_syncs"] = count_host_syncs(step, device)
        res["host_syncs"]["step_s"] = time.perf_counter() - t0
        res["profile_table"] = profile_micro_batch(engine, next(batches), layout, device)
    except Exception:  # report what broke; the SDPA probe below needs none of it
        res["step_error"] = traceback.format_exc()[-3000:]
    m = cfg.model
    seq = cfg.data.seq_len
    try:
        res["sdpa"] = sdpa_backends(m.n_heads, m.n_kv_heads, m.head_dim, seq, cfg.train.micro_batch, device)
    except Exception:
        res["sdpa_error"] = traceback.format_exc()[-2000:]
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.out)
    shutdown()
    return 1 if "step_error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
