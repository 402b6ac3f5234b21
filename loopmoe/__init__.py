"""LoopMoE: pretraining looped Mixture-of-Experts language models on megatron-core and DeepSpeed."""

__version__ = "0.1.0"
