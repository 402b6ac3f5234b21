"""THE one place that chooses the linear layers: megatron-core tensor-parallel, Transformer Engine, or torch.

    lin = Linears(cfg, sequence_parallel=False)
    qkv  = lin.column(d, n_out, std)            # output features split across TP ranks
    proj = lin.row(n_in, d, std)                # input features split across TP ranks, output all-reduced
    emb  = lin.embedding(vocab, d, std)         # vocabulary split across TP ranks
    head = lin.column(d, vocab, std, gather_output=True)

Every module returned takes and returns batch-first activations ``[b, s, features]`` and returns a
tensor (megatron's ``(output, bias)`` tuples are unwrapped here). Nothing else in the model knows
which backend is in use.

Backends (``ModelConfig.linear_backend``):
- ``"megatron"`` (default): megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` /
  ``VocabParallelEmbedding``. Needs ``megatron.core.parallel_state`` initialised (a world of one is
  enough); the TP size is read from it. Weights are initialised on the CPU path
  (``use_cpu_initialization=True``): the full master weight is drawn from the global RNG and split,
  so a model built with the same seed has the same logical weights at every TP size.
- ``"te"``: Transformer Engine ``te.pytorch.Linear`` for the block linears (attention, shared and
  dense FFN), for FP8 on Hopper GPUs. Embedding and LM head stay megatron-core (kept in high
  precision, as is usual for FP8 recipes); the routed experts are two TE ``GroupedLinear`` (so FP8
  covers them too; see ``_te_experts_class``).
- ``"torch"``: plain ``nn.Embedding`` / ``nn.Linear``; single process (TP=1) only. Used for
  meta-device parameter/FLOP counting and as the reference in tests.

Sequence parallelism (megatron's, TP>1 only): activations between the TP regions are split along the
sequence (``[b, s/tp, d]``). Megatron and TE gather/scatter along dim 0, i.e. they expect
``[s, b, h]``; the wrappers below transpose around the library call so the model stays batch-first.
Parameters outside TP linears that then see only a sequence shard (norms, router, experts, IterAdaLN)
get ``param.sequence_parallel = True`` (megatron's convention) so the parallel wrapper all-reduces
their gradients over the TP group (see ``mark_sequence_parallel``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

FP8_HELP = (
    "linear_backend='te' (FP8) needs Transformer Engine and a CUDA GPU (FP8 needs a Hopper GPU, e.g. "
    "H100): install it there with `pip install .[fp8]`, or use linear_backend='megatron' (default) or "
    "'torch'."
)


def normal_init(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def tp_size() -> int:
    """Tensor-parallel world size from megatron-core's parallel_state (1 when it is not initialised)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover
        return 1
    return ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1


def megatron_config(cfg, sequence_parallel: bool = False):
    """A minimal megatron-core ``TransformerConfig`` mirroring our ModelConfig (the TP linears read it;
    megatron's pipeline schedules also want one on the model)."""
    from megatron.core.transformer import TransformerConfig

    tp = tp_size()
    return TransformerConfig(
        num_layers=cfg.n_executed_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
        num_query_groups=cfg.n_kv_heads, kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.dense_hidden if cfg.ffn == "dense" else cfg.expert_hidden,
        tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
        use_cpu_initialization=True, perform_initialization=True,
        params_dtype=torch.get_default_dtype(), gradient_accumulation_fusion=False,
    )


def _seq_first(fn, x: torch.Tensor, sp: bool) -> torch.Tensor:
    """Run ``fn`` on ``[s, b, h]`` when sequence parallel (the libraries split dim 0), else as is."""
    if not sp:
        return fn(x)
    return fn(x.transpose(0, 1).contiguous()).transpose(0, 1)


class _GatherLastDim(torch.autograd.Function):
    """[..., n/tp] -> [..., n] over the TP group; backward keeps this rank's slice. (megatron's own
    gather_output allocates on ``torch.cuda.current_device()``, which fails on CPU-only machines.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.group.size(), dim=-1)[ctx.group.rank()].contiguous(), None


@functools.cache
def _megatron_classes():
    from megatron.core import tensor_parallel as mtp

    # megatron's linears save an empty ``_extra_state`` (a TE-compatibility slot): we drop it so every
    # backend has the same state-dict keys (loading still accepts it).
    class Column(mtp.ColumnParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x):  # [b, s(/tp), in] -> [b, s, out/tp] (or [b, s, out] with gather_out)
            y = _seq_first(lambda t: super(Column, self).forward(t)[0], x, self.sequence_parallel)
            return _GatherLastDim.apply(y, self.tp_group) if self.gather_out else y

    class Row(mtp.RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x):  # [b, s, in/tp] -> [b, s(/tp), out]
            return _seq_first(lambda t: super(Row, self).forward(t)[0], x, self.sequence_parallel)

    class Embedding(mtp.VocabParallelEmbedding):
        def forward(self, tokens):  # [b, s] -> [b, s(/tp), d]
            out = super().forward(tokens)  # with reduce_scatter_embeddings: [s/tp, b, d]
            return out.transpose(0, 1) if self.reduce_scatter_embeddings else out

    return Column, Row, Embedding


@functools.cache
def _te_class(te):
    class TELinear(te.Linear):
        def forward(self, x):  # batch-first in and out, like the megatron wrappers
            return _seq_first(lambda t: super(TELinear, self).forward(t), x, self.sequence_parallel)

    return TELinear


def _replicated_over_tp(module: nn.Module) -> None:
    """TE's GroupedLinear marks every weight as a TP partition along dim 0 (``tensor_model_parallel=True``,
    set by reset_parameters, TE 2.8) even when built without a TP group, as our experts are: they are
    replicated over the TP ranks. Unmarked, so that the checkpoint gives them no TP offset and, under
    sequence parallelism, mark_sequence_parallel tags them for the TP all-reduce of their gradients."""
    for p in module.parameters():
        p.tensor_model_parallel = False


@functools.cache
def _te_experts_class(te):
    from loopmoe.model.moe import group_rows

    class TEExperts(nn.Module):
        """Routed SwiGLU experts as two TE ``GroupedLinear`` (fc1: d -> 2h gate|up, fc2: h -> d), so
        that FP8 covers the experts, most of an MoE's FLOPs. Built from a ``moe.Experts`` (same weights
        for one seed on every backend). ``state_dict()`` shows that module's stacked ``w1`` [E, d, 2h] /
        ``w2`` [E, h, d] (export and in-memory loads do not depend on the backend); the training
        checkpoint writes the per-expert weights ``fc1.weight{e}`` [2h, d] / ``fc2.weight{e}`` [d, h]
        ([out, in]) as their slices of those same stacked keys, with their EP offsets and optimizer state,
        as ``stacked_experts`` declares (train/checkpoint.py ``expert_slots``).

        TE takes the group sizes as a host list (``m_splits``): one device-to-host read per layer,
        which its API needs. Every group, the last included, is padded to a multiple of 16 rows (TE's
        FP8 GEMMs assert it; bf16 needs 8) by ``core.group_rows``, under any EP and routing.
        """

        align = 16
        stacked_experts = {"fc1": "w1", "fc2": "w2"}  # child GroupedLinear -> the stacked weight it holds

        def __init__(self, ref):
            super().__init__()
            n, d, h2 = ref.w1.shape
            # TE runs on CUDA only; elsewhere (a stand-in GroupedLinear in the CPU tests) the reference's device
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else ref.w1.device
            dt = ref.w1.dtype
            self.fc1 = te.GroupedLinear(n, d, h2, bias=False, params_dtype=dt, device=dev)
            self.fc2 = te.GroupedLinear(n, h2 // 2, d, bias=False, params_dtype=dt, device=dev)
            self.n = n
            self._load_stacked(ref.w1.detach(), ref.w2.detach())
            _replicated_over_tp(self)
            for p in self.parameters():  # the expert-parallel marks of the stacked weights
                for attr in ("allreduce", "group_name"):
                    if hasattr(ref.w1, attr):
                        setattr(p, attr, getattr(ref.w1, attr))
            self._register_state_dict_hook(TEExperts._to_stacked)
            self._register_load_state_dict_pre_hook(self._from_stacked)

        @torch.no_grad()
        def _load_stacked(self, w1, w2):
            for e in range(self.n):  # TE weights are [out, in]
                getattr(self.fc1, f"weight{e}").copy_(w1[e].T)
                getattr(self.fc2, f"weight{e}").copy_(w2[e].T)

        def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
            w1 = torch.stack([getattr(self.fc1, f"weight{e}").T for e in range(self.n)])  # [E, d, 2h]
            w2 = torch.stack([getattr(self.fc2, f"weight{e}").T for e in range(self.n)])  # [E, h, d]
            return w1, w2

        @staticmethod
        def _to_stacked(module, state, prefix, _meta):
            for fc in ("fc1", "fc2"):
                for e in range(module.n):
                    state.pop(f"{prefix}{fc}.weight{e}", None)
            w1, w2 = module.stacked()
            state[prefix + "w1"], state[prefix + "w2"] = w1.detach(), w2.detach()
            return state

        def _from_stacked(self, state, prefix, *_args):
            if prefix + "w1" in state:
                w1, w2 = state.pop(prefix + "w1"), state.pop(prefix + "w2")
                for e in range(self.n):
                    state[f"{prefix}fc1.weight{e}"] = w1[e].T.contiguous()
                    state[f"{prefix}fc2.weight{e}"] = w2[e].T.contiguous()

        def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:  # [N, d] -> [N, d]
            xp, pos, sizes = group_rows(x, counts, self.align)  # xp [n_pad, d]; every size % 16 == 0
            splits = sizes.tolist()  # TE's API takes host sizes (see the class docstring)
            g, u = self.fc1(xp, splits).chunk(2, dim=-1)  # [n_pad, h] each
            return self.fc2(torch.nn.functional.silu(g) * u, splits).index_select(0, pos)

    return TEExperts


class Linears:
    """Factory for the model's linear layers and embedding; see the module docstring."""

    def __init__(self, cfg, sequence_parallel: bool = False):
        self.backend = cfg.linear_backend
        if self.backend not in ("megatron", "te", "torch"):
            raise ValueError(f"model.linear_backend={self.backend!r}: use 'megatron', 'te' or 'torch'")
        self.tp = 1 if self.backend == "torch" else tp_size()
        self.sequence_parallel = bool(sequence_parallel) and self.tp > 1
        if self.backend == "te":
            if not torch.cuda.is_available():
                raise RuntimeError(FP8_HELP + " No CUDA device is visible here.")
            try:
                import transformer_engine.pytorch as te  # only ever imported in this branch
            except ImportError as e:
                raise RuntimeError(FP8_HELP + f" (import failed: {e})") from e
            self._te = te
        if self.backend == "torch" and sequence_parallel:
            raise ValueError("sequence_parallel needs linear_backend='megatron' or 'te' (TP > 1)")
        self.mcore = megatron_config(cfg, self.sequence_parallel) if self.backend != "torch" else None

    def column(self, n_in: int, n_out: int, std: float, gather_output: bool = False) -> nn.Module:
        if self.backend == "torch":
            return _torch_linear(n_in, n_out, std)
        if self.backend == "te" and not gather_output:
            return self._te_linear(n_in, n_out, std, "column")
        Column, _, _ = _megatron_classes()
        col = Column(n_in, n_out, config=self.mcore, init_method=normal_init(std), bias=False)
        col.gather_out = gather_output and self.tp > 1
        return col

    def row(self, n_in: int, n_out: int, std: float) -> nn.Module:
        if self.backend == "torch":
            return _torch_linear(n_in, n_out, std)
        if self.backend == "te":
            return self._te_linear(n_in, n_out, std, "row")
        _, Row, _ = _megatron_classes()
        return Row(n_in, n_out, config=self.mcore, init_method=normal_init(std), bias=False,
                   input_is_parallel=True, skip_bias_add=False)

    def experts(self, cfg, ep_size: int, ep_rank: int, out_std: float) -> nn.Module:
        """The routed experts: ``moe.Experts`` (stacked weights, grouped GEMM) or, on the ``te``
        backend, the same experts as TE ``GroupedLinear``s. Both: ``experts(x [N, d], counts [E]) -> [N, d]``."""
        from loopmoe.model.moe import Experts

        if self.backend != "te":
            return Experts(cfg, ep_size, ep_rank, out_std)
        if cfg.dispatch == "einsum":
            raise ValueError("model.dispatch='einsum' (capacity buffers) needs linear_backend='megatron' or "
                             "'torch': TE's GroupedLinear runs the index dispatch only")
        return _te_experts_class(self._te)(Experts(cfg, ep_size, ep_rank, out_std))

    def embedding(self, vocab: int, d: int, std: float) -> nn.Module:
        if vocab % self.tp:
            raise ValueError(f"model.vocab_size={vocab} must be divisible by TP={self.tp} (pad the vocabulary)")
        if self.backend == "torch":
            emb = nn.Embedding(vocab, d)
            nn.init.normal_(emb.weight, 0.0, std)
            return emb
        _, _, Embedding = _megatron_classes()
        return Embedding(vocab, d, init_method=normal_init(std), config=self.mcore,
                         reduce_scatter_embeddings=self.sequence_parallel)

    def _te_linear(self, n_in: int, n_out: int, std: float, mode: str) -> nn.Module:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        tp = self.tp > 1  # shards drawn from megatron's TP RNG tracker (model_parallel_cuda_manual_seed)
        if tp:
            _require_tp_rng_tracker()
        return _te_class(self._te)(
            n_in, n_out, bias=False, init_method=normal_init(std), sequence_parallel=self.sequence_parallel,
            tp_group=ps.get_tensor_model_parallel_group() if tp else None, tp_size=self.tp,
            get_rng_state_tracker=get_cuda_rng_tracker if tp else None, parallel_mode=mode,
            params_dtype=torch.get_default_dtype())

    def mark_sequence_parallel(self, module: nn.Module) -> None:
        """Tag replicated parameters that see only a sequence shard (their grads need a TP all-reduce)."""
        if not self.sequence_parallel:
            return
        for p in module.parameters():
            if not getattr(p, "tensor_model_parallel", False):
                p.sequence_parallel = True


def _require_tp_rng_tracker() -> None:
    """TE draws each TP shard inside megatron's "model-parallel-rng" state; say how to seed it rather than
    fail inside TE ("model-parallel-rng is not added")."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    name = "model-parallel-rng"  # the name TE forks by default (megatron-core 0.16.1, tensor_parallel/random.py)
    if name not in get_cuda_rng_tracker().get_states():
        raise RuntimeError(f"linear_backend='te' with TP > 1 needs megatron's {name!r} RNG state: call "
                           "loopmoe.parallel.distributed.seed_model_parallel_rng(seed) after init_distributed "
                           "and before building the model (loopmoe.train.setup.build_model does)")


def _torch_linear(n_in: int, n_out: int, std: float) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=False)
    nn.init.normal_(lin.weight, 0.0, std)
    return lin
