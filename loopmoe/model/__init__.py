"""The LoopMoE model (also Vanilla MoE with n_loop=0, and dense variants with ffn="dense").

    from loopmoe.model import LoopMoEModel, ModelOutput, RoutingRecord
    model = LoopMoEModel(cfg.model)          # plain nn.Module on the current default device
    out = model(tokens, labels=labels)       # out.logits [b, s, V], out.loss

See docs/model.md.
"""
from loopmoe.model.model import Block, LoopMoEModel, ModelOutput, RoutingRecord

__all__ = ["Block", "LoopMoEModel", "ModelOutput", "RoutingRecord"]
