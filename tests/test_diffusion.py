"""Noise schedule and parameterisation identities of LatentDiffusion."""

import torch
from diffusers import DDPMScheduler

from ldm_sce import PRESETS, LatentDiffusion


def test_schedule_matches_diffusers_scaled_linear():
    model = LatentDiffusion(PRESETS["tiny-sd1"])
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    torch.testing.assert_close(model.betas, ref.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(model.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=1e-9)
    assert model.alphas_cumprod_prev[0] == 1.0
    # float64 cumprod, stored float32: the values of the original files
    assert abs(model.alphas_cumprod[-1].item() - 0.004660095) < 1e-8


def test_q_sample_and_v_identities():
    model = LatentDiffusion(PRESETS["tiny-sd1"])
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = model.q_sample(x0, t, eps)
    v = model.get_v(x0, eps, t)
    torch.testing.assert_close(model.predict_start_from_z_and_v(xt, t, v), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.predict_eps_from_z_and_v(xt, t, v), eps, rtol=0, atol=1e-5)
    a = model.alphas_cumprod[500]
    torch.testing.assert_close(xt[1], a.sqrt() * x0[1] + (1 - a).sqrt() * eps[1])
