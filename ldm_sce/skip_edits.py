"""Training-free skip edits for research, in the same decoder loop as the SC-/CSC-Tuners (`UNetModel.forward`).

A skip edit is a module called at every decoder block m, after the tuners and controllers have edited the
skip and before `cat([h, skip])`: `h, skip = edit(m, h, skip)`. `UNetModel.skip_edits` holds them (empty:
the loop is exactly as without), applied in list order. A new one is a subclass of `SkipEdit` with a
`forward(m, h, skip)`, e.g.

    class HalveSkip(SkipEdit):
        def forward(self, m, h, skip):
            return h, skip * 0.5

    unet.skip_edits.append(HalveSkip())

- `SkipScale(scales)`: skip m times scales[m] (0 drops it: `SkipScale.dropping(skips, n)`).
- `FreeU(b1, b2, s1, s2, rule, v2)` (Si et al., CVPR 2024): the first half of h's channels times b (FreeU v2:
  times (b - 1) * normalised mean of h + 1), the skip's low frequencies (a centred 2x2 box of its FFT) times
  s; in fp32 (the fp16 FFT fails on sizes that are not powers of two). Which blocks: rule 'official' (the
  official code and ComfyUI: by h's channels, the widest level's (1280 on SD and SDXL) -> b1/s1, the next
  (640) -> b2/s2) or 'diffusers' (by up-block index: up block 0 -> b1/s1, 1 -> b2/s2).
  `FREEU_PRESETS`: the official values for SD1.5, SD2.1 and SDXL.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from .config import UNetConfig

FREEU_PRESETS = {  # (b1, b2, s1, s2), from the FreeU repository's README
    "sd1": (1.5, 1.6, 0.9, 0.2),
    "sd2": (1.4, 1.6, 0.9, 0.2),
    "sdxl": (1.3, 1.4, 0.9, 0.2),
}
FREEU_RULES = ("official", "diffusers")


class SkipEdit(nn.Module, ABC):
    """The interface: (decoder block m, backbone h [B, C_h, H, W], skip [B, C_m, H, W]) -> (h, skip)."""

    @abstractmethod
    def forward(self, m: int, h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The edited (h, skip) at decoder block m."""


class SkipScale(SkipEdit):
    """skip m times scales[m] (one number per skip, decoder order)."""

    def __init__(self, scales: list[float]):
        super().__init__()
        self.scales = [float(s) for s in scales]

    @classmethod
    def dropping(cls, skips: list[int], n: int) -> SkipScale:
        """Drop (zero) the given skips of a UNet with n of them."""
        return cls([0.0 if m in skips else 1.0 for m in range(n)])

    def forward(self, m, h, skip):
        return h, skip if self.scales[m] == 1.0 else skip * self.scales[m]


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """x with the centred (2 threshold)^2 box of its 2-D spectrum times `scale`, computed in fp32 at least."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # fp16/bf16 FFTs: in fp32
    spectrum = torch.fft.fftshift(torch.fft.fftn(xf, dim=(-2, -1)), dim=(-2, -1))
    h, w = spectrum.shape[-2:]
    mask = torch.ones(h, w, device=x.device)
    mask[h // 2 - threshold : h // 2 + threshold, w // 2 - threshold : w // 2 + threshold] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


class FreeU(SkipEdit):
    """FreeU on the decoder blocks the rule picks (module docstring)."""

    def __init__(
        self,
        cfg: UNetConfig,
        b1: float,
        b2: float,
        s1: float,
        s2: float,
        rule: str = "official",
        v2: bool = False,
    ):
        super().__init__()
        if rule not in FREEU_RULES:
            raise ValueError(f"FreeU rule must be one of {', '.join(FREEU_RULES)}, got {rule!r}")
        self.factors = {1: (b1, s1), 2: (b2, s2)}
        self.v2 = v2
        n = len(cfg.skip_channels)
        per_level = cfg.num_res_blocks + 1
        if rule == "diffusers":  # up block i holds decoder blocks i * per_level .. (i + 1) * per_level - 1
            self.which = [{0: 1, 1: 2}.get(m // per_level) for m in range(n)]
        else:  # by the channels of h entering block m
            widths = sorted({cfg.model_channels * c for c in cfg.channel_mult}, reverse=True)
            rank = {widths[0]: 1, **({widths[1]: 2} if len(widths) > 1 else {})}
            self.which = [rank.get(c) for c in _backbone_channels(cfg)]

    def forward(self, m, h, skip):
        k = self.which[m]
        if k is None:
            return h, skip
        b, s = self.factors[k]
        half = h.shape[1] // 2
        if self.v2:  # structure-related scaling: b where h's channel mean is largest, 1 where smallest
            mean = h.mean(dim=1, keepdim=True)
            lo = mean.amin(dim=(2, 3), keepdim=True)
            hi = mean.amax(dim=(2, 3), keepdim=True)
            factor = (b - 1) * (mean - lo) / (hi - lo) + 1
        else:
            factor = b
        h = torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)
        return h, fourier_filter(skip, s)


def _backbone_channels(cfg: UNetConfig) -> list[int]:
    """The channels of h entering each decoder block: the middle block's, then each block's output."""
    widths = [cfg.model_channels * c for c in cfg.channel_mult]
    per_level = cfg.num_res_blocks + 1
    out = [widths[-1]]  # from the middle block
    for m in range(len(cfg.skip_channels) - 1):
        level = len(widths) - 1 - m // per_level
        out.append(widths[level])
    return out
