"""The config system: presets, overrides, validation messages, --help."""
import glob
import os
import subprocess
import sys

import pytest
import yaml

from loopmoe.config import Config, ConfigError, apply_overrides, load_config, save_config
from tests.conftest import ROOT


def test_every_preset_loads_and_validates():
    presets = glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    assert presets
    for p in presets:
        load_config(p)


def test_overrides_are_typed():
    cfg = load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"),
                      ["train.steps=7", "optim.lr=1e-3", "model.aux_free_bias=true", "data.prefixes=[a,b]",
                       "data.weights=0.3,0.7", "model.adaln=iter"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3 and cfg.model.aux_free_bias is True
    assert cfg.data.prefixes == ["a", "b"] and cfg.data.weights == [0.3, 0.7]
    assert cfg.model.adaln == "iter"


@pytest.mark.parametrize("override, words", [
    ("train.stepz=5", ["train", "stepz", "did you mean 'steps'"]),
    ("trian.steps=5", ["trian", "did you mean 'train'"]),
    ("train.steps=abc", ["train.steps", "integer"]),
    ("train.steps=2.5", ["train.steps", "integer"]),
    ("model.adaln=sometimes", ["model.adaln", "both"]),
    ("model.top_k=99", ["model.top_k", "n_experts"]),
    ("model.n_heads=5", ["model.n_heads", "n_kv_heads"]),
    ("data.split=90,10", ["data.split", "98,1,1"]),
    ("optim.min_lr=1", ["min_lr", "lr"]),
    ("steps=5", ["section.key=value"]),
])
def test_bad_values_name_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, "configs/tiny_loopmoe.yaml"), [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert "bad.yaml" in str(e.value) and "d_model" in str(e.value)


def test_saved_config_round_trips(tmp_path):
    cfg = apply_overrides(Config(), ["train.steps=11", "model.exit_loss_weights=[0.5]"])
    save_config(cfg, str(tmp_path / "c.yaml"))
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["steps"] == 11


def test_cli_help_lists_sections_and_rejects_bad_override():
    out = subprocess.run([sys.executable, "pretrain_loopmoe.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    for field in ("model.loop_iters", "train.steps", "checkpoint.interval", "parallel.tp", "optim.schedule"):
        assert field in out.stdout
    bad = subprocess.run([sys.executable, "pretrain_loopmoe.py", "--config", "configs/tiny_loopmoe.yaml",
                          "train.stepz=3"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'steps'" in bad.stderr


def test_from_dict_equals_the_yaml_it_was_saved_from(tmp_path):
    """Config.from_dict (the reverse converter reads the training config of an export with it) gives the
    config that saving to YAML and loading gives, and names its source and the key in errors."""
    from loopmoe.config import to_dict

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_loopmoe.yaml"), ["model.loop_iters=3", "train.steps=7"])
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert Config.from_dict(to_dict(cfg)) == load_config(str(tmp_path / "c.yaml")) == cfg
    assert Config.from_dict({}) == load_config(None)
    with pytest.raises(ConfigError, match=r"meta.json: training_config: section 'model': unknown key 'loop_iter'"):
        Config.from_dict({"model": {"loop_iter": 2}}, "meta.json: training_config")
    with pytest.raises(ConfigError, match="model.n_loop"):  # validated like a loaded file
        Config.from_dict({"model": {"n_loop": -1}})
