import dataclasses

import pytest
import torch
import yaml

from ldm_sce import PRESETS, ConfigError, load_config
from ldm_sce.config import UNetConfig, to_compvis_yaml
from ldm_sce.unet import UNetModel


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_files_equal_presets(name):
    assert load_config(f"configs/models/{name}.yaml") == PRESETS[name]


@pytest.mark.parametrize("name", ["sd-v1", "sd-v2-base", "sd-v2-v"])
def test_original_inference_yaml_round_trip(name, tmp_path):
    # to_compvis_yaml and its inverse, through a YAML file read as data (the original names the text tower
    # by class only, so the tiny presets' text sizes cannot be written in it)
    path = tmp_path / "inference.yaml"
    path.write_text(yaml.safe_dump(to_compvis_yaml(PRESETS[name])))
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
    path.write_text("preset: sd-v2-base\nparameterization: v\nimage_size: 96\n")
    assert load_config(path) == PRESETS["sd-v2-v"]


def test_compvis_yaml_unsupported_target_is_named(tmp_path):
    d = to_compvis_yaml(PRESETS["sd-v1"])
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


@pytest.mark.parametrize(
    "name,hw", [("tiny-sd1", (8, 12)), ("tiny-sd2", (16, 8)), ("sd-v1", (64, 64)), ("sd-v2-v", (96, 64))]
)
def test_skip_shapes_are_what_the_forward_pushes(name, hw):
    cfg = PRESETS[name].unet
    with torch.device("meta"):  # shapes only: no weights are allocated
        unet = UNetModel(cfg)
        x, t, c = torch.zeros(1, 4, *hw), torch.zeros(1), torch.zeros(1, 77, cfg.context_dim)
    pushed = []
    hooks = [b.register_forward_hook(lambda m, a, o: pushed.append(tuple(o.shape[1:]))) for b in unet.input_blocks]
    with torch.no_grad():
        assert unet(x, t, c).shape == x.shape
    for h in hooks:
        h.remove()
    assert cfg.skip_shapes(*hw) == pushed[::-1]  # decoder (pop) order
    assert [ch for ch, _, _ in pushed[::-1]] == list(cfg.skip_channels)
    assert [kind for kind, _, _ in cfg.encoder_blocks].count("down") == len(cfg.channel_mult) - 1


def test_image_geometry():
    sd1, toy = PRESETS["sd-v1"], load_config("configs/toy/model.yaml")
    assert (sd1.vae.downsample_factor, sd1.unet.size_multiple, sd1.image_multiple) == (8, 8, 64)
    assert sd1.latent_size(512, 768) == (64, 96) and sd1.condition_size(512, 768) == (512, 768)
    # the toy VAE halves twice (64x64 images, 16x16 latents); the hint encoder still wants 8x the latent
    assert (toy.vae.downsample_factor, toy.image_multiple) == (4, 16)
    assert toy.latent_size(64, 64) == (16, 16) and toy.condition_size(64, 64) == (128, 128)


def test_a_fresh_unet_has_the_compvis_zero_init():
    unet = UNetModel(PRESETS["tiny-sd1"].unet)
    assert unet.out[2].weight.abs().max() == 0 and unet.input_blocks[1][0].out_layers[3].weight.abs().max() == 0
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(unet(x, t, c), torch.zeros_like(x))  # the output conv is zero: so is the output
