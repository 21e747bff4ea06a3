"""SDXL against independent implementations: a tiny SDXL checkpoint written in the original (sgm) layout,
converted by diffusers' single-file code into diffusers' UNet / VAE and transformers' text models; sgm's
sampling (trailing discretization, quantized sigmas) against diffusers' schedulers; the full-size key and
parameter manifest; SCEdit on SDXL. Tolerances: 1e-5 of max|output| (models), 1e-4 of max|latent| (5-step
samplers), as SPEC section 2."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as su
from helpers import random_model
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_sce import PRESETS, CheckpointError, LatentDiffusion, load_model, sample, save_checkpoint
from ldm_sce.config import TextConfig, to_compvis_yaml
from ldm_sce.sampling import batch_noise, cfg_denoiser, sample_ddim, trailing_timesteps
from ldm_sce.text_encoders import tokenize
from ldm_sce.tuners import CSCTuner, count_parameters
from ldm_sce.unet import UNetModel


def tiny_config():
    """The SDXL preset with its sizes replaced, as a user would describe a model of other sizes."""
    base = PRESETS["sdxl-base"]
    unet = dataclasses.replace(base.unet, model_channels=32, channel_mult=(1, 2, 2), num_head_channels=16,
                               transformer_depth=(0, 1, 2), context_dim=64, adm_in_channels=32 + 6 * 256,
                               hint_channels=64)  # fmt: skip
    text = dataclasses.replace(base.text, width=32, layers=3, heads=2, embed_dim=32)
    text2 = dataclasses.replace(base.text2, width=32, layers=3, heads=2, embed_dim=32)
    return base.replace(unet=unet, vae=PRESETS["tiny-sd1"].vae, text=text, text2=text2, image_size=8)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(our model loaded from the file, the file's state dict, the config, the path)."""
    cfg = tiny_config()
    assert cfg == PRESETS["tiny-sdxl"]
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    save_checkpoint(random_model(cfg, seed=5), path, metadata=False)  # the original layout, no config inside
    return load_model(path, config=cfg), load_file(path), cfg, path


def assert_close(ours, ref, rel):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"{err:.3g} > {rel} * {scale:.3g}"


def diffusers_unet(cfg, sd):
    yaml = to_compvis_yaml(cfg)
    dcfg = su.create_unet_diffusers_config_from_ldm(yaml, sd)
    # diffusers' converter picks SDXL's text_time embedding only for context 2048 or 1280: configure it
    dcfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(sd, dcfg), strict=True)
    return ref


@pytest.fixture(scope="module")
def ref_unet(sdxl):
    _, sd, cfg, _ = sdxl
    return diffusers_unet(cfg, sd)


def conditioning(model, prompts=("a red cat on a mat", "a tall lighthouse"), size=(16, 24)):
    c = model.get_learned_conditioning(list(prompts), original_size=(40, 30), crop_coords=(3, 5), target_size=size)
    sizes = torch.tensor([[40, 30, 3, 5, *size]] * len(prompts), dtype=torch.float32)
    return c, sizes


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (12, 4)])
def test_unet_matches_diffusers(sdxl, ref_unet, hw):
    model, _, cfg, _ = sdxl
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([3, 761])
    c, sizes = conditioning(model)
    with torch.no_grad():
        ours = model.apply_model(x, t, c)
        pooled = c["vector"][:, : cfg.text2.embed_dim]
        theirs = ref_unet(x, t, c["crossattn"], added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
    assert_close(ours, theirs, 1e-5)


def test_vector_is_pooled_text_and_diffusers_size_embeddings(sdxl, ref_unet):
    model, _, cfg, _ = sdxl
    c, sizes = conditioning(model)
    time_embeds = ref_unet.add_time_proj(sizes.flatten()).reshape(len(sizes), -1)  # diffusers' own
    assert c["vector"].shape == (2, cfg.unet.adm_in_channels)
    assert_close(c["vector"][:, cfg.text2.embed_dim :], time_embeds, 1e-6)


def hf_tower(t: TextConfig, projection: bool):
    config = CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=4 * t.width,
                            num_hidden_layers=t.layers, num_attention_heads=t.heads,
                            max_position_embeddings=t.context_length,
                            hidden_act="quick_gelu" if t.arch == "clip" else "gelu", projection_dim=t.embed_dim)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def load_strict(module, sd):
    """Every key of `module` from sd (position_ids aside: transformers makes them itself), none left over."""
    missing, unexpected = module.load_state_dict({k: v for k, v in sd.items() if "position_ids" not in k}, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected, (missing, unexpected)


def test_both_text_towers_and_the_pooled_output_match_transformers(sdxl):
    model, sd, cfg, _ = sdxl
    prompts = ["a red cat on a mat", "a photograph of an astronaut riding a horse on mars"]
    clip_l = hf_tower(cfg.text, projection=False)
    converted = su.convert_ldm_clip_checkpoint(sd, "conditioner.embedders.0.transformer.")
    load_strict(clip_l, {k.removeprefix("text_model."): v for k, v in converted.items()})
    big_g = hf_tower(cfg.text2, projection=True)
    load_strict(big_g, su.convert_open_clip_checkpoint(big_g, sd, "conditioner.embedders.1.model."))
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        hidden_l = clip_l(tokenize(prompts, pad=49407), output_hidden_states=True).hidden_states[-2]
        out_g = big_g(tokenize(prompts, pad=0), output_hidden_states=True)
    w = cfg.text.width
    assert_close(c["crossattn"][..., :w], hidden_l, 1e-5)  # CLIP-L: penultimate, no final LayerNorm
    assert_close(c["crossattn"][..., w:], out_g.hidden_states[-2], 1e-5)  # bigG: penultimate, no ln_final
    assert_close(c["vector"][:, : cfg.text2.embed_dim], out_g.text_embeds, 1e-5)  # pooled


def test_vae_matches_diffusers(sdxl):
    model, sd, cfg, _ = sdxl
    vcfg = su.create_vae_diffusers_config_from_ldm(to_compvis_yaml(cfg), sd)
    ref = AutoencoderKL(**vcfg).eval()
    ref.load_state_dict(su.convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    img = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert_close(model.encode_first_stage(img).mean, ref.encode(img).latent_dist.mean, 1e-5)
        z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
        assert_close(model.decode_first_stage(z), ref.decode(z / cfg.scale_factor).sample, 1e-5)
    assert model.scale_factor == vcfg["scaling_factor"] == 0.13025


def test_unconditional_conditioning_is_sgms(sdxl):
    model, _, cfg, _ = sdxl
    c, _ = conditioning(model)
    uc = model.get_unconditional_conditioning(c)  # no negative prompt: text parts zero, sizes kept
    p = cfg.text2.embed_dim
    assert torch.equal(uc["crossattn"], torch.zeros_like(c["crossattn"]))
    assert torch.equal(uc["vector"][:, :p], torch.zeros(2, p)) and torch.equal(uc["vector"][:, p:], c["vector"][:, p:])
    neg = model.get_unconditional_conditioning(c, ["blurry", "blurry"])
    direct = model.get_learned_conditioning(["blurry"] * 2, original_size=(40, 30), crop_coords=(3, 5),
                                            target_size=(16, 24))  # fmt: skip
    assert torch.equal(neg["crossattn"], direct["crossattn"]) and torch.equal(neg["vector"], direct["vector"])


def diffusers_loop(ref, sched, x, c, uc, sizes, scale):
    p = c["vector"].shape[1] - 6 * 256
    ctx = torch.cat([uc["crossattn"], c["crossattn"]])
    added = {"text_embeds": torch.cat([uc["vector"][:, :p], c["vector"][:, :p]]), "time_ids": torch.cat([sizes, sizes])}
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        with torch.no_grad():
            out_u, out_c = ref(inp, t, ctx, added_cond_kwargs=added).sample.chunk(2)
        x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    return x


SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_samplers_match_diffusers_with_trailing_spacing(sdxl, ref_unet, sampler):
    model, _, _, _ = sdxl
    c, sizes = conditioning(model)
    uc = model.get_unconditional_conditioning(c)
    x_t = batch_noise((2, 4, 8, 12), [10, 11])
    if sampler == "euler":
        sched = EulerDiscreteScheduler(**SCHED, timestep_spacing="trailing")
    else:
        sched = DPMSolverMultistepScheduler(**SCHED, timestep_spacing="trailing", final_sigmas_type="zero")
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [999, 799, 599, 399, 199] == trailing_timesteps(5).flip(0).tolist()
    # sgm starts at x_T sqrt(1 + sigma_max^2); diffusers' Euler with trailing spacing at x_T sigma_max (its DPM
    # solver works in the unscaled x_T): give both the same start
    start = x_t * (1 + sched.sigmas[0] ** 2) ** 0.5 if sampler == "euler" else x_t * sched.init_noise_sigma
    theirs = diffusers_loop(ref_unet, sched, start, c, uc, sizes, 5.0)
    with torch.no_grad():
        ours = sample(model, c, uc, x_T=x_t, sampler=sampler, steps=5, scale=5.0)  # SDXL's default: trailing
    assert_close(ours, theirs, 1e-4)


def test_trailing_timesteps_are_sgms_floor_not_diffusers_rounding():
    sgm = np.linspace(999, 0, 30, endpoint=False).astype(int)[::-1]  # generate_roughly_equally_spaced_steps
    assert trailing_timesteps(30).tolist() == sgm.tolist()
    assert trailing_timesteps(30).flip(0)[:4].tolist() == [999, 965, 932, 899]
    diffusers = EulerDiscreteScheduler(**SCHED, timestep_spacing="trailing")
    diffusers.set_timesteps(30)
    assert diffusers.timesteps.tolist() != trailing_timesteps(30).flip(0).tolist()  # they round: 966, 932, ...


def test_ddim_with_trailing_spacing_equals_euler(sdxl):
    """sgm: Euler (no churn) on its discretization is DDIM with trailing timesteps and a final alpha of 1."""
    model, _, _, _ = sdxl
    c, _ = conditioning(model)
    uc = model.get_unconditional_conditioning(c)
    x_t = batch_noise((2, 4, 8, 8), [3, 4])
    with torch.no_grad():
        euler = sample(model, c, uc, x_T=x_t, sampler="euler", steps=6, scale=4.0)
        ddim = sample(model, c, uc, x_T=x_t, sampler="ddim", steps=6, scale=4.0)
        ddim_fn = sample_ddim(cfg_denoiser(model, c, uc, 4.0, spacing="trailing"), x_t, 6, spacing="trailing")
    assert_close(ddim, euler, 1e-4)
    assert torch.equal(ddim, ddim_fn)


@pytest.mark.parametrize("sampler", ["plms", "euler_a"])
def test_every_sampler_runs_on_sdxl_and_is_batch_invariant(sdxl, sampler):
    model, _, _, _ = sdxl
    c, _ = conditioning(model, prompts=["a"] * 3, size=(16, 16))
    uc = model.get_unconditional_conditioning(c)
    with torch.no_grad():
        big = sample(model, c, uc, sampler=sampler, steps=4, seed=7)
        one = sample(model, {k: v[1:2] for k, v in c.items()}, {k: v[1:2] for k, v in uc.items()}, sampler=sampler,
                     steps=4, seed=[8])  # fmt: skip
    assert big.shape == (3, 4, 8, 8) and torch.isfinite(big).all()
    torch.testing.assert_close(big[1:2], one, rtol=1e-4, atol=1e-5)


# -- manifest and counts --------------------------------------------------------------------------------


def test_full_size_manifest_on_the_meta_device():
    with torch.device("meta"):
        model = LatentDiffusion(PRESETS["sdxl-base"])
    sd = model.state_dict()
    counts = {p: sum(k.startswith(p) for k in sd) for p in ("model.diffusion_model.", "first_stage_model.",
              "conditioner.embedders.0.", "conditioner.embedders.1.")}  # fmt: skip
    assert list(counts.values()) == [1680, 248, 197, 390] and len(sd) == 2515  # the real file's key set
    assert sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model.")) == 2_567_463_684
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert "betas" not in sd and "alphas_cumprod" not in sd  # SDXL files hold no schedule


def test_scedit_parameter_counts_on_sdxl():
    cfg = PRESETS["sdxl-base"].unet
    assert cfg.skip_channels == (1280, 1280, 640, 640, 640, 320, 320, 320, 320)
    with torch.device("meta"):
        unet = UNetModel(cfg)
        assert sum(count_parameters(t) for t in unet.attach_sc_tuners()) == 9_841_920
        assert count_parameters(CSCTuner(cfg, kernel=3)) == 45_930_080
        assert count_parameters(CSCTuner(cfg, kernel=1)) == 14_800_480


def test_sdxl_files_are_recognised_and_tolerated_extras(sdxl, tmp_path):
    from safetensors.torch import save_file

    model, sd, cfg, _ = sdxl
    with_sigmas = {**sd, "denoiser.sigmas": torch.rand(1000)}
    path = tmp_path / "sgm.safetensors"
    save_file(with_sigmas, str(path))
    loaded = load_model(path, config=cfg)
    assert torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)  # computed: SDXL files hold none
    with pytest.raises(CheckpointError, match="sdxl model config"):
        load_model(path)  # detected as SDXL: the full-size preset's shapes do not fit a tiny file
    with pytest.raises(CheckpointError, match="wrong shape|unexpected|missing"):
        load_model(path, config="tiny-sd1")
