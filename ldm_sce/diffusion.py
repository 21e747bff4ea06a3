"""`LatentDiffusion` with the CompVis attribute tree and method names, and the DDPM noise schedule.

Attribute tree (= checkpoint prefixes): `model.diffusion_model` (UNet), `first_stage_model` (VAE),
`cond_stage_model` (text encoder), and the 12 schedule buffers at top level.
"""

from __future__ import annotations

import torch
from torch import nn

from .autoencoder import AutoencoderKL, DiagonalGaussianDistribution
from .config import ModelConfig
from .text_encoders import Conditioner, build_text_encoder
from .tuners import Tuning
from .unet import UNetModel

SCHEDULE_BUFFERS = tuple(
    "betas alphas_cumprod alphas_cumprod_prev sqrt_alphas_cumprod sqrt_one_minus_alphas_cumprod "
    "log_one_minus_alphas_cumprod sqrt_recip_alphas_cumprod sqrt_recipm1_alphas_cumprod posterior_variance "
    "posterior_log_variance_clipped posterior_mean_coef1 posterior_mean_coef2".split()
)


def _betas(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """SD's 'linear' betas (linear in sqrt space), float64."""
    return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2


def discrete_sigmas(linear_start: float, linear_end: float, timesteps: int) -> torch.Tensor:
    """The training sigmas [T], ascending, as sgm computes them (`LegacyDDPMDiscretization`, SDXL's sampler):
    (1 - a) / a in float64, cast to float32, then the square root in float32."""
    ac = torch.cumprod(1.0 - _betas(linear_start, linear_end, timesteps), dim=0)
    return ((1.0 - ac) / ac).float().sqrt()


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1): sqrt(alphas_cumprod) shifted and
    scaled so that its first value is kept and its last is 0 (at t = T the model sees pure noise, as it does
    when sampling starts). Only a v-prediction model can be trained on it (eps is undefined at SNR 0)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    ac = root**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def make_schedule(
    linear_start: float, linear_end: float, timesteps: int, zero_snr: bool = False
) -> dict[str, torch.Tensor]:
    """The 'linear' DDPM schedule of SD (betas linear in sqrt space), computed in float64, stored float32;
    zero_snr: rescaled to zero terminal SNR (`zero_terminal_snr`)."""
    betas = _betas(linear_start, linear_end, timesteps)
    if zero_snr:
        betas = zero_terminal_snr(betas)
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


# The conditioning the UNet takes: the context tensor (SD1, SD2), or SDXL's {"crossattn", "vector"}.
Cond = torch.Tensor | dict[str, torch.Tensor]


def cat_cond(conds: list[Cond]) -> Cond:
    """Conditionings concatenated along the batch (e.g. the CFG batch cat([uc, c]))."""
    if isinstance(conds[0], dict):
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
    return torch.cat(conds)


def cond_batch_size(cond: Cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` (the `model.diffusion_model.*` checkpoint prefix)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, tuning: Tuning | None = None) -> torch.Tensor:
        if isinstance(cond, dict):  # SDXL (sgm's "crossattn" and "vector" keys)
            return self.diffusion_model(x, t, cond["crossattn"], tuning, y=cond["vector"])
        return self.diffusion_model(x, t, cond, tuning)


class LatentDiffusion(nn.Module):
    """Stable Diffusion: text-conditioned denoising in the KL autoencoder's latent space.

    SDXL (`cfg.family == 'sdxl'`) holds its text towers as `conditioner.embedders.{0,1}` (sgm's tree) instead
    of `cond_stage_model`, and its files store no schedule buffers (so here they are not saved either)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = DiffusionWrapper(UNetModel(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        if cfg.text2 is not None:
            self.conditioner = Conditioner(cfg.text, cfg.text2)
        else:
            self.cond_stage_model = build_text_encoder(cfg.text)
        self.parameterization = cfg.parameterization
        self.scale_factor = cfg.scale_factor
        self.num_timesteps = cfg.timesteps
        self.zero_snr = False
        self._register_schedule()

    def _register_schedule(self, device: torch.device | None = None) -> None:
        cfg = self.cfg
        for name, value in make_schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps, self.zero_snr).items():
            self.register_buffer(name, value if device is None else value.to(device), persistent=cfg.text2 is None)

    def set_zero_terminal_snr(self, on: bool = True) -> LatentDiffusion:
        """Train (or sample) on the schedule rescaled to zero terminal SNR (Lin et al. 2024); v prediction only.
        Sampling from it: DDIM (the k-diffusion samplers need a finite largest sigma)."""
        if on and self.parameterization != "v":
            raise ValueError(
                "zero terminal SNR needs a v-prediction model (eps cannot be predicted from pure noise); this "
                f"model predicts {self.parameterization}"
            )
        self.zero_snr = on
        self._register_schedule(self.betas.device)
        return self

    def _apply(self, fn, recurse=True):
        """As nn.Module's (which .to(dtype), .half() and .bfloat16() go through), but the noise schedule stays
        float32: a half-precision copy rounds alphas_cumprod near t = 0 to 1, which breaks sampling."""
        super()._apply(fn, recurse)
        if any(getattr(self, name).dtype != torch.float32 for name in SCHEDULE_BUFFERS):
            self._register_schedule(self.betas.device)
        return self

    # -- conditioning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def get_learned_conditioning(
        self,
        prompts: list[str],
        original_size: tuple[int, int] | None = None,
        crop_coords: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
    ) -> Cond:
        """Prompts -> the UNet's conditioning: the context [B, 77, context_dim] (SD1, SD2), or for SDXL
        {"crossattn": [B, 77, 2048], "vector": [B, 2816]} with the micro-conditioning original_size (h, w),
        crop_coords (top, left) and target_size (h, w) (defaults: the native size, (0, 0), the native size)."""
        if self.cfg.text2 is None:
            if (original_size, crop_coords, target_size) != (None, None, None):
                raise ValueError(f"original_size, crop_coords and target_size are SDXL's; this is {self.cfg.family}")
            return self.cond_stage_model.encode(list(prompts))
        native = (self.cfg.native_size, self.cfg.native_size)
        sizes = [*(original_size or native), *(crop_coords or (0, 0)), *(target_size or native)]
        return self.conditioner(list(prompts), torch.tensor([sizes] * len(prompts), dtype=torch.float32))

    @torch.no_grad()
    def get_unconditional_conditioning(self, c: Cond, negative_prompts: list[str] | None = None) -> Cond:
        """The unconditional branch of guidance for conditioning c. SD1/SD2: the negative prompts encoded (the
        empty prompt by default). SDXL with no negative prompts: sgm's, both text parts zero (context and
        pooled), the size embeddings of c kept; with negative prompts, they are encoded with c's sizes."""
        b = cond_batch_size(c)
        if self.cfg.text2 is None:
            return self.get_learned_conditioning(negative_prompts or [""] * b)
        pooled_dim = self.cfg.text2.embed_dim
        if negative_prompts is None:
            vector = torch.cat([torch.zeros_like(c["vector"][:, :pooled_dim]), c["vector"][:, pooled_dim:]], dim=1)
            return {"crossattn": torch.zeros_like(c["crossattn"]), "vector": vector}
        uc = self.get_learned_conditioning(negative_prompts)
        return {
            "crossattn": uc["crossattn"],
            "vector": torch.cat([uc["vector"][:, :pooled_dim], c["vector"][:, pooled_dim:]], 1),
        }

    # -- denoiser --------------------------------------------------------------------------------------
    def apply_model(
        self,
        x_noisy: torch.Tensor,
        t: torch.Tensor,
        cond: Cond,
        tuning: Tuning | None = None,
    ) -> torch.Tensor:
        """UNet output (eps or v, per `parameterization`) for latents x_noisy [B, 4, h, w] at timesteps t [B]
        and conditioning cond (the context [B, 77, C], or SDXL's dict). tuning: the SC-Tuner scale and CSC-Tuner
        hints (see `Tuning`)."""
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
