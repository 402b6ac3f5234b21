"""Hugging Face export (docs/export.md).

    python -m loopmoe.export.hf --checkpoint runs/X/checkpoints --out hf/X        # training -> HF folder
    python -m loopmoe.export.to_training --hf hf/X --out runs/Y/checkpoints       # HF folder -> training

``configuration_loopmoe.py`` and ``modeling_loopmoe.py`` are copied into every remote-code export, with
loopmoe/model/core.py and schedule.py beside them as ``loopmoe_core.py`` / ``loopmoe_schedule.py``; they
must stay self-contained (torch and transformers only). Nothing here is imported by the training code.
"""
