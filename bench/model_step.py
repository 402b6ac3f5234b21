"""Forward+backward throughput and peak memory of the model, side by side, as ratios.

    python bench/model_step.py [--steps 20] [--repeats 3] [--out docs/benchmarks/model.md]

Three comparisons, each run in one invocation with the contenders interleaved (A B A B ...) so that a
busy machine slows both alike:
  1. a small LoopMoE against Hugging Face ``MixtralForCausalLM`` of the same width, executed depth,
     experts, expert width and top-k (what a user would pick instead); the LoopMoE here has no shared
     expert so that both models do the same expert work;
  2. the tiny LoopMoE against its matched Vanilla MoE (configs/tiny_loopmoe.yaml, configs/tiny_vanilla.yaml);
  3. our index dispatch against DeepSpeed's one-hot einsum gate (model.dispatch=einsum), same model.
Each contender runs in its own subprocess: peak memory is that process's peak RSS growth over the
state after building the model (activations + gradients), which on the CPU is what runs out first.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(spec: dict):
    """(model, step_fn) for one contender spec."""
    import torch

    from loopmoe.config import load_config

    torch.manual_seed(0)
    if spec["kind"] == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        m = spec["model"]
        hf = MixtralConfig(vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["expert_hidden"],
                           num_hidden_layers=m["layers"], num_attention_heads=m["n_heads"],
                           num_key_value_heads=m["n_kv_heads"], head_dim=m["head_dim"],
                           num_local_experts=m["n_experts"], num_experts_per_tok=m["top_k"],
                           max_position_embeddings=4096, router_aux_loss_coef=0.01, output_router_logits=True,
                           tie_word_embeddings=False, attn_implementation="sdpa")
        model = MixtralForCausalLM(hf)

        def loss_fn(tokens):
            return model(input_ids=tokens, labels=tokens).loss
    else:
        cfg = load_config(os.path.join(ROOT, spec["config"]), spec.get("overrides", []))
        cfg.model.linear_backend = "torch"  # one process: the megatron TP layers add nothing at TP=1
        from loopmoe.model import LoopMoEModel

        model = LoopMoEModel(cfg.model)

        def loss_fn(tokens):
            return model(tokens, labels=tokens).loss
    model.train()
    return model, loss_fn


def run_contender(spec: dict) -> dict:
    """Runs in a subprocess: build, warm up, time fwd+bwd steps."""
    import torch

    model, loss_fn = build(spec)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)
    base = _rss_mib()
    for _ in range(2):  # warm-up: allocator, kernels
        loss_fn(tokens).backward()
        model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        loss_fn(tokens).backward()
        model.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": spec["steps"] * spec["batch"] * spec["seq"] / dt, "peak_mib": _peak_rss_mib() - base,
            "params": n_params}


def measure(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"contender {spec['name']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(a: dict, b: dict, repeats: int) -> tuple[dict, dict]:
    """Interleave a and b ``repeats`` times; median tokens/s, max peak memory."""
    runs = {a["name"]: [], b["name"]: []}
    for _ in range(repeats):
        for spec in (a, b):
            runs[spec["name"]].append(measure(spec))
    def summary(rs):
        return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "spread": (min(r["tokens_per_s"] for r in rs), max(r["tokens_per_s"] for r in rs)),
                "peak_mib": max(r["peak_mib"] for r in rs), "params": rs[0]["params"]}
    return summary(runs[a["name"]]), summary(runs[b["name"]])


SMALL = dict(vocab_size=4096, d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, n_experts=8, expert_hidden=256,
             top_k=2)


def scenarios(steps: int) -> list[tuple[str, dict, dict]]:
    common = {"vocab": SMALL["vocab_size"], "batch": 8, "seq": 256, "steps": steps}
    loop_over = [f"model.{k}={v}" for k, v in SMALL.items()] + [
        "model.n_prelude=1", "model.n_loop=2", "model.n_coda=1", "model.loop_iters=2", "model.n_shared_experts=0"]
    loopmoe = {**common, "name": "LoopMoE (ours)", "kind": "loopmoe", "config": "configs/tiny_loopmoe.yaml",
               "overrides": loop_over}
    mixtral = {**common, "name": "HF Mixtral", "kind": "mixtral",
               "model": {**SMALL, "layers": 6}}  # executed depth of 1 + 2x2 + 1
    tiny_common = {**common, "seq": 128}
    loop_tiny = {**tiny_common, "name": "tiny LoopMoE", "kind": "loopmoe", "config": "configs/tiny_loopmoe.yaml"}
    van_tiny = {**tiny_common, "name": "tiny Vanilla MoE", "kind": "loopmoe", "config": "configs/tiny_vanilla.yaml"}
    index = {**loopmoe, "name": "index dispatch (ours)"}
    einsum = {**loopmoe, "name": "DeepSpeed einsum gate", "overrides": loop_over + ["model.dispatch=einsum"]}
    return [("LoopMoE vs Hugging Face Mixtral (same width, executed depth, experts, top-k)", loopmoe, mixtral),
            ("LoopMoE vs its matched Vanilla MoE (capacity-balanced twins)", loop_tiny, van_tiny),
            ("Index dispatch vs DeepSpeed's one-hot einsum gate (same LoopMoE)", index, einsum)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed fwd+bwd steps per measurement (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurements per contender (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks/model.md"), help="markdown report")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_contender(json.loads(args.child))))
        return
    import torch

    lines = ["# Model step benchmark (forward + backward, CPU)", "",
             f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, fp32, {torch.get_num_threads()} threads. Command: "
             f"`python bench/model_step.py --steps {args.steps} --repeats {args.repeats}`.",
             "Tokens/s: median of the interleaved repeats (range in brackets). Peak memory: growth of the "
             "process's peak RSS over the built model (activations + gradients).", ""]
    for title, a, b in scenarios(args.steps):
        print(f"== {title}", flush=True)
        ra, rb = compare(a, b, args.repeats)
        lines += [f"## {title}", "", f"batch {a['batch']} x {a['seq']} tokens", "",
                  "| model | parameters | tokens/s | peak memory (MiB) |", "|---|---:|---:|---:|"]
        for spec, r in ((a, ra), (b, rb)):
            lines.append(f"| {spec['name']} | {r['params'] / 1e6:.2f} M | {r['tokens_per_s']:,.0f} "
                         f"[{r['spread'][0]:,.0f}–{r['spread'][1]:,.0f}] | {r['peak_mib']:,.0f} |")
        speed = ra["tokens_per_s"] / rb["tokens_per_s"]
        mem = ra["peak_mib"] / max(rb["peak_mib"], 1e-9)
        lines += ["", f"**Ratio {a['name']} / {b['name']}: {speed:.2f}x tokens/s, {mem:.2f}x peak memory.**", ""]
        print(lines[-2], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
