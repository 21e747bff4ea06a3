import dataclasses

import pytest
import yaml
from helpers import compvis_yaml

from ldm_sce import PRESETS, ConfigError, load_config
from ldm_sce.config import UNetConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_files_equal_presets(name):
    assert load_config(f"configs/models/{name}.yaml") == PRESETS[name]


@pytest.mark.parametrize("name", ["sd-v1", "sd-v2-base", "sd-v2-v"])
def test_original_inference_yaml_read_as_data(name, tmp_path):
    path = tmp_path / "inference.yaml"
    path.write_text(yaml.safe_dump(compvis_yaml(PRESETS[name])))
    assert load_config(path) == PRESETS[name]


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("preset: sd-v1\nunet:\n  model_chanels: 64\n")
    with pytest.raises(ConfigError, match="model_chanels"):
        load_config(path)
    path.write_text("preset: sd-v1\nparametrization: v\n")
    with pytest.raises(ConfigError, match="parametrization"):
        load_config(path)


def test_preset_overrides(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("preset: sd-v2-base\nparameterization: v\n")
    assert load_config(path) == PRESETS["sd-v2-v"]


def test_compvis_yaml_unsupported_target_is_named(tmp_path):
    d = compvis_yaml(PRESETS["sd-v1"])
    d["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.FrozenT5Embedder"
    with pytest.raises(ConfigError, match="FrozenT5Embedder"):
        load_config(d)
    with pytest.raises(ConfigError, match="not-a-preset"):
        load_config("not-a-preset")


def test_heads_and_skip_channels():
    assert PRESETS["sd-v1"].unet.heads(640) == (8, 80)
    assert PRESETS["sd-v2-base"].unet.heads(640) == (10, 64)
    assert PRESETS["sd-v1"].unet.skip_channels == (1280,) * 5 + (640,) * 3 + (320,) * 4
    with pytest.raises(ConfigError, match="exactly one"):
        dataclasses.replace(UNetConfig(), num_head_channels=64)
