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
from helpers import hf_text_model, load_hf, random_model
from safetensors.torch import load_file

from ldm_sce import PRESETS, CheckpointError, LatentDiffusion, load_model, sample, save_checkpoint
from ldm_sce.config import TextConfig, to_compvis_yaml
from ldm_sce.sampling import batch_noise, cfg_denoiser, sample_ddim, trailing_timesteps
from ldm_sce.text_encoders import tokenize
from ldm_sce.tuners import CSCTuner, count_parameters
from ldm_sce.unet import UNetModel


def tiny_config():
    """The SDXL preset with its sizes replaced, as a user would describe a model of other sizes."""
    base = PRESETS["sdxl-base"]
    unet = dataclasses.replace(
        base.unet,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_head_channels=16,
        transformer_depth=(0, 1, 2),
        context_dim=64,
        adm_in_channels=32 + 6 * 256,
        hint_channels=64,
    )
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
    return hf_text_model(t, projection=projection).eval()


def test_both_text_towers_and_the_pooled_output_match_transformers(sdxl):
    model, sd, cfg, _ = sdxl
    prompts = ["a red cat on a mat", "a photograph of an astronaut riding a horse on mars"]
    clip_l = hf_tower(cfg.text, projection=False)
    converted = su.convert_ldm_clip_checkpoint(sd, "conditioner.embedders.0.transformer.")
    load_hf(clip_l, {k.removeprefix("text_model."): v for k, v in converted.items()})
    big_g = hf_tower(cfg.text2, projection=True)
    load_hf(big_g, su.convert_open_clip_checkpoint(big_g, sd, "conditioner.embedders.1.model."))
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
    direct = model.get_learned_conditioning(
        ["blurry"] * 2, original_size=(40, 30), crop_coords=(3, 5), target_size=(16, 24)
    )
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
        one = sample(
            model,
            {k: v[1:2] for k, v in c.items()},
            {k: v[1:2] for k, v in uc.items()},
            sampler=sampler,
            steps=4,
            seed=[8],
        )
    assert big.shape == (3, 4, 8, 8) and torch.isfinite(big).all()
    torch.testing.assert_close(big[1:2], one, rtol=1e-4, atol=1e-5)


# -- manifest and counts --------------------------------------------------------------------------------


def test_full_size_manifest_on_the_meta_device():
    with torch.device("meta"):
        model = LatentDiffusion(PRESETS["sdxl-base"])
    sd = model.state_dict()
    counts = {
        p: sum(k.startswith(p) for k in sd)
        for p in (
            "model.diffusion_model.",
            "first_stage_model.",
            "conditioner.embedders.0.",
            "conditioner.embedders.1.",
        )
    }
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


# -- SCEdit on SDXL: tuner files ------------------------------------------------------------------------


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05


def test_tuner_and_controller_files_on_sdxl_in_every_layout(sdxl, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ldm_sce.tuner_files import csc_tuner_file, load_tuner, save_tuner_file, sc_tuner_file
    from ldm_sce.tuners import Control, Tuning

    _, _, cfg, path = sdxl
    model = load_model(path, config=cfg)
    unet = model.model.diffusion_model
    tuners = unet.attach_sc_tuners()
    assert len(tuners) == 9
    for k, t in enumerate(tuners):
        randomize(t, k)
    ctrl = unet.attach_controller(CSCTuner(cfg.unet, kernel=3))
    randomize(ctrl, 99)
    assert ctrl.pre_hint_blocks[0].out_channels == 32 and ctrl.pre_hint_blocks[-1].out_channels == 64  # ratio 2
    c, _ = conditioning(model)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([50, 900])
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))  # 8x the 8x8 latent

    def out(m, controller):
        with torch.no_grad():
            return m.apply_model(x, t, c, Tuning(control=Control([controller.hints(cond)], [1.0])))

    ref = out(model, ctrl)
    save_tuner_file(sc_tuner_file(model), tmp_path / "sc.safetensors")
    save_tuner_file(csc_tuner_file(model, ctrl, "canny"), tmp_path / "canny.safetensors")
    with safe_open(str(tmp_path / "sc.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["ldm_sce.tuner"])["base"] == "sdxl"
    # the official layouts: a swift adapter folder and a released controller (pytorch_model.bin)
    swift = tmp_path / "style" / "0_SwiftSCETuning"
    swift.mkdir(parents=True)
    save_file(
        {
            f"model.lsc_identity.{m}.scetuner_0_SwiftSCETuning.tuner_op.{k}": v.contiguous()
            for m in range(9)
            for k, v in unet.tuners[m].state_dict().items()
        },
        str(swift / "adapter_model.safetensors"),
    )
    released = tmp_path / "canny_xl" / "0_SwiftSCETuning"
    released.mkdir(parents=True)
    official = {}
    for k, v in ctrl.state_dict().items():
        parts = k.split(".")
        if parts[0] == "lsc_tuner_blocks":
            k = ".".join(parts[:2] + ["tuner_op"] + parts[2:])
        official[f"0.{k}"] = v
    torch.save(official, released / "pytorch_model.bin")
    for sc_file, csc_file in (
        (tmp_path / "sc.safetensors", tmp_path / "canny.safetensors"),
        (tmp_path / "style", tmp_path / "canny_xl"),
    ):
        fresh = load_model(path, config=cfg)
        load_tuner(fresh, sc_file, kind="sc")
        loaded = load_tuner(fresh, csc_file, kind="csc")
        assert torch.equal(out(fresh, loaded), ref), sc_file


def test_tuners_of_another_family_are_refused_naming_both(sdxl, tiny_ckpts, tmp_path):
    from ldm_sce.tuner_files import load_tuner, save_tuner_file, sc_tuner_file

    _, _, cfg, path = sdxl
    sd1 = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")
    sd1.model.diffusion_model.attach_sc_tuners()
    save_tuner_file(sc_tuner_file(sd1), tmp_path / "sd1.safetensors")
    with pytest.raises(CheckpointError, match="made for sd1, model is sdxl"):
        load_tuner(load_model(path, config=cfg), tmp_path / "sd1.safetensors")
    xl = load_model(path, config=cfg)
    xl.model.diffusion_model.attach_sc_tuners()
    save_tuner_file(sc_tuner_file(xl), tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="made for sdxl, model is sd1"):
        load_tuner(load_model(tiny_ckpts["sd1"][1], config="tiny-sd1"), tmp_path / "xl.safetensors")
    # full-size dims differ as well: an SD1.5 tuner (12 skips of 1280..320) names both layouts
    import json

    from safetensors.torch import save_file

    meta = {"kind": "sc", "skip_dims": list(PRESETS["sd-v1"].unet.skip_channels), "skips": [0], "base": "sd1"}
    save_file(
        {
            "tuners.0.ln1.weight": torch.zeros(1280, 1280),
            "tuners.0.ln1.bias": torch.zeros(1280),
            "tuners.0.ln2.weight": torch.zeros(1280, 1280),
            "tuners.0.ln2.bias": torch.zeros(1280),
        },
        str(tmp_path / "sd15.safetensors"),
        metadata={"ldm_sce.tuner": json.dumps(meta)},
    )
    with pytest.raises(CheckpointError, match=r"skip dims \[1280, 1280, 1280.*\(sd1\).*\(sdxl\) has \[64"):
        load_tuner(load_model(path, config=cfg), tmp_path / "sd15.safetensors")


# -- the command line -------------------------------------------------------------------------------------


def test_txt2img_and_img2img_on_sdxl(sdxl, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    _, _, cfg, path = sdxl
    yaml_path = path.with_suffix(".yaml")  # a sidecar config, as users keep them
    import yaml

    yaml_path.write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            str(root / "tools" / "txt2img.py"),
            "--ckpt",
            str(path),
            "--prompt",
            "a cat",
            "--ddim_steps",
            "3",
            "--negative-prompt",
            "blurry",
            "--original-size",
            "40",
            "30",
            "--crop-coords",
            "2",
            "3",
            "--outdir",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    img = Image.open(out / "samples" / "00000.png")
    assert img.size == (16, 16)  # the model's own size: image_size 8 x the VAE's factor 2
    text = img.text["parameters"]
    assert "Original size: 40-30" in text and "Crop: 2-3" in text and "Schedule: trailing" in text
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(init)
    r = subprocess.run(
        [
            sys.executable,
            str(root / "tools" / "img2img.py"),
            "--ckpt",
            str(path),
            "--init-img",
            str(init),
            "--ddim_steps",
            "4",
            "--strength",
            "0.5",
            "--outdir",
            str(tmp_path / "i2i"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "i2i" / "samples" / "00000.png").size == (16, 16)
    yaml_path.unlink()


def test_micro_conditioning_flags_are_sdxl_only(tiny_ckpts, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [
            sys.executable,
            str(root / "tools" / "txt2img.py"),
            "--ckpt",
            str(tiny_ckpts["sd1"][1]),
            "--config",
            "tiny-sd1",
            "--target-size",
            "16",
            "16",
            "--ddim_steps",
            "2",
            "--outdir",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "--target-size: only SDXL models take the micro-conditioning" in r.stderr


# -- training -----------------------------------------------------------------------------------------------


def test_sc_training_on_sdxl_conditions_on_each_images_size_and_crop(sdxl, tmp_path):
    import yaml
    from PIL import Image

    from ldm_sce.training import Trainer, load_train_config
    from ldm_sce.tuner_files import load_tuner, read_tuner_file

    _, _, cfg, path = sdxl
    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(24, 16), (16, 32), (16, 16), (40, 16)]):  # landscape, portrait, square
        Image.new("RGB", (w, h), (40 * i, 200, 90)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a picture number {i}")
    config_path = tmp_path / "model.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))
    train = {
        "model": {"ckpt": str(path), "config": str(config_path)},
        "method": {"name": "sc"},
        "data": {"path": str(data), "resolution": 16, "caption_dropout": 0.5},
        "optim": {"lr": 1e-3, "batch_size": 4, "max_steps": 2},
        "output_dir": str(tmp_path / "out"),
        "log_every": 1,
        "save_every": 0,
        "validation": {"prompts": ["a picture"], "steps": 2},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    trainer = Trainer(load_train_config(tmp_path / "train.yaml"))
    batch = trainer._prepare(0)
    order = [i for _, i in trainer._global_indices(0)]  # (epoch, item) pairs of micro-batch 0
    # the original sizes and the center crops' (top, left) in the resized images, then the 16x16 target
    expected = {0: (16, 24, 0, 4), 1: (32, 16, 8, 0), 2: (16, 16, 0, 0), 3: (16, 40, 0, 12)}
    model = trainer.model
    dropped = [trainer.data[0, i]["dropped"] for i in order]
    assert any(dropped) and not all(dropped)  # caption dropout 0.5 over four images: both kinds here
    for row, i in enumerate(order):
        h, w, top, left = expected[i]
        caption = "" if dropped[row] else f"a picture number {i}"
        size = {"original_size": (h, w), "crop_coords": (top, left), "target_size": (16, 16)}
        ref = model.get_learned_conditioning([caption], **size)
        if dropped[row]:  # sgm's caption dropout: both text parts zero, the sizes kept
            ref = model.get_unconditional_conditioning(ref)
        torch.testing.assert_close(batch["c"]["vector"][row], ref["vector"][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(batch["c"]["crossattn"][row], ref["crossattn"][0], rtol=0, atol=1e-6)
    out = trainer.train()
    assert read_tuner_file(out).base == "sdxl" and (tmp_path / "out" / "validation" / "step-000002.png").is_file()
    assert len(load_tuner(load_model(path, config=cfg), out)) == 9
