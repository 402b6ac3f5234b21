"""lm-evaluation-harness task configs for the LoopMoE paper's nine benchmarks, read from local files.

The YAMLs here are templates: ``python -m loopmoe.eval`` (or ``--write-tasks DIR``) resolves their
``@FILE:name/split@``, ``@FORMAT@`` and ``@TASKS@`` placeholders against ``--data-dir`` and writes
ready-to-use configs. See docs/export.md, "Evaluation".
"""
