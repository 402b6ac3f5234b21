"""Readable help: every config section has a one-line description and every field a meaning (its trailing
comment in loopmoe/config.py), shown with its default in --help and as comments in --print-config."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import yaml

from loopmoe.config import Config, load_config, to_dict
from loopmoe.config_help import commented_yaml, field_help, section_help
from tests.conftest import ROOT


def _sections():
    return [(f.name, f.default_factory()) for f in dataclasses.fields(Config)]  # type: ignore[misc]


def test_every_section_and_field_has_help():
    missing = []
    for name, sub in _sections():
        if len(section_help(type(sub))) < 10:
            missing.append(f"{name}: a docstring on {type(sub).__name__}")
        for field, text in field_help(type(sub)).items():
            if len(text.strip()) < 3:
                missing.append(f"{name}.{field}: a trailing '# comment' on its line in loopmoe/config.py")
    assert not missing, "add help text:\n" + "\n".join(missing)


def test_help_reads_the_comment_on_the_fields_line():
    from loopmoe.config import ModelConfig, TrainConfig

    assert field_help(ModelConfig)["n_heads"] == "query heads"
    assert field_help(TrainConfig)["zero_stage"] == "-1 = take it from ds_config"
    assert section_help(ModelConfig).startswith("The model.")


def test_help_prints_a_sentence_for_every_section_and_every_field():
    out = subprocess.run([sys.executable, "pretrain_loopmoe.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, check=True).stdout
    assert "OptimConfig(" not in out and "TrainConfig(" not in out  # no dataclass reprs
    lines = out.splitlines()
    for name, sub in _sections():
        head = [ln for ln in lines if ln.startswith(f"{name}:  ")]
        assert len(head) == 1 and head[0] == f"{name}:  {section_help(type(sub))}", name
        for field, text in field_help(type(sub)).items():
            want = f"  {name}.{field} = {getattr(sub, field)!r}  # {text}"
            assert want in lines, want


def test_print_config_is_commented_yaml_that_loads_back_equal():
    cfg = load_config("configs/tiny_loopmoe.yaml", ["model.exit_loss_weights=[0.5]", "data.prefixes=a,b",
                                                    "data.tokenizer_model=", "logging.run_dir=runs/x y"])
    text = commented_yaml(cfg)
    assert yaml.safe_load(text) == to_dict(cfg)
    assert "  n_heads: 8  # query heads" in text.splitlines()
    out = subprocess.run([sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml",
                          "--print-config", "train.steps=7"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True)
    assert yaml.safe_load(out.stdout)["train"]["steps"] == 7
    assert "  steps: 7  # optimizer steps to train for" in out.stdout
    assert out.stderr == ""  # --print-config prints no start-up notes
