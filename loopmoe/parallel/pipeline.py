"""Pipeline parallelism: one stage of the model, run by megatron-core's 1F1B schedule.

    stage = PipelineStage(model, lo, hi, config)      # unique layers [lo, hi) of prelude|loop|coda
    sums = pipeline_forward_backward(stage, batches, n_micro, micro_batch, seq_len)

A stage holds the model's own modules under the model's own names (``prelude.3...``, ``loop.0...``,
``coda.1...``, ``embed``, ``norm``, ``head``), so its state dict is a slice of the full model's: the
checkpoint needs no renaming. The loop block (all K shared layers, all R iterations, ``iter_embed``) is
always inside one stage (layout.py enforces it), so shared weights never cross a stage.

Between stages the hidden state travels sequence-first, ``[s(/tp), b, d]``, as megatron's p2p expects
(``get_tensor_shapes``); inside a stage the model is batch-first. Each stage's MoE auxiliary losses
(lb, z) are attached to its output with ``_AttachAux`` (megatron's MoEAuxLossAutoScaler trick): the
backward of the hidden state also back-propagates ``scale * aux`` with scale = 1/micro-batches, the
same factor the schedule applies to the last stage's loss. Under sequence parallelism every TP rank
routes its own sequence shard, so the auxiliary losses are also divided by TP (their gradients are
summed over TP): the mean over shards, as a single process computes the z-loss.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import nn

from loopmoe.model.model import LoopMoEModel, LayerRunner, ModelOutput, lm_loss

log = logging.getLogger(__name__)


class _AttachAux(torch.autograd.Function):
    """Identity on ``h``; its backward also sends gradient ``scale`` into ``aux``."""

    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.scale), None


def aux_scale() -> float:
    """1/TP under sequence parallelism (TP ranks hold different tokens), else 1."""
    from megatron.core import parallel_state as ps

    return 1.0 / ps.get_tensor_model_parallel_world_size()


class PipelineStage(nn.Module):
    """Unique layers [lo, hi) of a LoopMoEModel (plus the embedding on the first stage, norm and head on
    the last). ``forward`` takes the micro-batch on every stage (only the first reads the tokens, only
    the last the labels); the input hidden state of later stages comes from ``set_input_tensor``."""

    def __init__(self, model: LoopMoEModel, lo: int, hi: int, config):
        super().__init__()
        from megatron.core.enums import ModelType

        cfg = model.cfg
        P, K = cfg.n_prelude, cfg.n_loop
        self.cfg, self.config, self.model_type = cfg, config, ModelType.encoder_or_decoder
        self.lo, self.hi = lo, hi
        self.is_first, self.is_last = lo == 0, hi == cfg.n_unique_layers
        self.embed = model.embed if self.is_first else None
        self.prelude = nn.ModuleDict({str(i): b for i, b in enumerate(model.prelude) if lo <= i < hi})
        has_loop = K > 0 and lo <= P < hi
        self.loop = model.loop if has_loop else None
        self.iter_embed = model.iter_embed if has_loop else None
        self.coda = nn.ModuleDict({str(c): b for c, b in enumerate(model.coda) if lo <= P + K + c < hi})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.n_iters = model.n_iters
        self.recompute = model.recompute  # train.recompute (loopmoe/model/recompute.py), read by LayerRunner
        self.schedule = model.schedule
        self.sequence_parallel = model.sequence_parallel
        self.aux_weight = 1.0  # 1/TP under sequence parallelism (see aux_scale)
        self.num_micro = 1  # micro-batches of the current step (the schedule divides the loss by it)
        self.input_tensor = None
        self.sums = torch.zeros(3)  # lm_loss (last stage), lb, z summed over this step's micro-batches

    # megatron's schedules call this before every forward: [hidden [s, b, d]] or [None] on stage 0
    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    @property
    def layers(self) -> list:
        return [*self.prelude.values(), *(self.loop or []), *self.coda.values()]

    update_router_biases = LoopMoEModel.update_router_biases  # uses cfg, layers, sequence_parallel

    def forward(self, tokens, labels=None, loss_mask=None):
        cfg = self.cfg
        run = LayerRunner(self, {}, False, None)  # the training model's per-layer runner (aux-loss sums)
        h = self.embed(tokens) if self.is_first else self.input_tensor.transpose(0, 1)  # [b, s(/tp), d]
        h = self.schedule.run(h, run.layer, self.iter_embed, lo=self.lo, hi=self.hi)  # this stage's slice
        lb, z = run.lb, run.z
        aux = cfg.lb_loss_coef * lb + cfg.z_loss_coef * z
        # summed on the device (no host read per micro-batch); read once per step
        self.sums = self.sums.to(lb.device) + torch.stack([torch.zeros_like(lb), lb.detach(), z.detach()]).float()
        if not self.is_last:
            if aux.requires_grad:
                h = _AttachAux.apply(h, aux, self.aux_weight / self.num_micro)
            return h.transpose(0, 1).contiguous()  # [s(/tp), b, d] for the next stage
        logits = self.head(self.norm(h))  # [b, s, V]
        out = ModelOutput(logits=logits, lb_loss=lb, z_loss=z, aux_loss=aux)
        if labels is not None:
            out.lm_loss = lm_loss(logits, labels, loss_mask)
            out.loss = out.lm_loss + self.aux_weight * aux  # the schedule divides it by the micro-batches
            self.sums[0] += out.lm_loss.detach().to(self.sums.device)
        return out


def pipeline_forward_backward(stage: PipelineStage, batches, n_micro: int, micro_batch: int, seq_len: int,
                              forward_only: bool = False, autocast=contextlib.nullcontext) -> torch.Tensor:
    """Run megatron-core's schedule (1F1B for PP > 1) over ``n_micro`` micro-batches drawn from
    ``batches`` (every stage draws them, so data iterators stay aligned). Gradients accumulate on the
    stage's parameters; reduction and the optimizer step are the caller's. Returns this rank's
    [loss, lm_loss, lb, z] sums over the micro-batches: lm only on the last stage, lb and z of this
    stage's layers, loss = lm + this stage's weighted aux. Summed over the world and divided by
    TP x DP they give the model's mean metrics. ``autocast``: a zero-argument callable giving the
    context each micro-batch's forward runs in, e.g. ``lambda: fp8_autocast(cfg)`` (loopmoe/parallel/fp8.py);
    the backward runs outside it, as TE's FP8 expects."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from loopmoe.parallel.megatron_cpu_adapter import cuda_to_cpu

    mbs = [next(batches) for _ in range(n_micro)]
    stage.sums = torch.zeros(3)
    stage.num_micro = n_micro
    stage.aux_weight = aux_scale() if stage.sequence_parallel else 1.0

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        with autocast():  # one region per micro-batch forward, as in the data-parallel step
            out = model(b["tokens"], labels=b["labels"], loss_mask=b["loss_mask"])
        return out, lambda o: (o.loss, {})

    with cuda_to_cpu():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=stage, num_microbatches=n_micro,
            seq_length=seq_len, micro_batch_size=micro_batch, forward_only=forward_only)
    lm, lb, z = stage.sums.tolist()
    cfg = stage.cfg
    return torch.tensor([lm + cfg.lb_loss_coef * lb + cfg.z_loss_coef * z, lm, lb, z])


class PipelineEvalModel:
    """What the validation callback calls as ``model(tokens, ...)`` under PP: a forward-only pass through
    every stage; the last stage's logits are broadcast to the pipeline group so every rank returns them.
    Routing records and early-exit logits are not collected across stages (None / empty)."""

    def __init__(self, stage: PipelineStage):
        self.stage, self.cfg = stage, stage.cfg
        missing = (["val/loss_exit* (early-exit losses)"] if self.cfg.is_looped else []) + \
                  (["val/imbalance_l*, val/divergence_l* (routing metrics)"] if self.cfg.ffn == "moe" else [])
        if missing:  # said once at start-up, not left for someone to notice missing curves
            log.warning("pipeline parallelism: validation reports val/loss only; %s are not collected across "
                        "stages (python -m loopmoe.analysis.early_exit / .routing compute them from a checkpoint)",
                        " and ".join(missing))

    @property
    def training(self) -> bool:
        return self.stage.training

    def train(self, mode: bool = True):
        self.stage.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def update_router_biases(self):
        self.stage.update_router_biases()

    @torch.no_grad()
    def __call__(self, tokens, labels=None, loss_mask=None, **_ignored) -> ModelOutput:
        from megatron.core import parallel_state as ps

        group = ps.get_pipeline_model_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        me = ps.get_pipeline_model_parallel_rank()
        st = self.stage
        b, s = tokens.shape
        tp = ps.get_tensor_model_parallel_world_size() if st.sequence_parallel else 1
        dtype = st.config.pipeline_dtype or torch.get_default_dtype()
        dev = st.rope_cos.device
        if not st.is_first:
            h = torch.empty(s // tp, b, self.cfg.d_model, dtype=dtype, device=dev)
            dist.recv(h, src=ranks[me - 1], group=group)
            st.set_input_tensor([h])
        sums = st.sums.clone()
        out = st(tokens)
        st.sums = sums
        if not st.is_last:
            dist.send(out, dst=ranks[me + 1], group=group)
            logits = torch.empty(b, s, self.cfg.vocab_size, dtype=torch.float32, device=dev)
        else:
            logits = out.logits.float().contiguous()
        dist.broadcast(logits, src=ranks[-1], group=group)
        return ModelOutput(logits=logits)
