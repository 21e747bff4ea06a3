"""Key manifest of the full-size presets, built on the meta device (no weights allocated).

The key set must be exactly the original files' (counts from real SD1.5 / SD2.1 files, schedule buffers and
position_ids included), and an independent converter (diffusers' single-file code) must map every UNet, VAE
and text key, with its shape, onto diffusers/transformers models with nothing left over."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as su
from helpers import hf_text_model

from ldm_sce import PRESETS, LatentDiffusion
from ldm_sce.config import to_compvis_yaml
from ldm_sce.diffusion import SCHEDULE_BUFFERS


def meta_state_dict(preset):
    with torch.device("meta"):
        return LatentDiffusion(PRESETS[preset]).state_dict()


@pytest.mark.parametrize(
    "preset,n_keys,n_unet,n_vae,n_text",
    [("sd-v1", 1143, 686, 248, 197), ("sd-v2-v", 1240, 686, 248, 294)],
)
def test_key_counts(preset, n_keys, n_unet, n_vae, n_text):
    sd = meta_state_dict(preset)
    assert len(sd) == n_keys
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == n_unet
    assert sum(k.startswith("first_stage_model.") for k in sd) == n_vae
    assert sum(k.startswith("cond_stage_model.") for k in sd) == n_text
    assert all(sd[name].shape == (1000,) for name in SCHEDULE_BUFFERS)
    # UNet parameter count of the paper's table (859.52M for SD1.5)
    if preset == "sd-v1":
        assert sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model.")) == 859_520_964


def _load_meta(module, sd):
    """strict load with assign: every key of `module` present, none extra, every shape equal."""
    module.load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize("preset", ["sd-v1", "sd-v2-v"])
def test_diffusers_maps_every_key(preset):
    cfg = PRESETS[preset]
    sd = meta_state_dict(preset)
    yaml_dict = to_compvis_yaml(cfg)
    n_unet = sum(k.startswith("model.diffusion_model.") for k in sd)
    n_vae = sum(k.startswith("first_stage_model.") for k in sd)
    with torch.device("meta"):
        ucfg = su.create_unet_diffusers_config_from_ldm(yaml_dict, sd)
        unet = UNet2DConditionModel(**ucfg)
        vcfg = su.create_vae_diffusers_config_from_ldm(yaml_dict, sd)
        vae = AutoencoderKL(**vcfg)
        t = cfg.text
        # diffusers builds SD2's tower without the unused 24th block and skips its keys
        text = hf_text_model(t, layers=t.layers - (t.arch == "open_clip"))
    unet_sd = su.convert_ldm_unet_checkpoint(sd, ucfg)
    assert len(unet_sd) == n_unet
    _load_meta(unet, unet_sd)
    vae_sd = su.convert_ldm_vae_checkpoint(sd, vcfg)
    assert len(vae_sd) == n_vae
    _load_meta(vae, vae_sd)
    if t.arch == "clip":
        text_sd = su.convert_ldm_clip_checkpoint(sd)
        assert len(text_sd) == sum(k.startswith("cond_stage_model.") for k in sd)
    else:
        text_sd = su.convert_open_clip_checkpoint(text, sd)
    text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items() if not k.endswith("position_ids")}
    missing, unexpected = text.load_state_dict(text_sd, strict=False, assign=True)
    assert not missing, missing
    # diffusers converts SD2's pooled-output projection for CLIPTextModelWithProjection; nothing else is left
    assert set(unexpected) <= {"text_projection.weight"}, unexpected
