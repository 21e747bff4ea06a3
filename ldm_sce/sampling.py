"""Samplers as plain functions over a denoiser, and classifier-free guidance as a small wrapper.

A `Denoiser` is the model as every sampler sees it, wrapped once: `denoiser.eps(x, t)` is the predicted
noise of latents x [B, 4, h, w] at DDPM timesteps t [B] (long on the schedule's own steps, float32 when
fractional; on the CPU, where the schedule is computed: the eps function moves t to x's device, so the host
reads t without waiting for the device), and `denoiser(x, sigma)` the x0 estimate at noise level sigma
(k-diffusion's form: x = x0 + sigma * eps, sigma = sqrt((1 - a) / a)). `cfg_denoiser` builds it from a
model, with guidance; v-prediction is converted to eps there (`eps = sqrt(a) v + sqrt(1-a) x`), so every
sampler is written once. Samplers take an optional `callback`, called after every step with a `Step` (the
latents and the x0 estimate, e.g. for previews and progress).

- `sample_ddim`, `sample_plms`: the CompVis samplers exactly (uniform timesteps `range(0, T, T // S) + 1`,
  the last step's alpha_prev = alphas_cumprod[0]); DDIM eq. 12 of Song et al. 2021.
- `sample_ddpm`: DDPM's ancestral sampling on the same timesteps (diffusers' DDPMScheduler).
- `sample_euler`, `sample_euler_ancestral`, `sample_heun`, `sample_lms`, `sample_dpmpp_2m`,
  `sample_dpmpp_2m_sde`, `sample_dpmpp_sde`, `sample_dpmpp_2s_ancestral`, `sample_unipc`: k-diffusion's
  samplers in sigma space (AUTOMATIC1111's list; written in `k_diffusion.py`, re-exported here), on Karras,
  exponential or uniform sigmas (`SCHEDULES`). The stochastic ones take a `noise_fn`; `sample` gives every
  image its own stream, from its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import Cond, cat_cond, cond_batch_size, discrete_sigmas
from .images import NonFiniteError
from .k_diffusion import (  # noqa: F401 (re-exported: the k-diffusion samplers are part of this API)
    Callback,
    NoiseFn,
    Step,
    model_sigmas,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
    sample_unipc,
    sigma_to_t,
    sigmas_exponential,
    sigmas_karras,
    sigmas_uniform,
    t_to_sigma,
)
from .tuners import Tuning

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = (
    "ddim",
    "plms",
    "euler",
    "euler_a",
    "heun",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_sde",
    "dpmpp_2s_a",
    "ddpm",
)
# AUTOMATIC1111's names; with " Karras" / " Exponential" they also pick the schedule
SAMPLER_NAMES = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2s_a": "DPM++ 2S a",
    "unipc": "UniPC",
    "ddpm": "DDPM",
}
TIMESTEP_SAMPLERS = ("ddim", "plms", "ddpm")  # on DDPM timesteps; the others on a sigma schedule
SCHEDULES = ("karras", "exponential", "uniform")  # sigma schedules of the k-diffusion samplers
STOCHASTIC = ("euler_a", "dpmpp_2m_sde", "dpmpp_sde", "dpmpp_2s_a", "ddpm")
# how a run's timesteps / noise levels are spaced: CompVis's (SD1/SD2's default) or sgm's trailing (SDXL's)
SPACINGS = ("compvis", "trailing")


# ---------------------------------------------------------------------------------------------------------
# The denoiser, and guidance
# ---------------------------------------------------------------------------------------------------------


class Denoiser:
    """A noise predictor `eps_fn(x, t) -> eps` with the schedule it was trained on (alphas_cumprod [T]); the
    samplers give t on the CPU and eps_fn moves it to x's device (`cfg_denoiser`'s does).

    `sigmas` [T] ascending: the training noise levels (default: from alphas_cumprod in float64, as
    k-diffusion). `quantize`: give the UNet the index of the nearest training sigma and use that sigma (sgm,
    SDXL's reference sampler), instead of the fractional timestep interpolated in log sigma (k-diffusion)."""

    def __init__(
        self,
        eps_fn: EpsFn,
        alphas_cumprod: torch.Tensor,
        sigmas: torch.Tensor | None = None,
        quantize: bool = False,
    ):
        self.eps = eps_fn
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = model_sigmas(alphas_cumprod) if sigmas is None else sigmas  # [T], ascending
        self.quantize = quantize

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 estimate at noise level sigma (a scalar tensor): the UNet sees x / sqrt(sigma^2 + 1) at t(sigma)."""
        if self.quantize:
            idx = (sigma.to(self.sigmas.dtype) - self.sigmas).abs().argmin()
            sigma, t = self.sigmas[idx], idx
        else:
            t = sigma_to_t(sigma, self.sigmas).to(torch.float32)
            if torch.equal(t, t.round()):  # on the schedule's own sigmas (t is on the CPU here: no sync)
                t = t.long()
        c_in = (sigma**2 + 1) ** -0.5
        eps = self.eps(x * c_in.to(x.dtype), t.expand(x.shape[0]))
        return x - sigma.to(x.dtype) * eps


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor to `device` without waiting for the GPU's queue (pinned, non-blocking copy)."""
    if device.type == "cuda":
        return t.contiguous().pin_memory().to(device, non_blocking=True)
    return t.to(device)


def cfg_denoiser(
    model: LatentDiffusion,
    cond: Cond,
    uncond: Cond | None,
    scale: float,
    tuning: Tuning | None = None,
    spacing: str = "compvis",
    rescale: float = 0.0,
) -> Denoiser:
    """The model with classifier-free guidance: one UNet call on cat([x, x]) with cat([uncond, cond]),
    `e = e_u + scale * (e_c - e_u)`. With `uncond=None` or scale 1, a single conditional call. rescale phi
    (Lin et al. 2024, diffusers' `guidance_rescale`): e = phi e std(e_c) / std(e) + (1 - phi) e, stds per image
    over the model's output (eps or v).

    tuning (SCEdit) goes to the UNet; its control hints feed both CFG branches and act while the sampling
    progress 1 - t/T lies in `tuning.control_range`. spacing 'trailing': sgm's denoiser (its float32
    training sigmas, quantized; see `Denoiser`). A zero-terminal-SNR schedule is sampled with its last
    alpha_cumprod 2^-24 instead of 0 (diffusers' clamp): DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a) needs a > 0."""
    ac = model.alphas_cumprod
    if model.zero_snr:
        ac = torch.cat([ac[:-1], ac.new_full((1,), 2.0**-24)])
    guided = uncond is not None and scale != 1.0
    tuning = tuning or Tuning()
    batch_tuning = tuning.repeat(2) if guided else tuning
    both = cat_cond([uncond, cond]) if guided else None
    timed = tuning.control is not None and tuple(tuning.control_range) != (0.0, 1.0)

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        now = batch_tuning.at(1.0 - float(t.max()) / len(ac)) if timed else batch_tuning  # t on the CPU: no sync
        t = _to_device(t, x.device)
        if not guided:
            out = model.apply_model(x, t, cond, now)
        else:
            out_u, out_c = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both, now).chunk(2)
            out = out_u + scale * (out_c - out_u)
            if rescale:
                dims = list(range(1, out.ndim))
                rescaled = out * (out_c.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
                out = rescale * rescaled + (1 - rescale) * out
        if model.parameterization == "v":  # linear in the output, so guiding v then converting equals guiding eps
            a = _alpha_at(ac, t).to(x.dtype).view(-1, 1, 1, 1)
            out = a.sqrt() * out + (1.0 - a).sqrt() * x
        return out

    if _check_spacing(spacing) == "trailing":
        cfg = model.cfg
        return Denoiser(eps_fn, ac, discrete_sigmas(cfg.linear_start, cfg.linear_end, cfg.timesteps), quantize=True)
    return Denoiser(eps_fn, ac)


def _check_spacing(spacing: str) -> str:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return spacing


def _alpha_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod at integer t, or through the interpolated sigma at fractional (float) t (k-diffusion's
    rule). The dtype decides, not the values: reading them would be a host sync per step on a GPU."""
    ac = alphas_cumprod.to(t.device, torch.float32)
    if not torch.is_floating_point(t):
        return ac[t]
    sigma = t_to_sigma(t, model_sigmas(ac))
    return (1.0 / (1.0 + sigma**2)).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# DDIM and PLMS (CompVis)
# ---------------------------------------------------------------------------------------------------------


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """CompVis 'uniform' DDIM timesteps, ascending: range(0, T, T // S) + 1.

    As the original, this can hold one step more than S when S does not divide T (S=30: 31 steps). Where
    the original would index past the schedule (S=3 gives t=1000) that last entry is dropped."""
    if not 0 < steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ts = torch.arange(0, num_train_timesteps, num_train_timesteps // steps) + 1
    return ts[ts < num_train_timesteps]


def trailing_timesteps(steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """sgm's (SDXL's reference) timesteps, ascending: floor(linspace(T - 1, 0, S, endpoint=False)) reversed
    (S = 5: 199, 399, 599, 799, 999). diffusers' 'trailing' rounds instead, which differs at 30 steps."""
    if not 0 < steps <= num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    ts = np.linspace(num_train_timesteps - 1, 0, steps, endpoint=False).astype(np.int64)[::-1]
    return torch.from_numpy(ts.copy())


def _ddim_alphas(alphas_cumprod: torch.Tensor, steps: int, x: torch.Tensor, spacing: str = "compvis"):
    """(timesteps, alpha_t, alpha_prev) of the DDIM steps. compvis: CompVis's timesteps, the last step's
    alpha_prev is alphas_cumprod[0]; trailing: sgm's timesteps, the last alpha_prev is 1 (a clean image)."""
    ac = alphas_cumprod.to(torch.float64).cpu()
    if _check_spacing(spacing) == "trailing":
        ts = trailing_timesteps(steps, len(alphas_cumprod))
        a_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[ts[:-1]]])
    else:
        ts = ddim_timesteps(steps, len(alphas_cumprod))
        a_prev = torch.cat([ac[:1], ac[ts[:-1]]])
    return ts, ac[ts].to(x.device, x.dtype), a_prev.to(x.device, x.dtype)


def _ddim_step(x, eps, a_t, a_prev, sigma, noise):
    """x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eq. 12)."""
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
    return (x_prev + sigma * noise if noise is not None else x_prev), x0


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    noise_fn: NoiseFn | None = None,
    t_start: int | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    spacing: str = "compvis",
) -> torch.Tensor:
    """DDIM from x at the last timestep (or at ddim index `t_start` for img2img) down to x0.

    noise_fn draws the per-step noise for eta > 0 (see `NoiseStream` for per-image reproducibility)."""
    ts, a, a_prev = _ddim_alphas(denoiser.alphas_cumprod, steps, x, spacing)
    sigmas = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    n = len(ts) if t_start is None else t_start
    for k, i in enumerate(tqdm(reversed(range(n)), total=n, disable=not progress, desc="DDIM")):
        eps = denoiser.eps(x, torch.full((x.shape[0],), int(ts[i])))
        x, x0 = _ddim_step(x, eps, a[i], a_prev[i], sigmas[i], noise_fn() if eta > 0 else None)
        if callback is not None:
            callback(Step(k, n, x, x0))
    return x


def ddim_stochastic_encode(
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    steps: int,
    t_enc: int,
    noise: torch.Tensor,
    spacing: str = "compvis",
) -> torch.Tensor:
    """img2img (SDEdit) start as CompVis: noise x0 to the DDIM timestep of index t_enc; sampling then
    runs `sample_ddim(..., t_start=t_enc)`, i.e. from index t_enc - 1 down to 0."""
    _, a, _ = _ddim_alphas(alphas_cumprod, steps, x0, spacing)
    return a[t_enc].sqrt() * x0 + (1 - a[t_enc]).sqrt() * noise


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int,
    t_start: int | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    spacing: str = "compvis",
) -> torch.Tensor:
    """CompVis PLMS (pseudo linear multistep, Liu et al. 2022): DDIM's update with eps replaced by an
    Adams-Bashforth combination of the last eps; the first step uses a second-order (Heun-like) estimate."""
    ts, a, a_prev = _ddim_alphas(denoiser.alphas_cumprod, steps, x, spacing)
    n = len(ts) if t_start is None else t_start
    order = list(reversed(range(n)))
    old_eps: list[torch.Tensor] = []
    for k, i in enumerate(tqdm(order, disable=not progress, desc="PLMS")):
        t = torch.full((x.shape[0],), int(ts[i]))
        eps = denoiser.eps(x, t)
        if not old_eps:
            x_next, _ = _ddim_step(x, eps, a[i], a_prev[i], 0.0, None)
            i_next = order[min(k + 1, len(order) - 1)]
            t_next = torch.full_like(t, int(ts[i_next]))
            eps_prime = (eps + denoiser.eps(x_next, t_next)) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x, x0 = _ddim_step(x, eps_prime, a[i], a_prev[i], 0.0, None)
        old_eps = (old_eps + [eps])[-3:]
        if callback is not None:
            callback(Step(k, n, x, x0))
    return x


def sigmas_trailing(denoiser: Denoiser, steps: int) -> torch.Tensor:
    """sgm's discretization: the denoiser's training sigmas at `trailing_timesteps`, descending, then 0."""
    ts = trailing_timesteps(steps, len(denoiser.sigmas)).flip(0)
    return torch.cat([denoiser.sigmas[ts], torch.zeros(1, dtype=denoiser.sigmas.dtype)])


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoiser,
    x: torch.Tensor,
    steps: int,
    noise_fn: NoiseFn,
    callback: Callback | None = None,
    progress: bool = False,
    spacing: str = "compvis",
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020) on the CompVis timesteps (diffusers' DDPMScheduler with
    'leading' spacing and steps_offset 1; or sgm's trailing ones): x_prev = the posterior mean of x0 and x,
    plus the posterior ("fixed small") standard deviation times noise; the last step goes to alpha 1."""
    ac = denoiser.alphas_cumprod.to(torch.float64).cpu()
    timesteps = trailing_timesteps if _check_spacing(spacing) == "trailing" else ddim_timesteps
    ts = timesteps(steps, len(ac)).flip(0)
    for k, t in enumerate(tqdm(ts.tolist(), disable=not progress, desc="DDPM")):
        a_t = ac[t]
        a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.ones((), dtype=torch.float64)
        alpha, beta = a_t / a_prev, 1 - a_t / a_prev
        eps = denoiser.eps(x, torch.full((x.shape[0],), t))
        x0 = (x - (1 - a_t).sqrt().to(x.dtype) * eps) / a_t.sqrt().to(x.dtype)
        mean = (a_prev.sqrt() * beta / (1 - a_t)).to(x.dtype) * x0 + (alpha.sqrt() * (1 - a_prev) / (1 - a_t)).to(
            x.dtype
        ) * x
        var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)  # 1e-20 at the last step, as diffusers
        x = mean + var.sqrt().to(x.dtype) * noise_fn()
        if callback is not None:
            callback(Step(k, len(ts), x, x0))
    return x


def resolve_sampler(name: str) -> tuple[str, str | None]:
    """(sampler, schedule or None) of a sampler name: ours (`dpmpp_2m`) or AUTOMATIC1111's display name, with
    an optional schedule suffix ("DPM++ 2M Karras", "Euler a", "DPM++ SDE Exponential"); case-insensitive."""
    key = name.strip().lower()
    if key in SAMPLERS:
        return key, None
    for schedule in (None, *SCHEDULES):
        for sampler, display in SAMPLER_NAMES.items():
            if key == (display.lower() + (f" {schedule}" if schedule else "")):
                if schedule and sampler in TIMESTEP_SAMPLERS:
                    break
                return sampler, schedule
    names = ", ".join([*SAMPLERS, *SAMPLER_NAMES.values()])
    raise ValueError(f"unknown sampler {name!r}; choose one of {names} (A1111's names may end in Karras/Exponential)")


def default_schedule(sampler: str) -> str:
    """The sigma schedule a k-diffusion sampler uses when none is asked: Karras for the DPM++ family."""
    return "karras" if sampler.startswith("dpmpp") else "uniform"


def display_name(sampler: str, schedule: str | None = None) -> str:
    """A1111's name of a sampler and schedule (as PNG parameters write it): "DPM++ 2M Karras"."""
    schedule = None if sampler in TIMESTEP_SAMPLERS else (schedule or default_schedule(sampler))
    return SAMPLER_NAMES[sampler] + (f" {schedule.capitalize()}" if schedule in ("karras", "exponential") else "")


def batch_noise(shape: tuple[int, ...], seeds: list[int], dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Noise [B, ...] whose row i is drawn on the CPU from its own seed: an image does not depend on the
    batch size or the device it is generated on."""
    rows = [torch.randn(shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


class NoiseStream:
    """Per-image generators for the noise drawn during sampling (eta > 0, ancestral samplers)."""

    def __init__(self, shape, seeds, dtype, device):
        self.shape, self.dtype, self.device = shape, dtype, device
        # offset the stream so it never repeats the initial noise drawn from the same seed
        self.gens = [torch.Generator().manual_seed(s + 0x5EED) for s in seeds]

    def __call__(self) -> torch.Tensor:
        rows = [torch.randn(self.shape[1:], generator=g) for g in self.gens]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)


# ---------------------------------------------------------------------------------------------------------
# One-call API
# ---------------------------------------------------------------------------------------------------------


def sample(
    model: LatentDiffusion,
    c: Cond,
    uc: Cond | None,
    x_T: torch.Tensor | None = None,  # noqa: N803 (CompVis name)
    sampler: str = "ddim",
    steps: int = 50,
    scale: float = 7.5,
    eta: float = 0.0,
    seed: int | list[int] | None = None,
    shape: tuple[int, int] | None = None,
    tuning: Tuning | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    spacing: str | None = None,
    schedule: str | None = None,
    guidance_rescale: float = 0.0,
) -> torch.Tensor:
    """Latents [B, 4, h, w] (scaled, ready for `decode_first_stage`) for conditioning c (the context
    [B, 77, C], or SDXL's dict from `get_learned_conditioning`).

    uc: the unconditional (negative prompt) conditioning for guidance, or None. x_T: the initial noise;
    otherwise drawn per image from `seed + i` (or the given list of seeds) on the CPU, with latent size
    `shape` = (h, w) (default: the model's native size). The same seeds give the same images at any batch
    size. tuning: SCEdit tuner scale and control (`Tuning`); callback: called with a `Step` after every step.
    spacing: 'compvis' (CompVis's DDIM timesteps; uniform sigmas for Euler, Karras for DPM++ 2M; the
    default for SD1/SD2) or 'trailing' (sgm's discretization and start x_T * sqrt(1 + sigma_max^2); the
    default for SDXL). sampler: one of SAMPLERS or an A1111 name ("DPM++ 2M Karras"); schedule: the sigma
    schedule of the k-diffusion samplers (karras, exponential, uniform; default Karras for DPM++, else
    uniform; spacing 'trailing' uses sgm's instead). guidance_rescale phi (Lin et al. 2024): the guided output
    rescaled to the conditional one's standard deviation, mixed in with weight phi. Every noise draw of
    every sampler comes from the image's own seed, so stochastic samplers are batch invariant too.
    """
    sampler, named_schedule = resolve_sampler(sampler)
    schedule = schedule or named_schedule
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(guidance_rescale) and 0.0 <= guidance_rescale <= 1.0):
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    check_sampling_args(steps, scale, eta, model.num_timesteps)
    if model.zero_snr and sampler != "ddim":
        raise ValueError(
            f"a zero-terminal-SNR schedule samples with ddim: {sampler} needs a finite largest sigma (SNR 0 at t = T "
            "is an infinite one)"
        )
    spacing = _check_spacing(spacing or ("trailing" if model.cfg.family == "sdxl" else "compvis"))
    p = next(model.parameters())
    b = cond_batch_size(c)
    seeds = _seeds(seed, b)
    h, w = shape or (model.cfg.image_size, model.cfg.image_size)
    lat_shape = (b, model.model.diffusion_model.cfg.in_channels, h, w)
    x = x_T if x_T is not None else batch_noise(lat_shape, seeds, dtype=p.dtype, device=p.device)
    denoiser = cfg_denoiser(model, c, uc, scale, tuning, spacing, guidance_rescale)
    noise_fn = NoiseStream(tuple(x.shape), seeds, x.dtype, x.device)
    if sampler == "ddim":
        z = sample_ddim(denoiser, x, steps, eta, noise_fn, callback=callback, progress=progress, spacing=spacing)
    elif sampler == "plms":
        z = sample_plms(denoiser, x, steps, callback=callback, progress=progress, spacing=spacing)
    elif sampler == "ddpm":
        z = sample_ddpm(denoiser, x, steps, noise_fn, callback, progress, spacing)
    else:
        if spacing == "trailing":
            sigmas = sigmas_trailing(denoiser, steps)
            x = x * (1.0 + sigmas[0] ** 2).sqrt().to(x.dtype)
        else:
            make = {"karras": sigmas_karras, "exponential": sigmas_exponential, "uniform": sigmas_uniform}
            sigmas = make[schedule or default_schedule(sampler)](model.alphas_cumprod, steps)
            x = x * sigmas[0].to(x.dtype)
        z = _run_k_sampler(sampler, denoiser, x, sigmas, noise_fn, callback, progress)
    if not torch.isfinite(z).all():  # one check at the end: no host sync inside the loop
        raise NonFiniteError(f"the sampled latents hold NaN or inf: {non_finite_cause(model, c, uc, x, tuning)}")
    return z


def check_sampling_args(steps: int, scale: float, eta: float, timesteps: int = 1000) -> None:
    """ValueError naming the allowed range of any argument outside it."""
    if not (type(steps) is int and 1 <= steps <= timesteps):
        raise ValueError(f"steps must be an integer in 1..{timesteps}, got {steps!r}")
    if not (math.isfinite(scale) and 0.0 <= scale <= 100.0):
        raise ValueError(f"the guidance scale must be a number in 0..100, got {scale}")
    if not (math.isfinite(eta) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be in 0..1 (0: deterministic DDIM, 1: DDPM's noise), got {eta}")


def non_finite_cause(model: LatentDiffusion, c: Cond, uc: Cond | None, x: torch.Tensor, tuning: Tuning | None) -> str:
    """The likely cause of non-finite latents, checked in the order the inputs enter."""
    tuning = tuning or Tuning()
    control = tuning.control

    def finite(ts) -> bool:
        return all(torch.isfinite(t).all() for t in ts)

    unet = model.model.diffusion_model
    conds = [c] + ([uc] if uc is not None else [])
    if not finite([t for cond in conds for t in (cond.values() if isinstance(cond, dict) else [cond])]):
        return "the text conditioning holds NaN or inf (the text encoder's weights, or the prompt features given)"
    if not finite([x]):
        return "the initial noise x_T holds NaN or inf"
    scales = [tuning.tuner_scale] if isinstance(tuning.tuner_scale, (int, float)) else list(tuning.tuner_scale)
    if not all(math.isfinite(s) for s in scales):
        return f"the tuner scale is {tuning.tuner_scale}"
    if control is not None and not (math.isfinite(control.scale) and all(math.isfinite(w) for w in control.weights)):
        return f"the control scale or weights are not finite ({control.scale}, {control.weights})"
    if control is not None and not finite([h for hs in control.hints for h in hs]):
        return "the control hints hold NaN or inf (the condition image or the controller's hint encoder)"
    for name, part in (("SC-Tuner", unet.tuners), ("CSC-Tuner controller", unet.controllers)):
        if not finite(part.parameters()):
            return f"the {name} weights hold NaN or inf: the file is damaged or its training diverged"
    if not finite(p for n, p in unet.named_parameters() if not n.startswith(("tuners.", "controllers."))):
        return "the UNet's weights hold NaN or inf"
    return (
        "the inputs and weights are finite, so the computation overflowed: in fp16/bf16 use full precision "
        "(--precision full); otherwise lower the guidance or tuner scale"
    )


def _run_k_sampler(sampler, denoiser, x, sigmas, noise_fn, callback, progress) -> torch.Tensor:
    if sampler in ("euler", "heun", "lms", "dpmpp_2m", "unipc"):
        fn = {"euler": sample_euler, "heun": sample_heun, "lms": sample_lms, "dpmpp_2m": sample_dpmpp_2m}.get(
            sampler, sample_unipc
        )
        return fn(denoiser, x, sigmas, callback=callback, progress=progress)
    fn = {
        "euler_a": sample_euler_ancestral,
        "dpmpp_2m_sde": sample_dpmpp_2m_sde,
        "dpmpp_sde": sample_dpmpp_sde,
        "dpmpp_2s_a": sample_dpmpp_2s_ancestral,
    }[sampler]
    return fn(denoiser, x, sigmas, noise_fn, 1.0, callback, progress)


def _seeds(seed: int | list[int] | None, n: int) -> list[int]:
    if isinstance(seed, list):
        if len(seed) != n:
            raise ValueError(f"got {len(seed)} seeds for a batch of {n}")
        return seed
    base = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
    return [base + i for i in range(n)]


__all__ = [
    "SAMPLERS",
    "Callback",
    "Denoiser",
    "NoiseStream",
    "Step",
    "batch_noise",
    "cfg_denoiser",
    "ddim_stochastic_encode",
    "ddim_timesteps",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_plms",
    "sample_heun",
    "sample_lms",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_ddpm",
    "sample_unipc",
    "resolve_sampler",
    "sigmas_exponential",
    "sigmas_karras",
    "sigmas_uniform",
]
