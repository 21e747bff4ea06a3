"""k-diffusion's samplers (Karras et al. 2022 and the DPM-Solver++ / UniPC family) in sigma space, their sigma
schedules and the sigma <-> timestep conversions, and `Step`, what every sampler's callback receives.

Each sampler takes a denoiser (`denoiser(x, sigma)` -> x0 estimate; `ldm_sce.sampling.Denoiser` wraps a
model with guidance), the latents at sigmas[0] scale and the descending sigmas ending in 0; the stochastic
ones take a `noise_fn` drawing the step's noise. `ldm_sce.sampling.sample` picks one by name and gives every
image its own noise stream; `sampling` re-exports all of these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from .sampling import Denoiser

NoiseFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """What a sampler's callback receives after step `i` of `n`: the latents `x` and the model's x0
    estimate `denoised` at that step (both [B, 4, h, w], scaled latents)."""

    i: int
    n: int
    x: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[Step], None]


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for t = 0..T-1 (ascending)."""
    ac = alphas_cumprod.to(torch.float64)
    return ((1 - ac) / ac).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of sigma by linear interpolation in log sigma (k-diffusion / diffusers)."""
    log_sigmas = sigmas.log()
    log_sigma = sigma.to(log_sigmas.dtype).log()
    idx = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
    return (idx - 1).to(w.dtype) + w


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """sigma at (fractional) timesteps t by linear interpolation in log sigma; the inverse of `sigma_to_t`."""
    t = t.to(sigmas.device, sigmas.dtype)
    lo = t.floor().long().clamp(0, len(sigmas) - 2)
    w = t - lo
    return ((1 - w) * sigmas[lo].log() + w * sigmas[lo + 1].log()).exp()


def sigmas_uniform(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sigmas at timesteps linspace(T-1, 0, steps), then 0 (diffusers' 'linspace' spacing)."""
    sig = model_sigmas(alphas_cumprod)
    t = torch.linspace(len(sig) - 1, 0, steps, dtype=torch.float64)
    return torch.cat([t_to_sigma(t, sig), torch.zeros(1, dtype=torch.float64)])


def sigmas_karras(alphas_cumprod: torch.Tensor, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5 between the model's sigma_min and sigma_max, then 0."""
    sig = model_sigmas(alphas_cumprod)
    lo, hi = sig[0].item() ** (1 / rho), sig[-1].item() ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, progress: bool = False
) -> torch.Tensor:
    """Euler (Karras et al. 2022 alg. 2 without churn). x starts at sigmas[0] scale (x_T * sigmas[0])."""
    n = len(sigmas) - 1
    for i in tqdm(range(n), disable=not progress, desc="Euler"):
        den = denoiser(x, sigmas[i])
        d = (x - den) / sigmas[i].to(x.dtype)
        x = x + d * (sigmas[i + 1] - sigmas[i]).to(x.dtype)
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_fn: NoiseFn,
    eta: float = 1.0,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise of scale sigma_up."""
    n = len(sigmas) - 1
    for i in tqdm(range(n), disable=not progress, desc="Euler a"):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoiser(x, s)
        s_up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        s_down = (s_next**2 - s_up**2) ** 0.5
        x = x + (x - den) / s.to(x.dtype) * (s_down - s).to(x.dtype)
        if s_next > 0:
            x = x + noise_fn() * s_up.to(x.dtype)
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, progress: bool = False
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, alg. 2) in k-diffusion's form (the sampler A1111 users know as
    "DPM++ 2M"): exponential integrator in log sigma, first step first order, the last step (to sigma 0)
    returns the denoised estimate. The UNet sees fractional timesteps, as k-diffusion (diffusers rounds)."""
    n = len(sigmas) - 1
    old_den = None
    for i in tqdm(range(n), disable=not progress, desc="DPM++ 2M"):
        den = denoiser(x, sigmas[i])
        s, s_next = sigmas[i], sigmas[i + 1]
        if s_next == 0:
            x = den
        else:
            t, t_next = -s.log(), -s_next.log()
            h = t_next - t
            if old_den is None:
                d = den
            else:
                r = (t - (-sigmas[i - 1].log())) / h
                d = (1 + 1 / (2 * r)).to(x.dtype) * den - (1 / (2 * r)).to(x.dtype) * old_den
            x = (s_next / s).to(x.dtype) * x - torch.expm1(-h).to(x.dtype) * d
            old_den = den
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


def sigmas_exponential(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` sigmas evenly spaced in log sigma between the model's sigma_max and sigma_min, then 0."""
    sig = model_sigmas(alphas_cumprod)
    log = torch.linspace(sig[-1].log().item(), sig[0].log().item(), steps, dtype=torch.float64)
    return torch.cat([log.exp(), torch.zeros(1, dtype=torch.float64)])


def _ancestral(s: torch.Tensor, s_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step from s to s_next (k-diffusion's split)."""
    if not eta or s_next == 0:
        return s_next, s_next * 0
    s_up = torch.minimum(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return (s_next**2 - s_up**2) ** 0.5, s_up


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None, progress: bool = False
) -> torch.Tensor:
    """Heun (Karras et al. 2022 alg. 1, no churn): an Euler step corrected with the slope at its end point;
    the last step (to sigma 0) is Euler. Two UNet calls per step but the last."""
    n = len(sigmas) - 1
    for i in tqdm(range(n), disable=not progress, desc="Heun"):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoiser(x, s)
        d = (x - den) / s.to(x.dtype)
        dt = (s_next - s).to(x.dtype)
        if s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoiser(x_2, s_next)) / s_next.to(x.dtype)
            x = x + (d + d_2) / 2 * dt
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


def _lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """The integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j} on the
    nodes sigma_i, ..., sigma_{i-order+1} (exactly, as a polynomial)."""
    nodes = [sigmas[i - k] for k in range(order)]
    poly = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    order: int = 4,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Linear multistep (k-diffusion's LMS, diffusers' LMSDiscreteScheduler): x += sum_j c_j d_{i-j}, the
    c_j the integrals of the Lagrange polynomials through the last `order` slopes d = (x - D) / sigma."""
    n = len(sigmas) - 1
    sig = sigmas.double().cpu().numpy()
    ds: list[torch.Tensor] = []
    for i in tqdm(range(n), disable=not progress, desc="LMS"):
        den = denoiser(x, sigmas[i])
        ds = [(x - den) / sigmas[i].to(x.dtype), *ds][:order]
        k = min(i + 1, order)
        x = x + sum(_lms_coefficient(sig, i, j, k) * ds[j] for j in range(k))
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_fn: NoiseFn,
    eta: float = 1.0,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (k-diffusion's "DPM++ 2S a"): a second-order singlestep update (midpoint
    in log sigma) to sigma_down, then fresh noise of scale sigma_up; eta 0: the deterministic DPM++ 2S."""
    n = len(sigmas) - 1
    for i in tqdm(range(n), disable=not progress, desc="DPM++ 2S a"):
        s = sigmas[i]
        den = denoiser(x, s)
        s_down, s_up = _ancestral(s, sigmas[i + 1], eta)
        if s_down == 0:
            x = x + (x - den) / s.to(x.dtype) * (s_down - s).to(x.dtype)
        else:
            t, t_next = -s.log(), -s_down.log()
            h = t_next - t
            s_mid = (-(t + 0.5 * h)).exp()
            x_2 = (s_mid / s).to(x.dtype) * x - torch.expm1(-0.5 * h).to(x.dtype) * den
            x = (s_down / s).to(x.dtype) * x - torch.expm1(-h).to(x.dtype) * denoiser(x_2, s_mid)
        if sigmas[i + 1] > 0 and eta:
            x = x + noise_fn() * s_up.to(x.dtype)
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_fn: NoiseFn,
    eta: float = 1.0,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++ SDE (k-diffusion's "DPM++ SDE", r = 1/2): two ancestral half steps per step. The two
    noise draws of a step are increments of one Brownian path over sigma (the midpoint's by a Brownian
    bridge), as k-diffusion's Brownian tree gives them; drawn per image from its seed, so the same in
    distribution, not bitwise, as torchsde's. eta 0: the deterministic second-order singlestep solver."""
    n = len(sigmas) - 1
    for i in tqdm(range(n), disable=not progress, desc="DPM++ SDE"):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoiser(x, s)
        if s_next == 0:
            x = x + (x - den) / s.to(x.dtype) * (s_next - s).to(x.dtype)
        else:
            t, t_next = -s.log(), -s_next.log()
            s_mid = (-(t + 0.5 * (t_next - t))).exp()
            w_full, w_mid = _brownian_pair(noise_fn, s, s_mid, s_next) if eta else (None, None)
            sd, su = _ancestral(s, s_mid, eta)  # half step to the midpoint, on den
            x_2 = (sd / s).to(x.dtype) * x - torch.expm1(sd.log() - s.log()).to(x.dtype) * den
            if eta:
                x_2 = x_2 + w_mid * su.to(x.dtype)
            den_2 = denoiser(x_2, s_mid)
            sd, su = _ancestral(s, s_next, eta)  # the whole step, on the midpoint's estimate (r = 1/2)
            x = (sd / s).to(x.dtype) * x - torch.expm1(sd.log() - s.log()).to(x.dtype) * den_2
            if eta:
                x = x + w_full * su.to(x.dtype)
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


def _brownian_pair(noise_fn: NoiseFn, s0, s_mid, s1) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised increments of one Brownian path W over sigma from s0: (W(s1) - W(s0)) / sqrt|s1 - s0| and
    (W(s_mid) - W(s0)) / sqrt|s_mid - s0|, W(s_mid) drawn from the bridge between s0 and s1."""
    z_full, z_bridge = noise_fn(), noise_fn()
    span, part = (s1 - s0).abs(), (s_mid - s0).abs()
    frac = (part / span).to(z_full.dtype)
    w_mid = z_full * span.sqrt().to(z_full.dtype) * frac + z_bridge * (part * (span - part) / span).sqrt().to(
        z_full.dtype
    )
    return z_full, w_mid / part.sqrt().to(z_full.dtype)


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    noise_fn: NoiseFn,
    eta: float = 1.0,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's "DPM++ 2M SDE", midpoint solver): the multistep update of the
    SDE; eta 0 is DPM++ 2M exactly. Noise per interval per image (a Brownian increment)."""
    n = len(sigmas) - 1
    old_den, h_last = None, None
    for i in tqdm(range(n), disable=not progress, desc="DPM++ 2M SDE"):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoiser(x, s)
        if s_next == 0:
            x = den
        else:
            h = s.log() - s_next.log()
            eta_h = eta * h
            x = (s_next / s * (-eta_h).exp()).to(x.dtype) * x + torch.expm1(-h - eta_h).neg().to(x.dtype) * den
            if old_den is not None:
                r = h_last / h
                x = x + (0.5 * torch.expm1(-h - eta_h).neg() / r).to(x.dtype) * (den - old_den)
            if eta:
                x = x + noise_fn() * (s_next * torch.expm1(-2 * eta_h).neg().sqrt()).to(x.dtype)
            h_last = h
        old_den = den
        if callback is not None:
            callback(Step(i, n, x, den))
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int) -> tuple[float, float, list[list[float]], list[float]]:
    """(h phi_1, B(h), R, b) of UniPC's bh2 variant with data prediction (Zhao et al. 2023, alg. 2 and eq. 7)
    at step size h in lambda = -log sigma, for the relative node positions `rks` (the last is 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1 if math.isfinite(hh) else -1.0
    b_h = math.expm1(hh)
    rows, b, factorial = [], [], 1
    for k in range(1, order + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = (h_phi_k / hh if math.isfinite(hh) else 0.0) - 1 / factorial
    return h_phi_1, b_h, rows, b


def _unipc_update(x, m0, ms_prev, lam_prev, lam0, lam_t, s0, s_t, order, corrector_out=None):
    """One UniPC update from the VP sample x at noise level s0 (x0 estimate m0) to s_t: the predictor (UniP),
    or with `corrector_out` (the x0 estimate at s_t) the corrector (UniC). ms_prev / lam_prev: the earlier
    x0 estimates and their lambdas, most recent first."""
    h = lam_t - lam0
    k_prev = order - 1
    rks = [(lam_prev[k] - lam0) / h for k in range(k_prev)] + [1.0]
    d1s = [(ms_prev[k] - m0) / rks[k] for k in range(k_prev)]
    h_phi_1, b_h, rows, b = _unipc_coefficients(h, rks, order)
    alpha_t, sig_t = 1 / math.sqrt(1 + s_t**2), s_t / math.sqrt(1 + s_t**2)
    sig_0 = s0 / math.sqrt(1 + s0**2)
    out = (sig_t / sig_0) * x - (alpha_t * h_phi_1) * m0
    if corrector_out is None:
        if d1s:
            rhos = [0.5] if order == 2 else np.linalg.solve(np.array(rows)[:-1, :-1], np.array(b)[:-1]).tolist()
            out = out - (alpha_t * b_h) * sum(r * d for r, d in zip(rhos, d1s, strict=True))
        return out
    rhos = [0.5] if order == 1 else np.linalg.solve(np.array(rows), np.array(b)).tolist()
    res = sum((r * d for r, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return out - (alpha_t * b_h) * (res + rhos[-1] * (corrector_out - m0))


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    order: int = 2,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), diffusers' default form: bh2, data prediction, multistep order 2 (or 3),
    the corrector after every step but the last reusing that step's UNet call (one call per step), orders
    lowered at the start and for the final step. Runs on VP samples x / sqrt(1 + sigma^2)."""
    n = len(sigmas) - 1
    sig = [float(v) for v in sigmas.double().cpu()]
    lam = [(-math.log(v) if v > 0 else math.inf) for v in sig]
    xs = x / math.sqrt(1 + sig[0] ** 2)
    ms: list[torch.Tensor] = []  # x0 estimates, most recent first
    last_x, last_order = None, 1
    for i in tqdm(range(n), disable=not progress, desc="UniPC"):
        den = denoiser(xs * math.sqrt(1 + sig[i] ** 2), sigmas[i])
        if last_x is not None:  # UniC: correct the step just made with the estimate at its end
            xs = _unipc_update(
                last_x,
                ms[0],
                ms[1:],
                lam[i - 2 :: -1] if i >= 2 else [],
                lam[i - 1],
                lam[i],
                sig[i - 1],
                sig[i],
                last_order,
                den,
            )
        ms = [den, *ms][:order]
        this_order = min(order, n - i, len(ms))
        last_x, last_order = xs, this_order
        xs = _unipc_update(
            xs, ms[0], ms[1:], lam[i - 1 :: -1] if i >= 1 else [], lam[i], lam[i + 1], sig[i], sig[i + 1], this_order
        )
        if callback is not None:
            callback(Step(i, n, xs * math.sqrt(1 + sig[i + 1] ** 2), den))
    return xs * math.sqrt(1 + sig[-1] ** 2)
