"""Samplers against diffusers' schedulers (driving diffusers' UNet built from the same file), exact
solutions of a toy problem, and per-image reproducibility."""

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils as su

from ldm_sce import PRESETS, load_model
from ldm_sce.config import to_compvis_yaml
from ldm_sce.sampling import (
    Denoiser,
    batch_noise,
    cfg_denoiser,
    ddim_timesteps,
    sample,
    sample_ddim,
    sample_dpmpp_2m,
    sample_euler,
    sample_plms,
    sigmas_karras,
    sigmas_uniform,
)

SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module", params=["eps", "v"])
def pair(request, tiny_ckpts):
    """(our model, diffusers UNet, prediction type) from the same tiny file."""
    family = "sd1" if request.param == "eps" else "sd2"
    _, path, preset = tiny_ckpts[family]
    ours = load_model(path, config=preset, parameterization=request.param)
    ckpt = torch.load(path, weights_only=True)["state_dict"]
    dcfg = su.create_unet_diffusers_config_from_ldm(to_compvis_yaml(PRESETS[preset]), ckpt)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    return ours, ref, "epsilon" if request.param == "eps" else "v_prediction"


def conds(model, n=2):
    g = torch.Generator().manual_seed(3)
    c = torch.randn(n, 77, model.cfg.unet.context_dim, generator=g)
    return c, torch.randn(n, 77, model.cfg.unet.context_dim, generator=g)


def diffusers_loop(ref, sched, x, c, uc, scale, generator=None):
    for t in sched.timesteps:
        inp = sched.scale_model_input(torch.cat([x, x]), t)
        with torch.no_grad():
            out_u, out_c = ref(inp, t, torch.cat([uc, c])).sample.chunk(2)
        out = out_u + scale * (out_c - out_u)
        kw = {"generator": generator} if generator is not None else {}
        x = sched.step(out, t, x, **kw).prev_sample
    return x


def assert_close(ours, ref, rel):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"{err:.3g} > {rel} * {scale:.3g}"


def test_ddim_timesteps_are_compvis_uniform():
    assert ddim_timesteps(5).tolist() == [1, 201, 401, 601, 801]
    assert ddim_timesteps(50)[-1].item() == 981
    assert len(ddim_timesteps(30)) == 31  # the original's quirk, kept
    assert ddim_timesteps(3).tolist() == [1, 334, 667]  # where the original indexes past the schedule


@pytest.mark.parametrize("steps", [5, 20])
def test_ddim_matches_diffusers(pair, steps):
    ours, ref, pred = pair
    c, uc = conds(ours)
    x_t = batch_noise((2, 4, 8, 8), [0, 1])
    sched = DDIMScheduler(
        **SCHED,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=pred,
    )
    sched.set_timesteps(steps)
    theirs = diffusers_loop(ref, sched, x_t, c, uc, 7.5)
    mine = sample_ddim(cfg_denoiser(ours, c, uc, 7.5), x_t, steps)
    assert_close(mine, theirs, 1e-4)


def test_euler_matches_diffusers(pair):
    ours, ref, pred = pair
    c, uc = conds(ours)
    x_t = batch_noise((2, 4, 8, 8), [5, 6])
    sched = EulerDiscreteScheduler(**SCHED, timestep_spacing="linspace", prediction_type=pred)
    sched.set_timesteps(10)  # integer timesteps 999, 888, ...: no interpolation convention involved
    theirs = diffusers_loop(ref, sched, x_t * sched.init_noise_sigma, c, uc, 5.0)
    sigmas = sigmas_uniform(ours.alphas_cumprod, 10)
    torch.testing.assert_close(sigmas.float(), sched.sigmas.float(), rtol=1e-5, atol=0)
    mine = sample_euler(cfg_denoiser(ours, c, uc, 5.0), x_t * sigmas[0].float(), sigmas)
    assert_close(mine, theirs, 1e-4)


def test_euler_ancestral_matches_diffusers_with_same_noise(pair):
    ours, ref, pred = pair
    c, uc = conds(ours, n=1)
    x_t = batch_noise((1, 4, 8, 8), [7])
    sched = EulerAncestralDiscreteScheduler(**SCHED, timestep_spacing="linspace", prediction_type=pred)
    sched.set_timesteps(10)
    theirs = diffusers_loop(ref, sched, x_t * sched.init_noise_sigma, c, uc, 5.0, torch.Generator().manual_seed(11))
    from ldm_sce.sampling import sample_euler_ancestral

    g = torch.Generator().manual_seed(11)
    sigmas = sigmas_uniform(ours.alphas_cumprod, 10)
    noise_fn = lambda: torch.randn(1, 4, 8, 8, generator=g)  # noqa: E731
    mine = sample_euler_ancestral(cfg_denoiser(ours, c, uc, 5.0), x_t * sigmas[0].float(), sigmas, noise_fn)
    assert_close(mine, theirs, 1e-4)


def test_karras_sigmas_match_diffusers():
    sched = DPMSolverMultistepScheduler(**SCHED, use_karras_sigmas=True)
    sched.set_timesteps(12)
    ac = sched.alphas_cumprod
    torch.testing.assert_close(sigmas_karras(ac, 12).float(), sched.sigmas.float(), rtol=1e-5, atol=0)


def gaussian_toy(alphas_cumprod, s=0.5):
    """Data x0 ~ N(0, s^2): the exact denoiser is D(x, sigma) = x s^2 / (s^2 + sigma^2) and the probability
    flow ODE is solved by x(sigma) = x(sigma_0) sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2))."""
    sig = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt()

    def eps_fn(x_in, t):  # x_in = x / sqrt(sigma^2 + 1); eps = (x - D(x)) / sigma
        lo = t.floor().long().clamp(max=998)
        w = (t - lo).double()
        sigma = ((1 - w) * sig[lo].log() + w * sig[lo + 1].log()).exp().view(-1, 1, 1, 1)
        x = x_in.double() * (sigma**2 + 1).sqrt()
        return ((x - x * s**2 / (s**2 + sigma**2)) / sigma).to(x_in.dtype)

    def exact(x, sigmas):  # the ODE down to sigma_min, then the samplers' final jump x = D(x, sigma_min)
        smax, smin = sigmas[0], sigmas[-2]
        return x * ((s**2 + smin**2) / (s**2 + smax**2)) ** 0.5 * s**2 / (s**2 + smin**2)

    return eps_fn, exact


@pytest.mark.parametrize("fn,order", [(sample_euler, 1), (sample_dpmpp_2m, 2)])
def test_ode_samplers_converge_at_their_order(fn, order):
    """On the Gaussian toy, doubling the steps divides the error by 2**order."""
    ac = torch.from_numpy(DDIMScheduler(**SCHED).alphas_cumprod.numpy())
    eps_fn, exact = gaussian_toy(ac)
    denoiser = Denoiser(eps_fn, ac)
    x = batch_noise((2, 4, 8, 8), [0, 1]).double()
    errs = []
    for steps in (20, 40, 80):
        sigmas = sigmas_karras(ac, steps)
        errs.append((fn(denoiser, x * sigmas[0], sigmas) - exact(x * sigmas[0], sigmas)).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(0.85 * 2**order < r < 1.25 * 2**order for r in ratios), (errs, ratios)


def test_plms_equals_ddim_for_constant_eps():
    """Every PLMS combination of equal eps is that eps, so with a constant denoiser PLMS is DDIM."""
    ac = torch.from_numpy(DDIMScheduler(**SCHED).alphas_cumprod.numpy())
    eps0 = batch_noise((1, 4, 4, 4), [2])
    denoiser = Denoiser(lambda x, t: eps0, ac)
    x = batch_noise((1, 4, 4, 4), [3])
    torch.testing.assert_close(sample_plms(denoiser, x, 10), sample_ddim(denoiser, x, 10), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_same_seed_same_image_at_any_batch_size(tiny_ckpts, sampler):
    model, _, _ = tiny_ckpts["sd1"]
    c = model.get_learned_conditioning(["a red square"] * 4)
    uc = model.get_learned_conditioning([""] * 4)
    eta = 0.5 if sampler == "ddim" else 0.0
    big = sample(model, c, uc, sampler=sampler, steps=4, seed=100, shape=(8, 8), eta=eta)
    for i in range(4):
        one = sample(model, c[:1], uc[:1], sampler=sampler, steps=4, seed=100 + i, shape=(8, 8), eta=eta)
        # equal up to the round-off of batched vs single matrix products
        torch.testing.assert_close(one[0], big[i], rtol=0, atol=1e-5 * big.abs().max().item())
    assert not torch.allclose(big[0], big[1])


def test_sample_rejects_unknown_sampler(tiny_ckpts):
    model, _, _ = tiny_ckpts["sd1"]
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, torch.zeros(1, 77, 32), None, sampler="heun")
