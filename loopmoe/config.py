"""One config system: typed dataclasses per section, YAML presets, ``section.key=value`` overrides.

    cfg = load_config("configs/tiny_loopmoe.yaml", ["train.steps=50", "model.loop_iters=3"])

Every field is validated at start-up, before any heavy work; an unknown key or a bad value raises
``ConfigError`` naming the field (and the file) and how to fix it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """The model. LoopMoE = prelude -> loop (n_loop shared layers run loop_iters times) -> coda.

    Vanilla MoE: n_loop=0 (all layers unique). Dense: ffn="dense". See docs/model.md and the spec.
    """

    vocab_size: int = 64000  # tokenizer vocabulary size (embedding and LM-head rows)
    d_model: int = 256  # hidden width
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # grouped-query attention: key/value heads
    head_dim: int = 64  # width of one attention head (even, for RoPE)
    n_prelude: int = 1  # P unique layers before the loop
    n_loop: int = 1  # K shared layers in the loop block
    n_coda: int = 1  # C unique layers after the loop
    loop_iters: int = 2  # R: times the loop block runs
    max_seq_len: int = 4096  # longest sequence the model accepts (RoPE tables; data.seq_len <= this)
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the LM head
    init_std: float = 0.02  # standard deviation of the normal weight initialisation
    # FFN: "moe" (fine-grained SwiGLU experts + optional shared experts) or "dense" (one SwiGLU).
    ffn: Literal["moe", "dense"] = "moe"  # "moe" = routed (+ shared) SwiGLU experts, "dense" = one SwiGLU
    dense_hidden: int = 1024  # SwiGLU hidden width when ffn="dense"
    n_experts: int = 8  # routed experts
    expert_hidden: int = 256  # SwiGLU hidden width of one routed expert
    top_k: int = 2  # routed experts per token
    n_shared_experts: int = 1  # always-on experts, each expert_hidden wide
    router_score: Literal["topk_then_softmax", "softmax_then_topk"] = "topk_then_softmax"  # gate weights: softmax over the k chosen, or top-k of the full softmax
    lb_loss_coef: float = 0.01  # load balancing E * sum_i f_i p_i
    z_loss_coef: float = 0.001  # router z-loss mean(logsumexp^2)
    aux_free_bias: bool = False  # DeepSeek-V3 aux-loss-free balancing (bias for selection only)
    aux_free_rate: float = 0.001  # bias update step: b_i += rate * sign(mean_load - load_i)
    capacity_factor: float = 0.0  # 0 = dropless; else tokens beyond capacity*T*k/E per expert dropped
    dispatch: Literal["index", "einsum"] = "index"  # expert dispatch: "index" = gather/scatter, "einsum" = DeepSpeed's one-hot gate (baseline)
    # IterAdaLN (loop layers only): which signals modulate the norms, their rank, the gate form.
    adaln: Literal["both", "iter", "token", "none"] = "both"  # IterAdaLN signals: iteration, token state, both, none
    adaln_rank: int = 64  # IterAdaLN low-rank width r
    adaln_gate: Literal["one_plus", "zero"] = "one_plus"  # x + (1+g)*f(..) or adaLN-Zero x + g*f(..)
    adaln_init: Literal["unit", "small"] = "unit"  # W_h and the iteration MLP: std 1/sqrt(fan_in), or init_std
    input_reinjection: bool = False  # add the loop's input state back at every iteration
    exit_loss_weights: list[float] = field(default_factory=list)  # aux LM losses at exits 1..R-1
    linear_backend: Literal["megatron", "te", "torch"] = "megatron"  # linear layers: megatron-core TP linears, Transformer Engine, or plain torch (loopmoe/model/layers.py)

    @property
    def n_unique_layers(self) -> int:
        return self.n_prelude + self.n_loop + self.n_coda

    @property
    def n_executed_layers(self) -> int:
        return self.n_prelude + self.loop_iters * self.n_loop + self.n_coda

    @property
    def is_looped(self) -> bool:
        return self.n_loop > 0 and self.loop_iters > 1


@dataclass
class DataConfig:
    """Training samples from Megatron .bin/.idx prefixes (see loopmoe/data)."""

    prefixes: list[str] = field(default_factory=list)  # path prefixes without .bin/.idx
    weights: list[float] = field(default_factory=list)  # blend weights (empty = equal)
    split: str = "98,1,1"  # train,valid,test proportions
    seq_len: int = 256  # tokens per training sample
    tokenizer_model: str = ""  # sentencepiece .model or Hugging Face tokenizer.json (told apart by content)
    cache_dir: str = ""  # where dataset indices are cached (default: <run_dir>/data_cache)
    seed: int = 1234  # seed of the sample shuffle (dataset indices)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (loopmoe/train/optim.py)."""

    lr: float = 3e-4  # peak learning rate, reached after warmup_steps
    min_lr: float = 3e-5  # final learning rate of the decay
    weight_decay: float = 0.1  # AdamW decoupled weight decay (not on norms, biases, embeddings, IterAdaLN)
    adaln_lr_scale: float = 1.0  # IterAdaLN parameters train at lr x this (their own param group when != 1)
    adaln_weight_decay: float = 0.0  # weight decay of the IterAdaLN matrices (their own group when != 0)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"  # after warm-up: cosine to min_lr, warmup-stable-decay, or constant
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    decay_steps: int = 0  # WSD: length of the final sqrt cool-down (0 = 20% of the steps)


@dataclass
class TrainConfig:
    """The run: steps, batch sizes, precision, validation and logging cadence, the DeepSpeed engine."""

    steps: int = 1000  # optimizer steps to train for (a resumed run continues up to this)
    micro_batch: int = 4  # samples per micro-batch per data-parallel rank
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    seed: int = 1234  # seed of the weight initialisation and every other RNG (data order: data.seed)
    eval_interval: int = 100  # validate every N steps (and at the last step)
    eval_iters: int = 10  # held-out batches per validation
    log_interval: int = 10  # console / metrics.jsonl / TensorBoard line every N steps
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"  # parameter/compute precision; fp8 = bf16 plus FP8 matmuls from train.fp8_backend (loopmoe/parallel/fp8.py)
    fp8_backend: Literal["te", "torchao"] = "te"  # FP8 route: te = Transformer Engine (needs model.linear_backend=te, a Hopper GPU), torchao = torchao float8 training of the nn.Linear layers (needs model.linear_backend=torch)
    fp8_recipe: Literal["auto", "delayed", "current", "mxfp8", "tensorwise", "rowwise"] = "auto"  # FP8 scaling: auto = delayed (te) / tensorwise (torchao); te: delayed, current (per-tensor current scaling), mxfp8 (Blackwell); torchao: tensorwise, rowwise
    ds_config: str = "ds_configs/zero1.json"  # DeepSpeed JSON; batch sizes, clipping and precision are filled in from this config
    zero_stage: int = -1  # -1 = take it from ds_config
    exit_interval: int = 0  # like Megatron's --exit-interval: checkpoint and stop when step % N == 0 (0 = off)
    recompute: Literal["none", "full", "selective"] = "none"  # activation recompute per executed layer: none | full (whole layer) | selective (FFN + attention core)


@dataclass
class ParallelConfig:
    """How the world is split: TP x PP x DP processes, experts over EP (see docs/parallelism.md)."""

    tp: int = 1  # tensor-parallel size (megatron-core linears)
    pp: int = 1  # pipeline-parallel stages
    ep: int = 1  # expert-parallel size (routed experts split over EP ranks of the DP group)
    sequence_parallel: bool = False  # with TP > 1: activations outside the TP linears split along the sequence (megatron's SP)
    pp_split: list[int] = field(default_factory=list)  # layers per stage, empty = loop block in one stage
    backend: str = "auto"  # torch.distributed backend: auto = nccl on GPU, gloo on CPU
    timeout_minutes: int = 10  # collective timeout of the process groups


@dataclass
class CheckpointConfig:
    """Where and how often checkpoints are saved, how many are kept, whether a run resumes."""

    dir: str = ""  # default: <run_dir>/checkpoints
    interval: int = 500  # save every N steps (and at the end, and on a signal)
    keep_last: int = 3  # older checkpoints are deleted
    resume: Literal["latest", "latest_intact", "none", True, False] = "latest"  # latest: the step <dir>/latest names (damaged = error naming the newest intact step); latest_intact: fall back to the newest intact step with a WARNING; none: start fresh; true/false = latest/none
    allow_schedule_change: bool = False  # at resume: accept a changed train.steps / optim.* (the LR schedule restarts from the new settings at the resume step; logged with the LR before and after)


@dataclass
class LoggingConfig:
    """The run directory and what is logged there: metrics.jsonl, TensorBoard, W&B, the MFU peak."""

    run_dir: str = "runs/default"  # config.yaml, metrics.jsonl, tensorboard/, checkpoints/ go here
    tensorboard: bool = True  # write TensorBoard scalars to <run_dir>/tensorboard
    progress_bar: bool = True  # a tqdm bar on rank 0 when stderr is a terminal
    peak_tflops: float = 0.0  # per device, for MFU; 0 = auto (GPU datasheet peak by name, CPU measured at start-up)
    wandb_project: str = ""  # Weights & Biases project; empty = W&B off (needs pip install 'loopmoe[wandb]')
    wandb_entity: str = ""  # W&B team or user (empty = your default entity)
    wandb_run_name: str = ""  # W&B run name (empty = the run_dir's last component)


@dataclass
class Config:
    """The whole run configuration: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# ---------------------------------------------------------------------------------------------------
# Loading, overriding, validating


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise naming the field."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, typing.List):
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() not in ("", "[]") else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{where}: union types are not supported in configs")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {tp}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def _apply(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    sections = _field_types(Config)
    if section not in sections:
        raise _unknown(section, list(sections), where)
    sub = getattr(cfg, section)
    types_ = _field_types(type(sub))
    if key not in types_:
        raise _unknown(key, list(types_), f"{where}: section {section!r}")
    setattr(sub, key, _coerce(value, types_[key], f"{where}: {section}.{key}"))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (YAML-parsed values: 3, 0.1, true, [1,2])."""
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ConfigError(f"override {ov!r}: expected section.key=value, e.g. train.steps=100")
        path, raw = ov.split("=", 1)
        section, key = path.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _apply(cfg, section.strip(), key.strip(), value, f"override {ov!r}")
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML preset (``path``) <- overrides; then validate."""
    cfg = Config()
    if path:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} not found; presets are in configs/")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        _apply_sections(cfg, raw, path)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Field-level checks that need no process groups (layout checks live in loopmoe/parallel)."""
    m = cfg.model
    for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
        _check(getattr(m, name) > 0, f"model.{name} must be > 0 (got {getattr(m, name)})")
    for name in ("n_prelude", "n_loop", "n_coda"):
        _check(getattr(m, name) >= 0, f"model.{name} must be >= 0 (got {getattr(m, name)})")
    _check(m.n_unique_layers > 0, "model: n_prelude + n_loop + n_coda must be > 0")
    _check(m.loop_iters >= 1, f"model.loop_iters must be >= 1 (got {m.loop_iters})")
    _check(m.n_heads % m.n_kv_heads == 0,
           f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    _check(m.head_dim % 2 == 0, f"model.head_dim={m.head_dim} must be even for RoPE")
    if m.ffn == "moe":
        _check(m.n_experts >= 1 and m.expert_hidden >= 1, "model.n_experts and model.expert_hidden must be >= 1")
        _check(1 <= m.top_k <= m.n_experts,
               f"model.top_k={m.top_k} must be between 1 and model.n_experts={m.n_experts}")
        _check(m.capacity_factor == 0 or m.capacity_factor > 0,
               "model.capacity_factor must be 0 (dropless) or > 0")
    else:
        _check(m.dense_hidden >= 1, "model.dense_hidden must be >= 1")
    _check(m.adaln_rank >= 1, "model.adaln_rank must be >= 1")
    _check(len(m.exit_loss_weights) in (0, max(m.loop_iters - 1, 0)),
           f"model.exit_loss_weights has {len(m.exit_loss_weights)} entries; give one per early exit "
           f"(loop_iters - 1 = {m.loop_iters - 1}) or none")
    d = cfg.data
    _check(d.seq_len >= 1, "data.seq_len must be >= 1")
    _check(d.seq_len <= m.max_seq_len, f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(not d.weights or len(d.weights) == len(d.prefixes),
           f"data.weights has {len(d.weights)} entries for {len(d.prefixes)} data.prefixes; give one per prefix")
    for i, w in enumerate(d.weights):  # a 0 weight used to pass here and fail later inside the blend
        _check(w > 0, f"data.weights[{i}]={w} for {d.prefixes[i] if i < len(d.prefixes) else '?'}: every "
                      "weight must be > 0; drop the prefix from data.prefixes instead of giving it weight 0")
    try:
        parts = [float(x) for x in d.split.split(",")]
        _check(len(parts) == 3 and sum(parts) > 0 and min(parts) >= 0, "")
    except (ValueError, ConfigError):
        raise ConfigError(f"data.split={d.split!r}: expected three non-negative numbers, e.g. 98,1,1") from None
    o = cfg.optim
    _check(o.lr > 0 and 0 <= o.min_lr <= o.lr, f"optim: need 0 <= min_lr ({o.min_lr}) <= lr ({o.lr}) and lr > 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")
    _check(o.warmup_steps >= 0 and o.decay_steps >= 0, "optim.warmup_steps and optim.decay_steps must be >= 0")
    t = cfg.train
    for name in ("steps", "micro_batch", "grad_accum", "log_interval", "eval_interval", "eval_iters"):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1 (got {getattr(t, name)})")
    _check(t.exit_interval >= 0, "train.exit_interval must be >= 0 (0 = off)")
    _check(t.zero_stage in (-1, 0, 1, 2), f"train.zero_stage={t.zero_stage}: use 0, 1, 2 (or -1 = from ds_config)")
    _check_fp8(t, m)
    p = cfg.parallel
    for name in ("tp", "pp", "ep"):
        _check(getattr(p, name) >= 1, f"parallel.{name} must be >= 1")
    c = cfg.checkpoint
    _check(c.interval >= 1 and c.keep_last >= 1, "checkpoint.interval and checkpoint.keep_last must be >= 1")
    if isinstance(c.resume, bool):  # older configs: resume: true/false
        c.resume = "latest" if c.resume else "none"


TE_FP8_RECIPES = ("delayed", "current", "mxfp8")  # Transformer Engine's DelayedScaling, Float8CurrentScaling, MXFP8BlockScaling
TORCHAO_FP8_RECIPES = ("tensorwise", "rowwise")  # torchao Float8LinearConfig.from_recipe_name


def fp8_recipe_name(t: TrainConfig) -> str:
    """train.fp8_recipe with "auto" resolved for the backend: delayed (te) or tensorwise (torchao)."""
    if t.fp8_recipe != "auto":
        return t.fp8_recipe
    return "delayed" if t.fp8_backend == "te" else "tensorwise"


def _check_fp8(t: TrainConfig, m: ModelConfig) -> None:
    """precision=fp8 only where a route can run it: an FP8 run that silently trains in bf16 (and reports
    MFU as if FP8) is what this refuses."""
    if t.precision != "fp8":
        return
    if t.fp8_backend == "te":
        _check(m.linear_backend == "te",
               f"train.precision='fp8' with train.fp8_backend='te' needs model.linear_backend=te (got "
               f"{m.linear_backend!r}: its linears would run in bf16); set model.linear_backend=te, or "
               "train.fp8_backend=torchao with model.linear_backend=torch")
    else:
        _check(m.linear_backend == "torch",
               f"train.fp8_backend='torchao' converts plain nn.Linear layers and needs model.linear_backend=torch "
               f"(got {m.linear_backend!r}, TP=1 only); set model.linear_backend=torch, or use "
               "train.fp8_backend=te with model.linear_backend=te")
    allowed = TE_FP8_RECIPES if t.fp8_backend == "te" else TORCHAO_FP8_RECIPES
    _check(fp8_recipe_name(t) in allowed,
           f"train.fp8_recipe={t.fp8_recipe!r} is not a {t.fp8_backend} recipe; with train.fp8_backend="
           f"{t.fp8_backend!r} use one of {['auto', *allowed]}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)



def _apply_sections(cfg: Config, raw: Any, where: str) -> None:
    """{section: {key: value}} onto ``cfg``, every value checked as an override would be."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (model:, data:, train: ...)")
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of key: value")
        for key, value in values.items():
            _apply(cfg, section, key, value, where)


def from_dict(raw: dict, where: str = "config mapping", overrides: list[str] | None = None) -> Config:
    """Defaults <- ``raw`` ({section: {key: value}}, e.g. ``to_dict`` of a saved run) <- overrides; then
    validate. ``where`` names the source in errors (a file, a JSON key)."""
    cfg = Config()
    _apply_sections(cfg, raw, where)
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


Config.from_dict = staticmethod(from_dict)  # Config.from_dict(raw), as a constructor
