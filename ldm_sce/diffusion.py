"""`LatentDiffusion` with the CompVis attribute tree and method names, and the DDPM noise schedule.

Attribute tree (= checkpoint prefixes): `model.diffusion_model` (UNet), `first_stage_model` (VAE),
`cond_stage_model` (text encoder), and the 12 schedule buffers at top level.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from .config import ModelConfig
from .text_encoders import build_text_encoder
from .tuners import Tuning
from .unet import UNetModel

SCHEDULE_BUFFERS = tuple(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2".split()
)


def make_schedule(linear_start: float, linear_end: float, timesteps: int) -> dict[str, torch.Tensor]:
    """The 'linear' DDPM schedule of SD (betas linear in sqrt space), computed in float64, stored float32."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
    s = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in s.items()}


def _extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] shaped [B, 1, 1, 1] in x's dtype."""
    return a.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the `model.diffusion_model.*` checkpoint prefix)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, tuning: Tuning | None = None
    ) -> torch.Tensor:
        return self.diffusion_model(x, t, context, tuning)


class LatentDiffusion(nn.Module):
    """Stable Diffusion: text-conditioned denoising in the KL autoencoder's latent space."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = build_text_encoder(cfg.text)
        self.parameterization = cfg.parameterization
        self.scale_factor = cfg.scale_factor
        self.num_timesteps = cfg.timesteps
        for name, value in make_schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps).items():
            self.register_buffer(name, value)

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> cross-attention context [B, 77, context_dim]."""
        return self.cond_stage_model.encode(list(prompts))

    # -- denoiser --------------------------------------------------------------------------------------
    def apply_model(
        self,
        x_noisy: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        tuning: Tuning | None = None,
    ) -> torch.Tensor:
        """UNet output (eps or v, per `parameterization`) for latents x_noisy [B, 4, h, w] at timesteps t [B]
        and context cond [B, 77, C]. tuning: the SC-Tuner scale and CSC-Tuner hints (see `Tuning`)."""
        return self.model(x_noisy, t, cond, tuning)

    # -- first stage -----------------------------------------------------------------------------------
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image [B, 3, H, W] in [-1, 1] -> posterior over unscaled latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor) -> torch.Tensor:
        """A posterior sample (or a given tensor) times `scale_factor`: the latent the UNet sees."""
        z = (
            encoder_posterior.sample()
            if isinstance(encoder_posterior, DiagonalGaussianDistribution)
            else encoder_posterior
        )
        return self.scale_factor * z

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent [B, 4, h, w] -> image [B, 3, 8h, 8w] in (about) [-1, 1]."""
        return self.first_stage_model.decode(z / self.scale_factor)

    # -- forward process and parameterisations (DDPM eq. 4; Salimans & Ho 2022 for v) -------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x_0."""
        return _extract(self.sqrt_alphas_cumprod, t, x) * noise - _extract(self.sqrt_one_minus_alphas_cumprod, t, x) * x

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(a_t) x_t - sqrt(1 - a_t) v."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(a_t) v + sqrt(1 - a_t) x_t."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_t) * v + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        )
