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
    SAMPLERS,
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
        t = t.to(torch.float64)
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


@pytest.mark.parametrize("sampler", SAMPLERS)
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
        sample(model, torch.zeros(1, 77, 32), None, sampler="heun2")


# ---------------------------------------------------------------------------------------------------------
# More samplers (AUTOMATIC1111's list), schedules, guidance rescale
# ---------------------------------------------------------------------------------------------------------


def test_heun_matches_diffusers(pair):
    from diffusers import HeunDiscreteScheduler

    from ldm_sce.sampling import sample_heun

    ours, ref, pred = pair
    c, uc = conds(ours)
    x_t = batch_noise((2, 4, 8, 8), [5, 6])
    sched = HeunDiscreteScheduler(**SCHED, timestep_spacing="linspace", prediction_type=pred)
    sched.set_timesteps(8)
    theirs = diffusers_loop(ref, sched, x_t * sched.init_noise_sigma, c, uc, 5.0)
    sigmas = sigmas_uniform(ours.alphas_cumprod, 8)
    mine = sample_heun(cfg_denoiser(ours, c, uc, 5.0), x_t * sigmas[0].float(), sigmas)
    assert_close(mine, theirs, 1e-4)


def test_ddpm_matches_diffusers_with_the_same_noise(pair, monkeypatch):
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    from ldm_sce.sampling import sample_ddpm

    ours, ref, pred = pair
    c, uc = conds(ours, n=1)
    x_t = batch_noise((1, 4, 8, 8), [7])
    draws = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(100 + k)) for k in range(10)]
    it = iter(draws)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: next(it))
    sched = DDPMScheduler(**SCHED, prediction_type=pred, clip_sample=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(10)
    theirs = diffusers_loop(ref, sched, x_t, c, uc, 5.0, torch.Generator())
    mine_it = iter(draws)
    mine = sample_ddpm(cfg_denoiser(ours, c, uc, 5.0), x_t, 10, lambda: next(mine_it))
    assert_close(mine, theirs, 1e-4)


def test_guidance_rescale_is_diffusers_formula(pair):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    ours, _, _ = pair
    c, uc = conds(ours)
    x, t = batch_noise((2, 4, 8, 8), [1, 2]), torch.tensor([500, 500])
    with torch.no_grad():
        out_u, out_c = ours.apply_model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uc, c])).chunk(2)
        guided = out_u + 5.0 * (out_c - out_u)
        expected = rescale_noise_cfg(guided, out_c, guidance_rescale=0.7)
    denoiser = cfg_denoiser(ours, c, uc, 5.0, rescale=0.7)
    with torch.no_grad():
        raw = denoiser.eps(x, t)
    if ours.parameterization == "v":  # the denoiser converts v to eps after guiding: convert the expected too
        from ldm_sce.sampling import _alpha_at

        a = _alpha_at(ours.alphas_cumprod, t).view(-1, 1, 1, 1)
        expected = a.sqrt() * expected + (1 - a).sqrt() * x
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-5)


def test_schedules_match_diffusers():
    from ldm_sce.sampling import sigmas_exponential

    sched = EulerDiscreteScheduler(**SCHED, use_exponential_sigmas=True)
    sched.set_timesteps(12)
    ac = sched.alphas_cumprod
    torch.testing.assert_close(sigmas_exponential(ac, 12).float(), sched.sigmas.float(), rtol=1e-5, atol=0)


def test_lms_coefficients_are_the_lagrange_integrals():
    """Our exact polynomial integrals against a fine trapezoid quadrature of the same Lagrange basis."""
    import numpy as np

    from ldm_sce.k_diffusion import _lms_coefficient

    sig = np.array([14.6, 9.1, 5.2, 2.9, 1.4, 0.6])
    for i, order in ((3, 4), (4, 3), (1, 2)):
        nodes = [sig[i - k] for k in range(order)]
        grid = np.linspace(sig[i], sig[i + 1], 200_001)
        for j in range(order):
            basis = np.prod([(grid - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j], axis=0)
            ref = np.sum((basis[1:] + basis[:-1]) / 2 * np.diff(grid))
            assert abs(_lms_coefficient(sig, i, j, order) - ref) < 1e-8 * max(1.0, abs(ref))


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    from ldm_sce.sampling import sample_dpmpp_2m_sde

    ac = torch.from_numpy(DDIMScheduler(**SCHED).alphas_cumprod.numpy())
    eps_fn, _ = gaussian_toy(ac)
    denoiser = Denoiser(eps_fn, ac)
    x = batch_noise((1, 4, 8, 8), [3]).double()
    sigmas = sigmas_karras(ac, 15)
    a = sample_dpmpp_2m(denoiser, x * sigmas[0], sigmas)
    b = sample_dpmpp_2m_sde(denoiser, x * sigmas[0], sigmas, lambda: 1 / 0, eta=0.0)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _deterministic(name):
    from ldm_sce import sampling as S

    fns = {
        "heun": S.sample_heun,
        "lms": S.sample_lms,
        "dpmpp_2s": lambda d, x, s: S.sample_dpmpp_2s_ancestral(d, x, s, None, eta=0.0),
        "dpmpp_sde_ode": lambda d, x, s: S.sample_dpmpp_sde(d, x, s, None, eta=0.0),
        "dpmpp_2m_sde_ode": lambda d, x, s: S.sample_dpmpp_2m_sde(d, x, s, None, eta=0.0),
        "unipc": S.sample_unipc,
    }
    return fns[name]


@pytest.mark.parametrize(
    "name,order",
    [("heun", 2), ("lms", 3), ("dpmpp_2s", 2), ("dpmpp_sde_ode", 2), ("dpmpp_2m_sde_ode", 2), ("unipc", 3)],
)
def test_more_ode_samplers_converge_at_their_order(name, order):
    """On the Gaussian toy (noise-free limits of the stochastic ones): doubling the steps divides the error
    by 2**order (UniPC: order 2 plus its corrector's one; LMS: its warm-up steps are of lower order, so
    between 2^3 and 2^4, against the ODE's solution at sigma 0, which its last step integrates to)."""
    ac = torch.from_numpy(DDIMScheduler(**SCHED).alphas_cumprod.numpy())
    eps_fn, exact = gaussian_toy(ac)
    denoiser = Denoiser(eps_fn, ac)
    x = batch_noise((2, 4, 8, 8), [0, 1]).double()
    fn = _deterministic(name)
    errs = []
    for steps in (20, 40, 80):
        sigmas = sigmas_karras(ac, steps)
        x_t = x * sigmas[0]
        want = x_t * (0.25 / (0.25 + sigmas[0] ** 2)) ** 0.5 if name == "lms" else exact(x_t, sigmas)
        errs.append((fn(denoiser, x_t, sigmas) - want).abs().max().item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(0.85 * 2**order < r < 2.2 * 2**order for r in ratios), (errs, ratios)


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_a", "ddpm"])
def test_stochastic_samplers_sample_the_right_distribution(sampler):
    """On the Gaussian toy x0 ~ N(0, s^2) the stochastic samplers' outputs have standard deviation s (8,192
    values; 3% is about four standard errors). The first-order ones (Euler a, DDPM) need 300 steps for their
    bias to fall under that (at 30 steps: 0.447 and 0.434), the DPM++ ones 100."""
    from ldm_sce import sampling as S

    ac = torch.from_numpy(DDIMScheduler(**SCHED).alphas_cumprod.numpy())
    eps_fn, _ = gaussian_toy(ac, s=0.5)
    denoiser = Denoiser(eps_fn, ac)
    x = batch_noise((8, 4, 16, 16), list(range(8))).double()
    noise = S.NoiseStream(tuple(x.shape), list(range(8)), torch.float64, "cpu")
    steps = 300 if sampler in ("euler_a", "ddpm") else 100
    if sampler == "ddpm":
        z = S.sample_ddpm(denoiser, x, steps, noise)
    else:
        sigmas = sigmas_karras(ac, steps)
        z = S._run_k_sampler(sampler, denoiser, x * sigmas[0], sigmas, noise, None, False)
    assert abs(z.std().item() - 0.5) < 0.03 * 0.5, z.std().item()


def test_a1111_sampler_names():
    from ldm_sce.sampling import display_name, resolve_sampler

    assert resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert resolve_sampler("dpm++ sde exponential") == ("dpmpp_sde", "exponential")
    assert resolve_sampler("Euler a") == ("euler_a", None)
    assert resolve_sampler("DPM++ 2S a Karras") == ("dpmpp_2s_a", "karras")
    assert resolve_sampler("heun") == ("heun", None)
    for bad in ("DDIM Karras", "DPM++ 3M", "euler b"):
        with pytest.raises(ValueError, match="unknown sampler"):
            resolve_sampler(bad)
    assert display_name("dpmpp_2m") == "DPM++ 2M Karras" and display_name("euler") == "Euler"
    assert display_name("dpmpp_sde", "exponential") == "DPM++ SDE Exponential" and display_name("ddim") == "DDIM"


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers(pair, order):
    from diffusers import UniPCMultistepScheduler

    from ldm_sce.sampling import sample_unipc

    ours, ref, pred = pair
    c, uc = conds(ours)
    x_t = batch_noise((2, 4, 8, 8), [5, 6])
    sched = UniPCMultistepScheduler(**SCHED, prediction_type=pred, solver_order=order)
    sched.set_timesteps(10)
    theirs = diffusers_loop(ref, sched, x_t, c, uc, 5.0)
    sigmas = sched.sigmas.double()  # its integer timesteps' sigmas, then 0
    mine = sample_unipc(cfg_denoiser(ours, c, uc, 5.0), x_t * (1 + sigmas[0] ** 2).sqrt().float(), sigmas, order)
    assert_close(mine, theirs, 1e-4)
