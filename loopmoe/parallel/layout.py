"""Start-up validation of the parallel layout: every rule checked from the config and the world size
alone, before any process group or tensor exists.

    layout = validate_layout(cfg, world_size_from_env())      # raises LayoutError naming the numbers

Rules (megatron-core rank order tp-dp-pp, TP fastest, PP slowest; DeepSpeed's expert groups live
inside megatron's data-parallel group):

- world = TP x PP x DP.
- TP: n_kv_heads % TP == 0 (the fused qkv is split by whole kv groups, so n_heads % TP follows), the
  vocabulary, the FFN widths (shared experts, dense) divisible by TP; TP > 1 needs a TP linear backend.
- Sequence parallel: TP > 1 and seq_len % TP == 0.
- EP: n_experts % EP == 0 and DP % EP == 0 (DeepSpeed's rule: an expert-parallel group is EP consecutive
  data-parallel ranks, the expert-data-parallel group the DP/EP ranks holding the same experts).
- PP: the stage split (``parallel.pp_split``: unique layers per stage, prelude|loop|coda order) has PP
  entries, each >= 1, summing to P + K + C, and keeps the loop block (its K shared layers, run R times)
  inside one stage, so shared weights never cross a stage. Default split: the loop block whole, the
  prelude/coda layers around it cut to balance executed layers (loop layers count R times).
  PP > 1 needs ZeRO stage <= 1 (ZeRO-2 reduces gradients inside the engine's backward; the pipeline
  schedule runs the backward itself: DeepSpeed's own pipeline engine has the same rule) and no
  early-exit losses (their coda + head would run on another stage).
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field

from loopmoe.config import Config, ConfigError


class LayoutError(ConfigError):
    """The parallel layout cannot work; the message names the numbers and a layout that does."""


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    dp: int
    ep: int
    sequence_parallel: bool
    zero_stage: int
    pp_split: tuple[int, ...] = field(default=())  # unique layers per stage (() when PP = 1)

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: DP ranks holding the same experts."""
        return self.dp // self.ep

    def describe(self) -> str:
        s = f"world {self.world} = TP {self.tp} x PP {self.pp} x DP {self.dp}; EP {self.ep} (expert DP {self.edp})"
        if self.sequence_parallel:
            s += ", sequence parallel"
        if self.pp > 1:
            s += f", stages {list(self.pp_split)} unique layers"
        return s + f", ZeRO {self.zero_stage}"


def world_size_from_env() -> int:
    """The number of processes the launcher started (torchrun, srun, mpirun), read from the environment
    only (no side effects; ``distributed.detect_env`` does the rest later)."""
    env = os.environ
    # The order of distributed.detect_env: torchrun, mpirun, srun (a job step, not the batch shell), others.
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "PMI_SIZE"):
        if env.get(key, "").strip().isdigit():
            if key.startswith("SLURM_") and "SLURM_STEP_ID" not in env:
                continue  # the sbatch shell itself, outside srun: this process is one task
            return int(env[key])
    return 1


def zero_stage_of(cfg: Config) -> int:
    """train.zero_stage, or the stage in train.ds_config (0 if the file does not say)."""
    if cfg.train.zero_stage >= 0:
        return cfg.train.zero_stage
    # An unreadable file is an error here: read as ZeRO 0 it used to surface later as a wrong bf16 error.
    path = cfg.train.ds_config
    try:
        with open(path) as f:
            ds = json.load(f)
    except OSError as e:
        raise ConfigError(f"train.ds_config={path!r}: cannot read it ({e.strerror}); give a file from "
                          "ds_configs/ or set train.zero_stage") from None
    except ValueError as e:
        raise ConfigError(f"train.ds_config={path!r}: not valid JSON ({e}); fix the file or give one from "
                          "ds_configs/") from None
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds, dict) else None
    if not isinstance(stage, int) or isinstance(stage, bool):
        raise ConfigError(f"train.ds_config={path!r}: zero_optimization.stage must be an integer (got {stage!r})")
    return stage


# ---------------------------------------------------------------------------------------------------
# Pipeline stage split


def stage_units(m) -> list[tuple[str, int, int]]:
    """The model as indivisible units in order: ("layer", i, cost 1) for prelude/coda layers and one
    ("loop", P, cost R*K) for the loop block (unique layer indices P..P+K-1)."""
    units = [("layer", i, 1) for i in range(m.n_prelude)]
    if m.n_loop:
        units.append(("loop", m.n_prelude, m.loop_iters * m.n_loop))
    units += [("layer", m.n_prelude + m.n_loop + c, 1) for c in range(m.n_coda)]
    return units


def default_pp_split(m, pp: int) -> list[int]:
    """Unique layers per stage: the loop block whole, stages balanced by executed layers (min-max cost,
    exact by dynamic programming over the few units)."""
    units = stage_units(m)
    n = len(units)
    if pp > n:
        raise ValueError(f"PP={pp} > {n} indivisible units")
    cost = [u[2] for u in units]
    size = [m.n_loop if u[0] == "loop" else 1 for u in units]
    pre = [0, *itertools.accumulate(cost)]
    best = {}  # (first unit, stages left) -> (max stage cost, cut list)

    def solve(i, k):
        if (i, k) in best:
            return best[(i, k)]
        if k == 1:
            res = (pre[n] - pre[i], [n])
        else:
            res = (math.inf, [])
            for j in range(i + 1, n - k + 2):  # this stage takes units i..j-1
                rest, cuts = solve(j, k - 1)
                c = max(pre[j] - pre[i], rest)
                if c < res[0]:
                    res = (c, [j, *cuts])
        best[(i, k)] = res
        return res

    _, cuts = solve(0, pp)
    split, start = [], 0
    for end in cuts:
        split.append(sum(size[start:end]))
        start = end
    return split


def stage_ranges(m, split: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """[lo, hi) unique-layer ranges of each stage."""
    bounds = [0, *itertools.accumulate(split)]
    return list(zip(bounds[:-1], bounds[1:]))


def _split_error(m, split) -> str | None:
    n = m.n_unique_layers
    if any(s < 1 for s in split):
        return f"every stage needs at least one layer (got {list(split)})"
    if sum(split) != n:
        return (f"the stages hold {sum(split)} layers but the model has {n} unique layers "
                f"(P {m.n_prelude} + K {m.n_loop} + C {m.n_coda})")
    lo, hi = m.n_prelude, m.n_prelude + m.n_loop
    for a, b in stage_ranges(m, split):
        if m.n_loop and a < hi and b > lo and not (a <= lo and b >= hi):
            return (f"a stage boundary cuts the loop block (layers {lo}..{hi - 1}, shared by its {m.loop_iters} "
                    f"iterations): its weights would live on two stages and every iteration would cross them; "
                    f"keep layers {lo}..{hi - 1} in one stage")
    return None


# ---------------------------------------------------------------------------------------------------
# Validation


def _problems(cfg: Config, world: int, tp: int, pp: int, ep: int, sp: bool, zero: int,
              split: list[int] | None) -> list[str]:
    """Every rule a layout breaks (empty = it works)."""
    m, out = cfg.model, []
    if world % (tp * pp):
        return [f"world size {world} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}"]
    dp = world // (tp * pp)
    if tp > 1:
        if cfg.model.linear_backend == "torch":
            out.append("TP > 1 needs model.linear_backend=megatron (or te); 'torch' has no tensor parallelism")
        if m.n_kv_heads % tp:
            out.append(f"model.n_kv_heads={m.n_kv_heads} (n_heads={m.n_heads}) is not divisible by TP={tp}: "
                       "each TP rank takes whole kv-head groups")
        if m.vocab_size % tp:
            out.append(f"model.vocab_size={m.vocab_size} is not divisible by TP={tp} (pad the vocabulary)")
        if m.ffn == "moe" and (m.n_shared_experts * m.expert_hidden) % tp:
            out.append(f"shared-expert width {m.n_shared_experts} x {m.expert_hidden} is not divisible by TP={tp}")
        if m.ffn == "dense" and m.dense_hidden % tp:
            out.append(f"model.dense_hidden={m.dense_hidden} is not divisible by TP={tp}")
    if sp:
        if tp == 1:
            out.append("parallel.sequence_parallel=true needs TP > 1 (it splits the sequence over the TP group)")
        elif cfg.data.seq_len % tp:
            out.append(f"sequence parallel: data.seq_len={cfg.data.seq_len} is not divisible by TP={tp}")
    if ep > 1:
        if m.ffn != "moe":
            out.append(f"EP={ep} needs model.ffn=moe (the model has no experts)")
        elif m.n_experts % ep:
            out.append(f"model.n_experts={m.n_experts} is not divisible by EP={ep}")
        if dp % ep:
            out.append(f"EP={ep} does not divide the data-parallel size DP={dp} (= world {world} / (TP {tp} x PP {pp})): "
                       "expert-parallel groups are made of data-parallel ranks (DeepSpeed's rule)")
    # Kept (DeepSpeed 0.19.8, engine._do_optimizer_sanity_check): without ZeRO, bf16 weights with fp32
    # gradient accumulation raise NotImplementedError, and its one ZeRO-0 bf16 optimizer (FP16_Optimizer in
    # bf16) sums and all-reduces the gradients in bf16.
    if cfg.train.precision in ("bf16", "fp8") and zero == 0:
        out.append(f"train.precision={cfg.train.precision} with ZeRO 0: DeepSpeed has no ZeRO-0 bf16 optimizer "
                   "that accumulates and reduces gradients in fp32; use ZeRO 1 or 2 (train.zero_stage=1)")
    if split and len(split) != pp:
        out.append(f"parallel.pp_split={list(split)} has {len(split)} stages but PP={pp}")
    if pp > 1:
        units = len(stage_units(m))
        if pp > units:
            out.append(f"PP={pp} exceeds the {units} pipeline units of the model (P {m.n_prelude} prelude layers + "
                       f"the loop block as one unit + C {m.n_coda} coda layers)")
        elif split and len(split) == pp and (err := _split_error(m, split)) is not None:
            out.append(f"parallel.pp_split={list(split)}: {err}")
        if zero >= 2:
            out.append(f"PP={pp} with ZeRO stage {zero}: ZeRO-2 reduces gradients inside the engine's backward, "
                       "but the pipeline schedule runs the backward itself; use ZeRO 0 or 1 with PP "
                       "(train.zero_stage=1)")
        if m.tie_embeddings:
            out.append("model.tie_embeddings with PP > 1: the embedding (first stage) and the head (last stage) "
                       "would share a weight across stages; untie them or use PP=1")
        if any(w != 0 for w in m.exit_loss_weights):
            out.append("model.exit_loss_weights with PP > 1: early-exit losses need the coda and head on the "
                       "loop's stage; train them with PP=1")
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_layout(cfg: Config, world: int) -> tuple[int, int, int] | None:
    """A (TP, PP, EP) that passes every rule for this world size, as close to the request as possible
    (same TP/PP/EP where allowed; else the largest EP, the smallest TP and PP)."""
    p, zero = cfg.parallel, zero_stage_of(cfg)
    best = None
    for tp in _divisors(world):
        for pp in _divisors(world // tp):
            dp = world // (tp * pp)
            for ep in _divisors(dp):
                sp = p.sequence_parallel and tp > 1
                if _problems(cfg, world, tp, pp, ep, sp, zero, None):
                    continue
                score = ((tp != p.tp) + (pp != p.pp) + (ep != p.ep), abs(math.log(tp / p.tp)) + abs(math.log(pp / p.pp)),
                         -ep if cfg.model.ffn == "moe" else ep, tp, pp)
                if best is None or score < best[0]:
                    best = (score, (tp, pp, ep))
    return None if best is None else best[1]


def validate_layout(cfg: Config, world: int) -> Layout:
    """The layout for ``world`` processes, or LayoutError naming every broken rule and a working layout."""
    p = cfg.parallel
    zero = zero_stage_of(cfg)
    problems = _problems(cfg, world, p.tp, p.pp, p.ep, p.sequence_parallel, zero, p.pp_split or None)
    if problems:
        hint = suggest_layout(cfg, world)
        if hint:
            tp, pp, ep = hint
            fix = (f"a layout that works for {world} processes: parallel.tp={tp} parallel.pp={pp} parallel.ep={ep} "
                   f"(DP={world // (tp * pp)})")
            if p.pp_split and pp > 1:
                fix += f" parallel.pp_split={','.join(map(str, default_pp_split(cfg.model, pp)))}"
        else:
            fix = f"no TP/PP/EP layout works for {world} processes with this model; change the world size"
        raise LayoutError("parallel layout: " + "; ".join(problems) + f". Suggestion: {fix}")
    split: tuple[int, ...] = ()
    if p.pp > 1:
        split = tuple(p.pp_split) if p.pp_split else tuple(default_pp_split(cfg.model, p.pp))
    return Layout(world=world, tp=p.tp, pp=p.pp, dp=world // (p.tp * p.pp), ep=p.ep,
                  sequence_parallel=p.sequence_parallel, zero_stage=zero, pp_split=split)
