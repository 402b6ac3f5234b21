"""Parallelism applied from outside the model (see docs/parallelism.md).

layout.py                 start-up validation of TP x PP x DP (+ EP, SP, stage split), suggestions
distributed.py            torch.distributed from torchrun / srun / mpirun + megatron parallel_state
groups.py                 DeepSpeed's expert groups inside megatron's DP group; the ``mpu`` adapter
parallelize.py            parallelize(model, cfg, layout): SP gradient hooks, MoE visible to DeepSpeed, PP stage
pipeline.py               PipelineStage and megatron-core's 1F1B schedule
megatron_cpu_adapter.py   the one CPU adapter for megatron-core's CUDA assumptions
"""
