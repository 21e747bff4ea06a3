"""The KL autoencoder of Stable Diffusion (CompVis `ldm/modules/diffusionmodules/model.py` layout).

Keys: `encoder.{conv_in, down.{i}.block.{j}, down.{i}.downsample.conv, mid.{block_1,attn_1,block_2},
norm_out, conv_out}`, `decoder.{conv_in, mid.*, up.{i}.block.{j}, up.{i}.upsample.conv, norm_out,
conv_out}`, `quant_conv`, `post_quant_conv`. The decoder's `up.{i}` is indexed by resolution level, so
`up.{L-1}` runs first. GroupNorm eps 1e-6 everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VAEConfig


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 (the original's name)
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """The VAE residual block (no time embedding): norm1-swish-conv1-norm2-swish-conv2, 1x1 nin_shortcut."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q/k/v/proj_out are 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        y = self.norm(x)
        q, k, v = (rearrange(f(y), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))  # one head
        y = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj_out(rearrange(y, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1), then a stride-2 3x3 conv with no padding (asymmetric, as the original)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), an empty `attn` list as in the original, and an
    optional `downsample` / `upsample`."""

    def __init__(self, blocks: list[nn.Module], resample: tuple[str, nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # SD VAEs have no attention outside the middle block
        self.resample = resample[0] if resample else None
        if resample:
            self.add_module(*resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return getattr(self, self.resample)(x) if self.resample else x


class Encoder(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] -> moments [B, 2*z, H/f, W/f], f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        chans = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            blocks = [
                ResnetBlock(chans[i] if j == 0 else chans[i + 1], chans[i + 1]) for j in range(cfg.num_res_blocks)
            ]
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_Level(blocks, None if last else ("downsample", Downsample(chans[i + 1]))))
        self.mid = _Mid(chans[-1])
        self.norm_out = Normalize(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z, h, w] -> image [B, 3, h*f, w*f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)
        self.mid = _Mid(chans[-1])
        levels = []
        block_in = chans[-1]
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, chans[i]))
                block_in = chans[i]
            levels.insert(0, _Level(blocks, ("upsample", Upsample(chans[i])) if i else None))
        self.up = nn.ModuleList(levels)  # up.{i} is resolution level i
        self.norm_out = Normalize(chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussianDistribution:
    """The posterior q(z|x) from moments [B, 2z, h, w]: mean and logvar (clamped to [-30, 20])."""

    def __init__(self, moments: torch.Tensor):
        self.parameters = moments
        self.mean, self.logvar = moments.chunk(2, dim=1)
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, H, W: [B]."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x [B, 3, H, W] in [-1, 1] -> posterior over unscaled latents [B, embed_dim, H/f, W/f]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> image in (about) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior
