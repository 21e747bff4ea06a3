"""The paths GPUs run, checked on the CPU: bf16 and fp16 autocast against fp32 (inference and training, within
stated tolerances), torch.compile (regional and full) against eager (within 1e-5 in fp32), and sampling
loops free of host-device synchronisation (run on the meta device)."""

import pytest
import torch
import torch.nn.functional as F

from ldm_sce import load_model, sample
from ldm_sce.cli import DEFAULT_CKPT
from ldm_sce.unet import compile_unet


@pytest.fixture(scope="module")
def toy():
    return load_model(DEFAULT_CKPT)


def test_bf16_autocast_sampling_agrees_with_fp32(toy):
    """10 DDIM steps with guidance on the shipped model: bf16 autocast stays within 5% of max|latent| of the
    fp32 result (measured 1.5%) and decodes to within 0.01 mean absolute error on [-1, 1] (measured 0.0033)."""
    c = toy.get_learned_conditioning(["a large red circle", "a blue square"])
    uc = toy.get_unconditional_conditioning(c)
    with torch.no_grad():
        z32 = sample(toy, c, uc, steps=10, seed=0, shape=(16, 16), scale=5.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = sample(toy, c, uc, steps=10, seed=0, shape=(16, 16), scale=5.0)
            img16 = toy.decode_first_stage(z16)
        img32 = toy.decode_first_stage(z32)
    assert ((z16.float() - z32).abs().max() / z32.abs().max()).item() < 0.05
    assert (img16.float() - img32).abs().mean().item() < 0.01


def test_fp16_autocast_sampling_with_every_skip_edit_agrees_with_fp32(tmp_path):
    """What `--precision autocast` runs on a GPU (fp16), on the CPU: the shipped model with its SC-Tuner, its
    canny CSC-Tuner on part of sampling, an on-the-fly LoRA and FreeU v2 (an FFT in fp16), DDIM and DPM++ SDE
    with guidance; the latents stay within 5% of max|latent| of fp32's (measured 0.5% and 0.3%)."""
    from helpers import write_kohya_lora
    from PIL import Image

    from ldm_sce.conditions import condition_tensor, make_condition
    from ldm_sce.lora import load_lora
    from ldm_sce.skip_edits import FREEU_PRESETS, FreeU
    from ldm_sce.tuner_files import load_tuner
    from ldm_sce.tuners import Control, Tuning

    model = load_model(DEFAULT_CKPT)
    unet = model.model.diffusion_model
    load_tuner(model, DEFAULT_CKPT.with_name("toy-style-sc.safetensors"), kind="sc")
    ctrl = load_tuner(model, DEFAULT_CKPT.with_name("toy-canny-csc.safetensors"), kind="csc")
    write_kohya_lora(model, tmp_path / "l.safetensors", seed=4)
    load_lora(model, tmp_path / "l.safetensors", 0.3)
    unet.skip_edits.append(FreeU(unet.cfg, *FREEU_PRESETS["sd1"], v2=True))
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((0, 0, 0), (10, 30, 50, 50))
    h, w = model.cfg.condition_size(64, 64)  # the controllers' input size for a 64x64 image
    hints = ctrl.hints(condition_tensor(make_condition("canny", img, w, h)))
    tuning = Tuning(0.8, Control([hints], [1.0]), control_range=(0.0, 0.6))
    c = model.get_learned_conditioning(["a large red circle zqx style"])
    uc = model.get_unconditional_conditioning(c)
    for sampler in ("ddim", "dpmpp_sde"):
        with torch.no_grad():
            z32 = sample(model, c, uc, sampler=sampler, steps=6, seed=0, scale=5.0, tuning=tuning)
            with torch.autocast("cpu", dtype=torch.float16):
                z16 = sample(model, c, uc, sampler=sampler, steps=6, seed=0, scale=5.0, tuning=tuning)
        assert ((z16.float() - z32).abs().max() / z32.abs().max()).item() < 0.05, sampler


def _tuned_unet(seed=0):
    model = load_model(DEFAULT_CKPT)
    unet = model.model.diffusion_model
    g = torch.Generator().manual_seed(seed)
    for tuner in unet.attach_sc_tuners():
        for p in tuner.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.02
            p.requires_grad_(True)
    return model, unet


def _inputs(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=g)
    return x, torch.tensor([10, 300, 600, 900]), model.get_learned_conditioning(["a red circle"] * 4)


def test_bf16_autocast_training_step_agrees_with_fp32():
    """The SC-Tuner training step under bf16 autocast (fp32 trainable weights): loss within 1% of fp32's
    (measured 0.1%), the tuners' gradient within 5% in norm (measured 0.7%)."""
    model, unet = _tuned_unet()
    x, t, c = _inputs(model)
    params = list(unet.tuners.parameters())
    loss32 = F.mse_loss(unet(x, t, c), x)
    g32 = torch.autograd.grad(loss32, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = F.mse_loss(unet(x, t, c).float(), x)
    g16 = torch.autograd.grad(loss16, params)
    assert all(p.dtype == torch.float32 for p in params) and all(g.dtype == torch.float32 for g in g16)
    assert abs(loss16.item() - loss32.item()) < 0.01 * loss32.item()
    diff = torch.cat([(a - b).flatten() for a, b in zip(g16, g32, strict=True)]).norm()
    assert (diff / torch.cat([b.flatten() for b in g32]).norm()).item() < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_compiled_unet_equals_eager(mode):
    """torch.compile (inductor, fp32): forward within 1e-5 of max|output| of eager, with and without tuners
    (swapped after compiling), and the SC-Tuners' gradients through the compiled frozen blocks within 1e-4
    (relative norm)."""
    from ldm_sce.tuners import SkipIdentity

    model, unet = _tuned_unet()
    x, t, c = _inputs(model)
    params = list(unet.tuners.parameters())
    tuned, bare = list(unet.tuners), [SkipIdentity() for _ in unet.tuners]
    eager = unet(x, t, c)
    g_eager = torch.autograd.grad(eager.square().mean(), params)
    unet.replace_tuners(bare)
    with torch.no_grad():
        eager_bare = unet(x, t, c)
    unet.replace_tuners(tuned)

    compile_unet(unet, mode)
    compiled = unet(x, t, c)
    g_compiled = torch.autograd.grad(compiled.square().mean(), params)
    unet.replace_tuners(bare)
    with torch.no_grad():
        compiled_bare = unet(x, t, c)
    for ours, ref in ((compiled, eager), (compiled_bare, eager_bare)):
        assert (ours - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    diff = torch.cat([(a - b).flatten() for a, b in zip(g_compiled, g_eager, strict=True)]).norm()
    assert (diff / torch.cat([b.flatten() for b in g_eager]).norm()).item() < 1e-4


def test_offload_gives_the_same_image(tmp_path):
    """--offload (the text encoders and the VAE wait on the CPU, moved to the device only to run) changes where
    modules live, not what they compute: on the CPU the same PNG pixels come out."""
    import importlib.util

    import numpy as np
    from PIL import Image

    root = DEFAULT_CKPT.parents[1]
    spec = importlib.util.spec_from_file_location("txt2img", root / "tools" / "txt2img.py")
    txt2img = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(txt2img)
    images = []
    for flags in ([], ["--offload"]):
        out = tmp_path / ("off" if flags else "on")
        args = txt2img.parser().parse_args(
            ["--prompt", "a blue square", "--ddim_steps", "5", "--outdir", str(out), "--quiet", "--skip_grid", *flags]
        )
        txt2img.main(args)
        images.append(np.asarray(Image.open(out / "samples" / "00000.png")))
    assert np.array_equal(images[0], images[1])


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_sampling_loops_never_read_a_device_tensor_on_the_host(preset):
    """No host-device synchronisation inside any sampling loop or the UNet's decoder loop, checked on the CPU:
    the UNet, the conditioning and the latents live on the meta device, where any host read (`.item()`,
    `float(t)`, `if tensor`) raises. Every sampler, with SC-Tuners and a CSC-Tuner whose control acts on part
    of sampling (the denoiser must read the progress from the host's timesteps), and DDIM/PLMS from an
    img2img start, run all their steps; the only host read is `sample`'s one finiteness check after the loop."""
    import traceback

    from ldm_sce.config import PRESETS
    from ldm_sce.diffusion import LatentDiffusion
    from ldm_sce.sampling import SAMPLERS, cfg_denoiser, sample_ddim, sample_plms
    from ldm_sce.tuners import Control, CSCTuner, Tuning

    cfg = PRESETS[preset]
    model = LatentDiffusion(cfg).eval()
    unet = model.model.diffusion_model
    unet.attach_sc_tuners()
    ctrl = unet.attach_controller(CSCTuner(cfg.unet))
    side = 8 * cfg.vae.downsample_factor  # the image of an 8x8 latent
    hints = ctrl.hints(torch.rand(1, 3, *cfg.condition_size(side, side)))
    model.model.to("meta")  # the schedule (alphas_cumprod) stays on the host, as the samplers compute it there
    meta = torch.device("meta")
    ctx = torch.randn(1, 77, cfg.unet.context_dim, device=meta)
    c = (
        {"crossattn": ctx, "vector": torch.randn(1, cfg.unet.adm_in_channels, device=meta)}
        if cfg.unet.has_vector
        else ctx
    )
    uc = {k: torch.zeros_like(v) for k, v in c.items()} if isinstance(c, dict) else torch.zeros_like(c)
    tuning = Tuning(0.8, Control([[h.to(meta) for h in hints]], [1.0]), control_range=(0.0, 0.5))
    # every sampler on SD1; the v model and SDXL's vector conditioning and trailing sgm schedule with a few
    samplers = [*SAMPLERS, "unipc"] if preset == "tiny-sd1" else ["ddim", "euler", "dpmpp_2m_sde"]
    for name in samplers:
        steps = []
        with torch.inference_mode(), pytest.raises(RuntimeError, match="meta") as err:
            # 2 steps: every sampler's first step and its last (to sigma 0), where their code paths differ
            sample(model, c, uc, sampler=name, steps=2, seed=0, shape=(8, 8), tuning=tuning, callback=steps.append)
        assert len(steps) == 2, name
        last = [f for f in traceback.extract_tb(err.value.__traceback__) if "ldm_sce" in f.filename][-1]
        assert last.name == "sample" and "isfinite" in last.line, (name, last)
    denoiser = cfg_denoiser(model, c, uc, 7.5, tuning)
    x = torch.randn(1, 4, 8, 8, device=meta)
    for loop in (sample_ddim, sample_plms):  # img2img: from DDIM index 2 of 4
        steps = []
        with torch.inference_mode():
            loop(denoiser, x, 4, t_start=2, callback=steps.append)
        assert len(steps) == 2
