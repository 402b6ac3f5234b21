"""Early exits that save time, measured: KV-cached decode tokens/s of the full model, ``exit_after=k``
(every token stops after loop iteration k < R) and the per-token entropy exit (loopmoe/exit_decoding.py,
both KV policies), side by side in ONE process, with the FLOPs each saves and the quality each costs.

    python bench/exit_speed.py --checkpoint runs/compare/s1000/loopmoe_seed1/checkpoints \\
        --data data/demo/python_docs_text_document --tokenizer data/demo/tokenizer.model
    python bench/exit_speed.py --config configs/tiny_loopmoe.yaml      # a random model (smoke test, no data)

Speed. Greedy decoding, batch size 1, with the KV cache: for each held-out prompt (``--prompt-len``
tokens) the prompt is prefilled (not timed), then ``--new-tokens`` decode steps are timed. Every repeat
runs every contender on every prompt, the contenders' order rotated per repeat (interleaved: a busy
machine slows all alike). speed-up = the full model's time / the contender's, per repeat, median over
the repeats. The full model and ``exit_after=k`` are ``model(tok, cache=..., exit_after=k)`` (what
loopmoe/generate.py runs); the entropy exits are ``ExitDecoder.step``.

FLOPs. FLOPs saved per token by the flops.py convention (loopmoe/analysis/exit_plan.py cost table,
attention at the mean decode context length), from the exit fractions measured in the timed decode; the
read-out (coda + head) at every boundary a token passes is paid, and "propagate" pays the skipped loop
layers' K/V projections. FLOP-predicted speed-up = 1 / (1 - saved). The verdict: measured speed-up
within 10% of the FLOP-predicted one (|measured / predicted - 1| <= 0.10).

Quality. Teacher-forced sequential decoding of ``--eval-seqs`` held-out sequences (every position
through the same exit policy and cache, so the KV effects are in): loss, perplexity and the fraction of
tokens stopping after each iteration. Thresholds (nats): 0 (read-outs paid, nobody exits), quantiles of
the first boundary's read-out entropy on the held-out text, and inf (everyone exits at the first boundary).

Writes ``--out`` (default docs/benchmarks/exit_speed.md) and the .json beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEMO_DATA = "/work/main/data/demo/python_docs_text_document"
DEMO_TOK = "/work/main/data/demo/tokenizer.model"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def contenders(R: int, thresholds: list[float], policies: list[str]) -> list[dict]:
    out = [{"name": "full", "exit_after": None, "threshold": None, "policy": None}]
    out += [{"name": f"exit_after={k}", "exit_after": k, "threshold": None, "policy": None} for k in range(1, R)]
    out += [{"name": f"entropy<={_thr(t)} {p}", "exit_after": None, "threshold": t, "policy": p}
            for p in policies for t in thresholds]
    return out


def _thr(t: float) -> str:
    return "inf" if math.isinf(t) else f"{t:.3g}"


def decode_once(model, prompt, n_new: int, c: dict):
    """Prefill (untimed), then ``n_new`` greedy decode steps timed -> (wall s, process CPU s, loop
    iterations per step)."""
    import torch

    from loopmoe.exit_decoding import ExitDecoder
    from loopmoe.model.attention import KVCache

    R = model.n_iters
    with torch.no_grad():
        if c["threshold"] is None:
            cache, k = KVCache(), c["exit_after"]
            logits = model(prompt, cache=cache, exit_after=k).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)  # [1, 1]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n_new):
                nxt = model(nxt, cache=cache, exit_after=k).logits[:, -1].argmax(-1, keepdim=True)
            return time.perf_counter() - t0, time.process_time() - c0, [k or R] * n_new
        dec = ExitDecoder(model, c["threshold"], c["policy"])
        nxt = dec.prefill(prompt).argmax(-1, keepdim=True)
        ks = []
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_new):
            logits, k = dec.step(nxt)
            nxt = logits.argmax(-1, keepdim=True)
            ks.append(k)
        return time.perf_counter() - t0, time.process_time() - c0, ks


def component_times(model, ctx: int, reps: int = 200) -> dict:
    """CPU seconds per decode step (batch 1, one new position at context ``ctx``) of one loop block, one coda
    block, the final norm + LM head, and the entropy: where a decode step's time goes."""
    import torch

    from loopmoe.model.attention import LayerKV
    from loopmoe.model.core import entropy

    rope = (model.rope_cos, model.rope_sin)
    d = model.cfg.d_model
    torch.manual_seed(0)
    h = torch.randn(1, 1, d)
    e_k = model.iter_embed(0) if model.iter_embed is not None else None

    def with_past(blk, e=None):
        kv = LayerKV()
        with torch.no_grad():
            blk(torch.randn(1, ctx, d), rope, e, None, kv)

        def f():
            kv2 = LayerKV()
            kv2.k, kv2.v = kv.k, kv.v
            blk(h, rope, e, None, kv2)
        return f

    def kv_only():  # ExitDecoder._fill_skipped, "propagate", for one loop layer
        dec._fill_skipped(h, 1)
        for st in model.schedule.loop_steps(1):  # keep the context length fixed
            kv = dec.cache.layer(st.layer, 1)
            kv.k, kv.v = kv.k[:, :, :ctx], kv.v[:, :, :ctx]

    from loopmoe.exit_decoding import ExitDecoder

    dec = ExitDecoder(model, 0.0, "propagate")
    with torch.no_grad():
        dec.prefill(torch.zeros(1, ctx, dtype=torch.long))

    fns = {"loop block": with_past(model.loop[0], e_k) if len(model.loop) else None,
           "coda block": with_past(model.coda[0]) if len(model.coda) else None,
           "norm + head": lambda: model.head(model.norm(h)),
           "entropy": lambda: float(entropy(model.head(model.norm(h)))), "kv all": kv_only}
    out = {}
    with torch.no_grad():
        for name, f in fns.items():
            if f is None:
                continue
            for _ in range(10):
                f()
            ts = []
            for _ in range(reps):  # CPU time, as the decode timing (a shared machine)
                t = time.process_time()
                f()
                ts.append(time.process_time() - t)
            out[name] = statistics.median(ts)
    out["entropy"] = max(out["entropy"] - out["norm + head"], 0.0)  # the entropy alone
    out["propagated K/V"] = out.pop("kv all") / max(model.cfg.n_loop * (model.n_iters - 1), 1)
    return out


def _fixed(c: dict, R: int) -> int | None:
    """The iterations every token runs (full model: R), or None for the per-token policy."""
    return None if c["threshold"] is not None else (c["exit_after"] or R)


def time_model(cfg, R: int, frac: list[float], c: dict, comp: dict) -> float:
    """Seconds per decode step predicted from the measured per-call times (component_times) and the exit
    fractions: executed blocks, coda + head passes (read-outs and the final one), entropies, propagated K/V."""
    K, C = cfg.n_loop, cfg.n_coda
    if c["threshold"] is None:
        k = c["exit_after"] or R
        loop, passes, ents, kvs = k * K, 1.0, 0.0, 0.0
    else:
        loop = sum(f * (k + 1) * K for k, f in enumerate(frac))
        passes = sum(f * (k + 1) for k, f in enumerate(frac))  # a read-out per boundary passed, or the final
        ents = sum(f * min(k + 1, R - 1) for k, f in enumerate(frac))
        kvs = sum(f * (R - 1 - k) * K for k, f in enumerate(frac)) if c["policy"] == "propagate" else 0.0
    return (cfg.n_prelude * comp.get("coda block", comp.get("loop block", 0.0)) + loop * comp.get("loop block", 0.0)
            + passes * (C * comp.get("coda block", 0.0) + comp["norm + head"]) + ents * comp["entropy"]
            + kvs * comp["propagated K/V"])


def run(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from loopmoe.analysis.exit_plan import step_costs
    from loopmoe.exit_decoding import flops_saved, perplexity, teacher_forced
    from loopmoe.model.core import entropy

    t_start = time.time()
    if args.checkpoint:
        from loopmoe.train.checkpoint import load_trained_model

        model, cfg = load_trained_model(args.checkpoint)
        from loopmoe.analysis.data import heldout_batches

        n_need = max(args.eval_seqs, args.prompts)
        seq = max(args.eval_len, args.prompt_len)
        batches = heldout_batches(cfg, n_batches=1, micro_batch=n_need, prefix=args.data or None,
                                  tokenizer=args.tokenizer or None, split="test", seq_len=seq,
                                  cache_dir=args.cache_dir)
        toks, labels, mask = batches[0]["tokens"], batches[0]["labels"], batches[0]["loss_mask"]
        source = f"checkpoint {args.checkpoint}; held-out {args.data or cfg.data.prefixes} (test split)"
    else:
        from loopmoe.config import load_config
        from loopmoe.model import LoopMoEModel

        cfg = load_config(args.config)
        cfg.model.linear_backend = "torch"
        torch.manual_seed(0)
        model = LoopMoEModel(cfg.model).eval()
        n_need, seq = max(args.eval_seqs, args.prompts), max(args.eval_len, args.prompt_len)
        toks = torch.randint(0, cfg.model.vocab_size, (n_need, seq))
        labels, mask = torch.roll(toks, -1, 1), torch.ones(n_need, seq)
        source = f"RANDOM model from {args.config}, random tokens (smoke test, not a measurement of a trained model)"
    model.eval()
    mcfg = model.cfg
    R = model.n_iters
    if R < 2:
        raise SystemExit("error: the model has no loop boundary to exit at (loop_iters < 2 or n_loop = 0)")
    ev_tok, ev_lab, ev_mask = toks[:args.eval_seqs, :args.eval_len], labels[:args.eval_seqs, :args.eval_len], \
        mask[:args.eval_seqs, :args.eval_len]
    prompts = [toks[i:i + 1, :args.prompt_len] for i in range(args.prompts)]

    # thresholds: 0, quantiles of the first boundary's read-out entropy on the held-out text, inf
    if args.thresholds:
        thr = [float(x) for x in args.thresholds.split(",")]
    else:
        with torch.no_grad():
            ent = entropy(model(ev_tok, exit_after=1).logits).flatten()
        qs = [float(q) for q in args.quantiles.split(",")]
        thr = [0.0] + [round(float(ent.quantile(q)), 3) for q in qs] + [math.inf]
    policies = args.kv_policies.split(",")
    cons = contenders(R, thr, policies)

    # -- quality: teacher-forced sequential decoding ---------------------------------------------------
    t_q = time.time()
    quality = {}
    eval_ctx = (args.eval_len + 1) / 2
    for c in cons:
        r = teacher_forced(model, ev_tok, ev_lab, ev_mask, threshold=c["threshold"],
                           kv_policy=c["policy"] or "copy", exit_after=c["exit_after"])
        frac = (r["exit_counts"].float() / r["exit_counts"].sum()).tolist()
        fs = flops_saved(model, frac, round(eval_ctx), c["policy"], _fixed(c, R))
        quality[c["name"]] = {"loss": r["ce_sum"] / r["n"], "ppl": perplexity(r["ce_sum"], r["n"]),
                              "exit_frac": frac, "flops_saved": fs["saved"], "tokens": r["n"]}
        print(f"quality {c['name']:>28}: loss {quality[c['name']]['loss']:.4f}  exit {['%.2f' % f for f in frac]}",
              file=sys.stderr)
    t_q = time.time() - t_q

    # -- speed: interleaved decode timing --------------------------------------------------------------
    t_s = time.time()
    # wall[n][p][rep], cpu[n][p][rep]: seconds of the timed decode of prompt p in repeat rep
    wall = {c["name"]: [[] for _ in prompts] for c in cons}
    cpu = {c["name"]: [[] for _ in prompts] for c in cons}
    counts = {c["name"]: torch.zeros(R) for c in cons}
    for c in cons:  # warm-up, one prompt each
        decode_once(model, prompts[0], min(8, args.new_tokens), c)
    for rep in range(args.repeats):
        order = cons[rep % len(cons):] + cons[:rep % len(cons)]
        for i, p in enumerate(prompts):
            for c in order:
                w, cp, ks = decode_once(model, p, args.new_tokens, c)
                wall[c["name"]][i].append(w)
                cpu[c["name"]][i].append(cp)
                if rep == 0:
                    counts[c["name"]] += torch.bincount(torch.tensor(ks) - 1, minlength=R).float()
        print(f"repeat {rep + 1}/{args.repeats}: full {sum(t[-1] for t in wall['full']):.2f} s", file=sys.stderr)
    t_s = time.time() - t_s
    n_steps = args.new_tokens * len(prompts)
    dec_ctx = args.prompt_len + (args.new_tokens + 1) / 2

    def best(tab, n):  # min over repeats per prompt (the least disturbed run), summed over the prompts
        return sum(min(ts) for ts in tab[n])

    def per_rep(tab, n):  # total over the prompts, per repeat
        return [sum(ts[r] for ts in tab[n]) for r in range(args.repeats)]

    costs = step_costs(mcfg, round(dec_ctx))
    comp = component_times(model, round(dec_ctx))
    rows = []
    for c in cons:
        n = c["name"]
        frac = (counts[n] / counts[n].sum()).tolist()
        fs = flops_saved(model, frac, round(dec_ctx), c["policy"], _fixed(c, R))
        pred = 1.0 / (1.0 - fs["saved"])
        t_model = time_model(mcfg, R, frac, c, comp)
        speed = best(cpu, "full") / best(cpu, n)
        ratios = [b / t for b, t in zip(per_rep(cpu, "full"), per_rep(cpu, n))]
        rows.append({**c, "tokens_per_s": n_steps / best(cpu, n), "tokens_per_s_wall": n_steps / best(wall, n),
                     "speedup": speed, "speedup_wall": best(wall, "full") / best(wall, n),
                     "speedup_spread": [min(ratios), statistics.median(ratios), max(ratios)],
                     "decode_exit_frac": frac, "flops_saved": fs["saved"], "ideal_flops_saved": fs["ideal_saved"],
                     "flop_speedup": pred, "measured_over_flop": speed / pred,
                     "within_10pct": abs(speed / pred - 1) <= 0.10, "time_model_s": t_model,
                     "quality": quality[n], "loss_cost": quality[n]["loss"] - quality["full"]["loss"],
                     "cpu_s": cpu[n], "wall_s": wall[n]})
    rest = max(best(cpu, "full") / n_steps - rows[0]["time_model_s"], 0.0)  # outside blocks and head
    for r in rows:
        r["time_model_s"] += rest
    for r in rows:
        r["time_model_speedup"] = rows[0]["time_model_s"] / r["time_model_s"]
    n_blk = mcfg.n_prelude + R * mcfg.n_loop + mcfg.n_coda
    step_time = best(cpu, "full") / n_steps
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_avg_at_end": os.getloadavg()},
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
        "source": source,
        "model": {"d_model": mcfg.d_model, "vocab": mcfg.vocab_size, "layout": f"{mcfg.n_prelude} prelude + "
                  f"{mcfg.n_loop} loop x {R} + {mcfg.n_coda} coda", "experts": f"{mcfg.n_experts} top-{mcfg.top_k} "
                  f"+ {mcfg.n_shared_experts} shared" if mcfg.ffn == "moe" else "dense"},
        "settings": {"prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "eval_seqs": args.eval_seqs, "eval_len": args.eval_len,
                     "decode_ctx": dec_ctx, "thresholds": thr, "kv_policies": policies},
        "flops": {"total_per_token": costs.total, "head_share": costs.head / costs.total,
                  "loop_layer_share": costs.full["loop"] / costs.total,
                  "coda_plus_head_share": (costs.full["coda"] * mcfg.n_coda + costs.head) / costs.total},
        "component_s": comp, "full_step_s": step_time, "time_rest_s": rest, "executed_blocks": n_blk,
        "rows": rows, "wall_s": {"quality": t_q, "speed": t_s, "total": time.time() - t_start},
    }


def markdown(res: dict) -> str:
    m, st, fl, comp = res["machine"], res["settings"], res["flops"], res["component_s"]
    L = [f"Measured {res['date']} on {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
         f"**{m['threads']} thread**; load average at the end {', '.join(f'{x:.1f}' for x in m['load_avg_at_end'])} "
         "(other jobs shared the machine; the contenders are interleaved, so they shared it alike).", "",
         f"Command: `{res['command']}`", "", f"Model: {res['source']}; {res['model']['layout']}, d_model "
         f"{res['model']['d_model']}, vocab {res['model']['vocab']}, {res['model']['experts']}.", "",
         f"Decode: greedy, batch 1, KV cache; {st['prompts']} held-out prompts of {st['prompt_len']} tokens, "
         f"{st['new_tokens']} timed decode steps each, {st['repeats']} interleaved repeats. Times are the process's "
         "CPU time (time.process_time; the machine was shared, and CPU time leaves out the time this process waited "
         "for a core), the least of the repeats per prompt, summed over the prompts; speed-up = the full model's "
         "time / the contender's (the per-repeat ratios' spread in brackets; the same from wall-clock time beside). Quality: teacher-forced sequential "
         f"decoding of {st['eval_seqs']} held-out sequences of {st['eval_len']} tokens, each position through "
         "the same cache and exit policy.", "",
         "| contender | tokens/s (CPU time) | measured speed-up [per-repeat min, median, max] | wall-clock speed-up | FLOPs saved / token | FLOP-predicted speed-up | "
         "measured / predicted | within 10% | block-time model speed-up | decode exits @ iter 1..R | held-out loss (cost) | ppl | "
         "held-out exits @ iter 1..R |", "|---" * 13 + "|"]
    for r in res["rows"]:
        q = r["quality"]
        sp = r["speedup_spread"]
        L.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | **{r['speedup']:.3f}x** [{sp[0]:.2f}, {sp[1]:.2f}, "
                 f"{sp[2]:.2f}] | {r['speedup_wall']:.3f}x | {100 * r['flops_saved']:+.1f}% | {r['flop_speedup']:.3f}x | "
                 f"{r['measured_over_flop']:.3f} | {'yes' if r['within_10pct'] else '**no**'} | "
                 f"{r['time_model_speedup']:.3f}x | "
                 + " / ".join(f"{100 * f:.0f}%" for f in r["decode_exit_frac"])
                 + f" | {q['loss']:.4f} ({r['loss_cost']:+.4f}) | {q['ppl']:.2f} | "
                 + " / ".join(f"{100 * f:.0f}%" for f in q["exit_frac"]) + " |")
    full_ms = 1e3 * res["full_step_s"]
    L += ["", "FLOPs saved: the flops.py convention at the mean decode context "
          f"({st['decode_ctx']:.0f} tokens), negative where the read-outs of tokens that do not exit cost more "
          f"than the skipped iterations save. Per token the full model executes {fl['total_per_token'] / 1e6:.2f} "
          f"MFLOP; the LM head is {100 * fl['head_share']:.0f}% of it, one loop layer "
          f"{100 * fl['loop_layer_share']:.0f}%, a read-out (coda + head) {100 * fl['coda_plus_head_share']:.0f}%.",
          "", f"Where a decode step's time goes (batch 1, medians; the full step is {full_ms:.2f} ms for "
          f"{res['executed_blocks']} executed blocks + head): "
          + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in comp.items()) + ". The block-time model column "
          "predicts each contender's step time from these per-call times and its exit fractions (blocks run, "
          "coda + head passes, entropies, propagated K/V) plus the rest of the full step, taken as constant "
          f"({1e3 * res['time_rest_s']:.3f} ms).", ""]
    return "\n".join(L)


def _dominated(rows: list[dict]) -> list[str]:
    """A line per fixed exit_after=k: the entropy-exit contenders it beats in both speed and held-out loss."""
    out = []
    for f in (r for r in rows if r["exit_after"]):
        worse = [r["name"] for r in rows if r["threshold"] is not None and r["speedup"] < f["speedup"]
                 and r["quality"]["loss"] > f["quality"]["loss"]]
        if worse:
            out.append(f"* Speed against quality: {f['name']} ({f['speedup']:.2f}x, loss {f['loss_cost']:+.4f}) is "
                       f"both faster and better than {', '.join(worse)}: the per-token exit pays read-outs for the "
                       "tokens that continue and, with the KV policy, perturbs later tokens.")
    return out


def verdict(res: dict) -> str:
    """The verdict, from the numbers: which contenders reach the FLOP-predicted speed-up within 10%, and the
    per-call times against the FLOP shares that explain the others."""
    rows = [r for r in res["rows"] if r["name"] != "full"]
    ok = [r["name"] for r in rows if r["within_10pct"]]
    fast = [r["name"] for r in rows if r["measured_over_flop"] > 1.10]
    slow = [r["name"] for r in rows if r["measured_over_flop"] < 0.90]
    comp, fl = res["component_s"], res["flops"]
    blk = comp.get("loop block", 0.0)
    step = res["full_step_s"]
    rest = res["time_rest_s"]
    tm_err = [abs(r["speedup"] / r["time_model_speedup"] - 1) for r in rows]
    L = ["## Verdict", "",
         f"Measured speed-up within 10% of the FLOP-predicted speed-up (1 / (1 - FLOPs saved)): **{len(ok)} of "
         f"{len(rows)}** contenders" + (f" ({', '.join(ok)})" if ok else "") + "."
         + (f" Faster than the FLOPs predict: {', '.join(fast)}." if fast else "")
         + (f" Slower than the FLOPs predict: {', '.join(slow)}." if slow else ""), "",
         "Why the FLOP convention and the decode time part ways at this size (batch 1, one thread):", "",
         f"* One loop block is {100 * fl['loop_layer_share']:.0f}% of the FLOPs per token and "
         f"{100 * blk / step:.0f}% of the full step's time ({1e3 * blk:.3f} of {1e3 * step:.3f} ms); the LM head is "
         f"{100 * fl['head_share']:.0f}% of the FLOPs (vocab {res['model']['vocab']} x d_model "
         f"{res['model']['d_model']}) but {100 * comp['norm + head'] / step:.1f}% of the time: one dense matmul runs "
         "at full speed, while a block's ~0.3 MFLOP are spread over dozens of small ops (norms, IterAdaLN, qkv, "
         "RoPE, SDPA, router, top-k, expert gather/scatter, cache concatenation) whose per-op dispatch cost dominates.",
         f"* {100 * rest / step:.0f}% of the full step ({1e3 * rest:.3f} ms) is outside the blocks and the head "
         "(embedding, iteration embeddings, the model's per-forward bookkeeping, argmax, Python).",
         f"* So a read-out (coda + head), {100 * fl['coda_plus_head_share']:.0f}% of the FLOPs, costs about one block "
         "call of time, and exiting saves roughly the skipped blocks' share of the TIME: the FLOP prediction "
         "over-charges read-outs and exits alike because of the head.",
         f"* The block-time model column (measured per-call times x calls, plus the constant rest) predicts the "
         f"measured speed-ups to within {100 * max(tm_err):.0f}% (median {100 * statistics.median(tm_err):.0f}%) here.",
         *_dominated(res["rows"]),
         "", "At realistic widths and batch sizes the matmuls dominate, time tracks FLOPs, and the FLOPs column is the "
         "better guide; note there how much the read-outs cost in FLOPs at a large vocabulary: an entropy exit "
         "must exit a large fraction of tokens before it saves anything."]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a run's checkpoint directory (uses 'latest') or a step_* dir")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                    help="without --checkpoint: a random model of this config (smoke test; default: %(default)s)")
    ap.add_argument("--data", default=DEMO_DATA if os.path.isfile(DEMO_DATA + ".idx") else "",
                    help="held-out data prefix (default: %(default)s, else the checkpoint's data.prefixes)")
    ap.add_argument("--tokenizer", default=DEMO_TOK if os.path.isfile(DEMO_TOK) else "",
                    help="tokenizer model (default: %(default)s, else the checkpoint's)")
    ap.add_argument("--cache-dir", default="/tmp/exit_speed_cache", help="dataset index cache (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=3, help="held-out prompts (default: %(default)s)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64, help="timed decode steps per prompt (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats (default: %(default)s)")
    ap.add_argument("--eval-seqs", type=int, default=6, help="held-out sequences for the quality (default: %(default)s)")
    ap.add_argument("--eval-len", type=int, default=128, help="their length (default: %(default)s)")
    ap.add_argument("--thresholds", help="comma-separated entropy thresholds in nats (default: 0, --quantiles of "
                                         "the first boundary's read-out entropy, inf)")
    ap.add_argument("--quantiles", default="0.2,0.4,0.6,0.8", help="default thresholds' quantiles (default: %(default)s)")
    ap.add_argument("--kv-policies", default="propagate,copy", help="KV policies of the entropy exit (default: %(default)s)")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks/exit_speed.md"),
                    help="markdown report; the .json goes beside it (default: %(default)s)")
    args = ap.parse_args(argv)
    res = run(args)
    md = markdown(res) + "\n" + verdict(res) + "\n"
    res["verdict"] = verdict(res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("# Early exits in KV-cached decoding: measured speed vs FLOPs saved vs quality\n\n" + md)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1, default=float)
    print(md)
    print(f"wrote {args.out} ({res['wall_s']['total']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
