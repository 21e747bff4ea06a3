"""fp32 parity against an independent implementation: diffusers/transformers models built from the same
original-format file by diffusers' own single-file conversion code. Tolerance: 1e-5 of max|output|."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as su
from helpers import hf_text_model

from ldm_sce import PRESETS, load_model
from ldm_sce.config import to_compvis_yaml
from ldm_sce.text_encoders import tokenize


def oracle_state_dict(path):
    """Read the file with torch's own restricted loader (our writer pickles plain tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_close(ours, ref, rel=1e-5):
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * {scale:.3g}"


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def loaded(request, tiny_ckpts):
    _, path, preset = tiny_ckpts[request.param]
    cfg = PRESETS[preset]
    return load_model(path, config=preset), oracle_state_dict(path), to_compvis_yaml(cfg), cfg


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (16, 4)])
def test_unet_matches_diffusers(loaded, hw):
    model, ckpt, yaml_dict, cfg = loaded
    dcfg = su.create_unet_diffusers_config_from_ldm(yaml_dict, ckpt)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([1, 999])
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        ours, theirs = model.apply_model(x, t, ctx), ref(x, t, ctx).sample
    assert ours.shape == x.shape
    assert_close(ours, theirs)


@pytest.mark.parametrize("hw", [(16, 16), (16, 24)])
def test_vae_matches_diffusers(loaded, hw):
    model, ckpt, yaml_dict, _ = loaded
    dcfg = su.create_vae_diffusers_config_from_ldm(yaml_dict, ckpt)
    ref = AutoencoderKL(**dcfg).eval()
    ref.load_state_dict(su.convert_ldm_vae_checkpoint(ckpt, dcfg), strict=True)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 3, *hw, generator=g) * 2 - 1
    with torch.no_grad():
        ours, theirs = model.encode_first_stage(img), ref.encode(img).latent_dist
        assert_close(ours.mean, theirs.mean)
        assert_close(ours.logvar, theirs.logvar)
        z = torch.randn(2, 4, hw[0] // 2, hw[1] // 2, generator=g)
        assert_close(model.decode_first_stage(z), ref.decode(z / model.scale_factor).sample)


def test_text_encoder_matches_transformers(loaded):
    model, ckpt, _, cfg = loaded
    t = cfg.text
    hf = hf_text_model(t).eval()
    sd = su.convert_ldm_clip_checkpoint(ckpt) if t.arch == "clip" else su.convert_open_clip_checkpoint(hf, ckpt)
    hf.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}, strict=True
    )
    prompts = ["a photo of an astronaut riding a horse on mars", "", "long " * 90]
    pad = 49407 if t.arch == "clip" else 0  # SD1 pads with the end token, SD2 with 0
    tokens = tokenize(prompts, pad=pad)
    with torch.no_grad():
        ours = model.get_learned_conditioning(prompts)
        if t.arch == "clip":
            theirs = hf(tokens).last_hidden_state
        else:  # SD2: penultimate layer, then the final LayerNorm
            theirs = hf.final_layer_norm(hf(tokens, output_hidden_states=True).hidden_states[-2])
    assert ours.shape == (3, 77, t.width)
    assert_close(ours, theirs)


def test_tokenizer_matches_open_clip():
    import open_clip

    prompts = ["A photo of a CAT, sitting!", "", "word " * 100]
    ref = open_clip.tokenize(prompts)
    assert torch.equal(tokenize(prompts), ref)
    sd1 = tokenize(prompts, pad=49407)
    assert torch.equal(sd1[ref != 0], ref[ref != 0]) and (sd1[ref == 0] == 49407).all()
    assert sd1[2, -1] == 49407 and sd1[2, 0] == 49406  # truncated to 77 with start and end tokens
