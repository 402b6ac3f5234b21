"""The toy comparison's runs: the models compared, the demo data, the matching table, training one
(model, seed) in a subprocess and the held-out evaluation. The method and the command: compare.py."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS = os.path.join(ROOT, "data", "corpus", "python_docs.jsonl")
DEMO = os.path.join(ROOT, "data", "demo")


@dataclass(frozen=True)
class Model:
    name: str
    config: str
    overrides: tuple[str, ...]
    label: str
    ablation: bool = False


MODELS = [
    Model("loopmoe", "configs/tiny_loopmoe.yaml", (), "LoopMoE (IterAdaLN both)"),
    Model("vanilla", "configs/tiny_vanilla.yaml", (), "Vanilla MoE twin"),
    Model("dense_loop", "configs/tiny_dense_loop.yaml", (), "dense looped"),
    Model("dense", "configs/tiny_dense.yaml", (), "dense (iso-FLOP)"),
    Model("adaln_none", "configs/tiny_loopmoe.yaml", ("model.adaln=none",), "LoopMoE, no IterAdaLN", True),
    Model("adaln_iter", "configs/tiny_loopmoe.yaml", ("model.adaln=iter",), "LoopMoE, IterAdaLN iter only", True),
    Model("adaln_token", "configs/tiny_loopmoe.yaml", ("model.adaln=token",), "LoopMoE, IterAdaLN token only", True),
    # why IterAdaLN hurt at 200 steps (issue 17): the init of W_h / the iteration MLP, the gate form, rank, lr
    Model("adaln_small", "configs/tiny_loopmoe.yaml", ("model.adaln_init=small",),
          "LoopMoE, IterAdaLN small init (std 0.02)", True),
    Model("adaln_zero_gate", "configs/tiny_loopmoe.yaml", ("model.adaln_gate=zero",),
          "LoopMoE, IterAdaLN adaLN-Zero gate", True),
    Model("adaln_rank4", "configs/tiny_loopmoe.yaml", ("model.adaln_rank=4",), "LoopMoE, IterAdaLN rank 4", True),
    Model("adaln_lr03", "configs/tiny_loopmoe.yaml", ("optim.adaln_lr_scale=0.3",),
          "LoopMoE, IterAdaLN lr x 0.3", True),
]
BY_NAME = {m.name: m for m in MODELS}
FULL_STEPS = 800


@dataclass
class Run:
    model: Model
    seed: int
    dir: str
    wall_s: float | None = None
    skipped: str = ""
    heldout: dict = field(default_factory=dict)

    @property
    def ckpt(self) -> str:
        return os.path.join(self.dir, "checkpoints")


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# 1. data


def ensure_demo_data() -> tuple[str, str]:
    """The demo tokenizer and token files, made like scripts/demo.sh when missing."""
    tok = os.path.join(DEMO, "tokenizer.model")
    prefix = os.path.join(DEMO, "python_docs_text_document")
    py = sys.executable
    if not os.path.isfile(CORPUS) and not (os.path.isfile(tok) and os.path.isfile(prefix + ".idx")):
        raise SystemExit(f"error: the demo corpus {CORPUS} is missing: run `make corpus` first")
    os.makedirs(DEMO, exist_ok=True)
    if not os.path.isfile(tok):
        log("demo tokenizer: training sentencepiece BPE (4096) on the demo corpus")
        subprocess.run([py, "data_tools/train_tokenizer.py", "--input", CORPUS, "--vocab-size", "4096",
                        "--output-prefix", os.path.join(DEMO, "tokenizer")], cwd=ROOT, check=True)
    if not os.path.isfile(prefix + ".idx"):
        log("demo token files: preprocessing the corpus")
        subprocess.run([py, "data_tools/preprocess.py", "--input", CORPUS, "--json-keys", "text", "--tokenizer-model",
                        tok, "--output-prefix", os.path.join(DEMO, "python_docs"), "--append-eod", "--workers", "2"],
                       cwd=ROOT, check=True)
    return prefix, tok


def tokenizer_vocab(tok: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=tok).vocab_size()


# ---------------------------------------------------------------------------------------------------
# 2. matching table


def load_model_config(m: Model, extra: list[str]):
    from loopmoe.config import load_config

    return load_config(os.path.join(ROOT, m.config), [*m.overrides, *extra])


def matching(extra: list[str]) -> dict:
    from loopmoe.balance import budget, compare

    out = {"pairs": [], "budgets": {}}
    for a, b in (("vanilla", "loopmoe"), ("vanilla", "adaln_none"), ("dense", "dense_loop")):
        ca, cb = load_model_config(BY_NAME[a], extra), load_model_config(BY_NAME[b], extra)
        cmp_ = compare(ca, cb, names=(a, b))
        out["pairs"].append({"a": a, "b": b, "table": cmp_.table(), "ok": cmp_.ok,
                             "max_checked_diff": cmp_.max_checked_diff, "rows": cmp_.as_dict()})
    for m in MODELS:
        cfg = load_model_config(m, extra)
        bd = budget(cfg.model, cfg.data.seq_len)
        out["budgets"][m.name] = {"total_params": bd.total_params, "active_params": bd.active_params,
                                  "flops_per_token": bd.flops_per_token, "attn_ffn_ratio": bd.attn_ffn_ratio}
    return out


# ---------------------------------------------------------------------------------------------------
# 3. training


def train_overrides(args, run: Run, prefix: str, tok: str, vocab: int) -> list[str]:
    steps = args.steps
    return [
        f"data.prefixes={prefix}", f"data.tokenizer_model={tok}", f"model.vocab_size={vocab}",
        f"data.cache_dir={os.path.join(args.runs, 'data_cache')}", f"logging.run_dir={run.dir}",
        f"train.steps={steps}", f"train.seed={run.seed}", f"train.eval_interval={max(1, steps // 8)}",
        f"train.eval_iters={2 if args.quick else 10}", f"train.log_interval={max(1, steps // 80)}",
        f"checkpoint.interval={steps}", "checkpoint.keep_last=1", "logging.progress_bar=false",
        "logging.tensorboard=false", f"optim.warmup_steps={min(20, max(1, steps // 10))}",
    ]


def complete(run: Run, steps: int) -> bool:
    latest = os.path.join(run.ckpt, "latest")
    return os.path.isfile(latest) and open(latest).read().strip() == f"step_{steps:08d}"


def train(args, run: Run, prefix: str, tok: str, vocab: int) -> None:
    info = os.path.join(run.dir, "compare_run.json")
    if complete(run, args.steps) and not args.fresh:
        if os.path.isfile(info):
            run.wall_s = json.load(open(info)).get("wall_s")
        log(f"{run.model.name} seed {run.seed}: done already ({run.dir})")
        return
    shutil.rmtree(run.dir, ignore_errors=True)
    os.makedirs(run.dir, exist_ok=True)
    cmd = [sys.executable, "pretrain_loopmoe.py", "--config", run.model.config, *run.model.overrides,
           *train_overrides(args, run, prefix, tok, vocab), *args.set]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    log(f"{run.model.name} seed {run.seed}: training {args.steps} steps -> {run.dir}")
    t0 = time.perf_counter()
    with open(os.path.join(run.dir, "train.log"), "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    run.wall_s = time.perf_counter() - t0
    if rc != 0:
        tail = open(os.path.join(run.dir, "train.log")).read()[-3000:]
        raise SystemExit(f"error: training {run.model.name} seed {run.seed} failed ({rc}); "
                         f"{run.dir}/train.log ends:\n{tail}")
    json.dump({"wall_s": run.wall_s, "cmd": shlex.join(cmd)}, open(info, "w"))
    log(f"{run.model.name} seed {run.seed}: {run.wall_s:.0f} s")


def train_all(args, runs: list[Run], t_start: float, prefix: str, tok: str, vocab: int) -> None:
    """Train every run, ``--jobs`` subprocesses at a time, in the order given (main models first).
    An ablation run is skipped when, at its start, the time spent plus its projected time (the mean of
    the finished runs of its config divided by the jobs in parallel) passes ``--max-minutes``."""
    def one(r: Run) -> None:
        if r.model.ablation and args.max_minutes and not complete(r, args.steps):
            done = [x.wall_s for x in runs if x.wall_s and x.model.config == r.model.config]
            est = sum(done) / len(done) if done else 0.0
            if (time.perf_counter() - t_start + est) / 60 > args.max_minutes:
                r.skipped = f"time budget ({args.max_minutes} min)"
                log(f"{r.model.name} seed {r.seed}: skipped, {r.skipped}")
                return
        train(args, r, prefix, tok, vocab)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for fut in [pool.submit(one, r) for r in runs]:
            fut.result()  # re-raises a failed run's SystemExit


def curves(run: Run) -> dict:
    path = os.path.join(run.dir, "metrics.jsonl")
    tr, va = {}, {}
    if os.path.isfile(path):
        for line in open(path):
            r = json.loads(line)
            if "lm_loss" in r:
                tr[r["step"]] = r["lm_loss"]
            if "val/loss" in r:
                va[r["step"]] = r["val/loss"]
    return {"train": tr, "val": va}


# ---------------------------------------------------------------------------------------------------
# 4. held-out evaluation


def heldout(model, batches) -> dict:
    import torch

    from loopmoe.model.core import token_ce

    looped = model.cfg.is_looped
    sums, w = {}, 0.0
    with torch.no_grad():
        for bt in batches:
            out = model(bt["tokens"], exit_logits=looped)
            m = bt["loss_mask"].float()
            w += m.sum().item()
            outs = out.exit_logits if looped else [out.logits]
            for k, lg in enumerate(outs, start=1):
                sums[k] = sums.get(k, 0.0) + (token_ce(lg, bt["labels"]) * m).sum().item()
    n = len(sums)
    res = {"loss": sums[n] / w}
    for k in range(1, n):
        res[f"loss_exit{k}"] = sums[k] / w
    return res


def mean_spread(vals: list[float]) -> tuple[float, float]:
    """Mean and half the range (with 2 seeds: mean +- half-range spans both values)."""
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2
