"""Training step at the presets' REAL layer shapes (few layers, small vocabulary), side by side, as ratios.

    python bench/real_shapes.py [--tokens 1024] [--steps 2] [--repeats 2] [--shapes 3b,9b] [--profile]

Proxies: the LoopMoE-3B / -9B layer widths, heads, expert counts, expert width and top-k
(configs/loopmoe_3b.yaml, loopmoe_9b.yaml) with 1 prelude + 1 loop layer x 2 iterations + 1 coda,
vocabulary 4096, one sequence of ``--tokens`` tokens, fp32 on the CPU. Reported per shape:
  (a) CPU MFU: training FLOP/s by the project's convention (loopmoe/flops.py, 3 x forward) over this
      machine's dense fp32 GEMM rate, measured in the same process right before and after the timed
      steps (1024^3 matmuls), so that a shared machine's changing load hits both alike;
  (b) backward / forward time (forward = model + loss, backward = loss.backward());
  (c) tokens/s against Hugging Face MixtralForCausalLM of the same shapes and executed depth with its
      grouped-GEMM experts (``experts_implementation="grouped_mm"``); our contender for this row has
      no shared expert (Mixtral has none) so that both do the same expert work;
  (d) step time against the Vanilla-3B / -9B twin widths (configs/vanilla_*.yaml) at equal FLOPs: the
      twin's executed depth is scaled by its layer count (24 vs 32 executed, 30 vs 40), i.e. 3 layers
      against our 4, and its step time is divided by its FLOPs ratio.
Every contender runs in its own subprocess, interleaved (A B C ... A B C ...); medians over repeats.
On a shared machine the load changes between contenders, so (c) and (d) are also given load-normalised:
each contender's rate divided by the GEMM rate measured around its own steps. ``--profile`` adds a torch.profiler table of one LoopMoE-3B step.
Results: docs/benchmarks/real_shapes.md and .json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VOCAB = 4096
PROXY = ["model.n_prelude=1", "model.n_loop=1", "model.n_coda=1", "model.loop_iters=2"]
VANILLA_LAYERS = {"3b": 3, "9b": 3}  # 24/32 x 4 = 3; 30/40 x 4 = 3: the twin's depth at equal FLOPs


def overrides(seq: int) -> list[str]:
    return [f"model.vocab_size={VOCAB}", f"model.max_seq_len={max(seq, 512)}", f"data.seq_len={seq}",
            "model.linear_backend=torch"]


def build(spec: dict):
    """(model, loss_fn, train FLOPs per token by our convention) for one contender."""
    import torch

    from loopmoe import flops
    from loopmoe.config import load_config

    torch.manual_seed(0)
    cfg = load_config(os.path.join(ROOT, spec["config"]), overrides(spec["seq"]) + spec.get("overrides", [])).model
    fpt = flops.train_flops_per_token(cfg, spec["seq"])
    if spec["kind"] == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        hf = MixtralConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.expert_hidden,
                           num_hidden_layers=cfg.n_executed_layers, num_attention_heads=cfg.n_heads,
                           num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                           num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                           max_position_embeddings=cfg.max_seq_len, router_aux_loss_coef=0.01,
                           output_router_logits=True, tie_word_embeddings=False, attn_implementation="sdpa",
                           experts_implementation="grouped_mm")
        model = MixtralForCausalLM(hf)
        assert model.config._experts_implementation == "grouped_mm"
        # Mixtral's FLOPs per token: ours for the same shapes without IterAdaLN (it has none).
        cfg_plain = load_config(os.path.join(ROOT, spec["config"]), overrides(spec["seq"]) + spec.get("overrides", [])
                                + ["model.adaln=none"]).model
        fpt = flops.train_flops_per_token(cfg_plain, spec["seq"])

        def loss_fn(tokens):
            return model(input_ids=tokens, labels=tokens).loss
    else:
        from loopmoe.model import LoopMoEModel

        model = LoopMoEModel(cfg)

        def loss_fn(tokens):
            return model(tokens, labels=tokens).loss
    model.train()
    return model, loss_fn, fpt


def gemm_rate(n: int = 1024, reps: int = 3) -> float:
    """Dense fp32 GEMM FLOP/s now (median of ``reps`` n^3 matmuls after one warm-up)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


def run_contender(spec: dict) -> dict:
    """In a subprocess: build, warm up once, time forward and backward of ``steps`` steps."""
    import torch

    model, loss_fn, fpt = build(spec)
    tokens = torch.randint(0, VOCAB, (1, spec["seq"]), generator=torch.Generator().manual_seed(1))
    loss_fn(tokens[:, :256]).backward()  # warm-up (kernels, allocator) on a short slice: a full step is minutes
    model.zero_grad(set_to_none=True)
    fwd, bwd = [], []
    gemm_before = gemm_rate()
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = loss_fn(tokens)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    gemm_after = gemm_rate()
    out = {"fwd_s": statistics.median(fwd), "bwd_s": statistics.median(bwd), "train_flops_per_token": fpt,
           "params": sum(p.numel() for p in model.parameters()), "gemm_flops_per_s": (gemm_before + gemm_after) / 2,
           "gemm_before": gemm_before, "gemm_after": gemm_after}
    out["step_s"] = out["fwd_s"] + out["bwd_s"]
    out["tokens_per_s"] = spec["seq"] / out["step_s"]
    out["flops_per_s"] = fpt * spec["seq"] / out["step_s"]
    out["mfu"] = out["flops_per_s"] / out["gemm_flops_per_s"]
    if spec.get("profile"):
        out["profile"] = profile_step(model, loss_fn, tokens)
    return out


def profile_step(model, loss_fn, tokens) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_fn(tokens).backward()
    model.zero_grad(set_to_none=True)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    if out.returncode != 0:
        raise RuntimeError(f"contender {spec['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def contenders(shape: str, seq: int, steps: int) -> list[dict]:
    common = {"seq": seq, "steps": steps}
    loop = {**common, "name": f"LoopMoE-{shape.upper()} proxy", "kind": "loopmoe",
            "config": f"configs/loopmoe_{shape}.yaml", "overrides": PROXY, "role": "loopmoe"}
    noshared = {**loop, "name": f"LoopMoE-{shape.upper()} proxy, no shared expert",
                "overrides": PROXY + ["model.n_shared_experts=0"], "role": "loopmoe_noshared"}
    mixtral = {**noshared, "name": f"HF Mixtral, {shape.upper()} shapes (grouped_mm)", "kind": "mixtral",
               "role": "mixtral"}
    van = {**common, "name": f"Vanilla-{shape.upper()} twin ({VANILLA_LAYERS[shape]} layers)", "kind": "loopmoe",
           "config": f"configs/vanilla_{shape}.yaml", "role": "vanilla",
           "overrides": [f"model.n_prelude={VANILLA_LAYERS[shape]}"]}
    return [loop, noshared, mixtral, van]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (one sequence; default %(default)s)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per measurement (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved measurements per contender")
    ap.add_argument("--shapes", default="3b,9b", help="comma-separated: 3b, 9b")
    ap.add_argument("--profile", action="store_true", help="profile one LoopMoE-3B step (torch.profiler)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks/real_shapes.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_contender(json.loads(args.child))))
        return
    import torch

    load_before = os.getloadavg()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    specs = [c for s in shapes for c in contenders(s, args.tokens, args.steps)]
    runs: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    t_start = time.time()
    for rep in range(args.repeats):
        for spec in specs:
            spec = {**spec, "profile": args.profile and rep == 0 and spec["name"] == "LoopMoE-3B proxy"}
            print(f"[{rep + 1}/{args.repeats}] {spec['name']} ...", flush=True)
            runs[spec["name"]].append(measure(spec))
    load_after = os.getloadavg()
    med = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
           for name, rs in runs.items()}
    peak = statistics.median(r["gemm_flops_per_s"] for rs in runs.values() for r in rs)
    results = {"date": str(datetime.date.today()), "tokens": args.tokens, "steps": args.steps,
               "repeats": args.repeats, "gemm_fp32_flops_per_s": peak, "load_before": load_before,
               "load_after": load_after, "cores": os.cpu_count(), "torch": torch.__version__,
               "wall_s": time.time() - t_start, "runs": runs, "shapes": {}}
    for shape in shapes:
        c = {x["role"]: med[x["name"]] for x in contenders(shape, args.tokens, args.steps)}
        lo, ns, mx, va = c["loopmoe"], c["loopmoe_noshared"], c["mixtral"], c["vanilla"]
        flops_ratio = va["train_flops_per_token"] / lo["train_flops_per_token"]
        def norm(c):  # tokens/s per GEMM FLOP/s available to that contender
            return c["tokens_per_s"] / c["gemm_flops_per_s"]
        results["shapes"][shape] = {
            "mfu": lo["mfu"], "bwd_over_fwd": lo["bwd_s"] / lo["fwd_s"],
            "vs_mixtral_tokens_per_s": ns["tokens_per_s"] / mx["tokens_per_s"],
            "vs_mixtral_normalised": norm(ns) / norm(mx),
            "mixtral_mfu": mx["mfu"], "mixtral_bwd_over_fwd": mx["bwd_s"] / mx["fwd_s"],
            "vanilla_flops_ratio": flops_ratio,
            "vs_vanilla_step_time_equal_flops": lo["step_s"] / (va["step_s"] / flops_ratio),
            "vs_vanilla_normalised": (norm(va) * flops_ratio) / norm(lo),
            "vanilla_mfu": va["mfu"],
        }
    write(args, results, specs, med, peak, runs)


def write(args, results, specs, med, peak, runs) -> None:
    import torch

    md = ["# Training step at the real layer shapes (CPU, fp32)", "",
          f"Measured {results['date']} on {platform.machine()}, {results['cores']} CPU cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads. Command: `python bench/real_shapes.py "
          f"--tokens {args.tokens} --steps {args.steps} --repeats {args.repeats} --shapes {args.shapes}"
          f"{' --profile' if args.profile else ''}` ({results['wall_s'] / 60:.1f} min).",
          f"Machine load (1/5/15-min load average) before: {'/'.join(f'{x:.1f}' for x in results['load_before'])}, "
          f"after: {'/'.join(f'{x:.1f}' for x in results['load_after'])}"
          + (" -- **the machine was shared and busy: absolute figures are low and noisy; the ratios, from "
             "interleaved runs, are the meaningful part.**" if max(results['load_before']) > results['cores'] else "."),
          "", "Proxies: 1 prelude + 1 loop layer x 2 iterations + 1 coda (4 executed layers), vocabulary 4096, "
          f"one sequence of {args.tokens} tokens; the real d_model, heads, expert count, expert width and top-k. "
          f"Dense fp32 GEMM rate of this machine (1024^3 matmuls around each contender's steps; median over "
          f"all): **{peak / 1e9:.1f} GFLOP/s**; each contender's MFU uses its own.", "",
          "## Goals", "", "| shape | (a) CPU MFU (goal >= 40%) | (b) backward/forward (goal <= 2.5x) | "
          "(c) tokens/s vs HF Mixtral (goal >= 1.5x) | (d) step time vs Vanilla twin at equal FLOPs (goal <= 1.05x) |",
          "|---|---:|---:|---:|---:|"]
    for shape, r in results["shapes"].items():
        md.append(f"| {shape.upper()} | {100 * r['mfu']:.1f}% | {r['bwd_over_fwd']:.2f}x | "
                  f"{r['vs_mixtral_tokens_per_s']:.2f}x (load-normalised {r['vs_mixtral_normalised']:.2f}x) | "
                  f"{r['vs_vanilla_step_time_equal_flops']:.2f}x (load-normalised {r['vs_vanilla_normalised']:.2f}x) |")
    md += ["", "For reference: HF Mixtral's own MFU / backward:forward, and the Vanilla twin's MFU:", ""]
    for shape, r in results["shapes"].items():
        md.append(f"- {shape.upper()}: Mixtral {100 * r['mixtral_mfu']:.1f}% MFU, backward/forward "
                  f"{r['mixtral_bwd_over_fwd']:.2f}x; Vanilla twin {100 * r['vanilla_mfu']:.1f}% MFU "
                  f"(its FLOPs/token are {r['vanilla_flops_ratio']:.3f}x ours; its step time is scaled by that).")
    md += ["", "## Contenders (medians of the interleaved repeats)", "",
           "| contender | parameters | train GFLOP/token | forward (s) | backward (s) | tokens/s | GEMM GFLOP/s "
           "(before/after) | MFU |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for spec in specs:
        m = med[spec["name"]]
        spread = [r["tokens_per_s"] for r in runs[spec["name"]]]
        md.append(f"| {spec['name']} | {m['params'] / 1e6:.1f} M | {m['train_flops_per_token'] / 1e9:.3f} | "
                  f"{m['fwd_s']:.2f} | {m['bwd_s']:.2f} | {m['tokens_per_s']:.1f} [{min(spread):.1f}-{max(spread):.1f}] | "
                  f"{m['gemm_before'] / 1e9:.1f}/{m['gemm_after'] / 1e9:.1f} | {100 * m['mfu']:.1f}% |")
    prof = next((r["profile"] for r in runs.get("LoopMoE-3B proxy", []) if "profile" in r), None)
    if prof:
        md += ["", "## Where the time goes: one LoopMoE-3B proxy step (torch.profiler, self CPU time)", "",
               "```", prof.rstrip(), "```"]
    md += ["", "See docs/benchmarks/real_shapes_notes.md for what stands in the way of the goals.", ""]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    for path, text in ((args.out, "\n".join(md)), (os.path.splitext(args.out)[0] + ".json",
                                                     json.dumps(results, indent=1, default=str))):
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)
    print("\n".join(md[:20]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
