"""The Stable Diffusion UNet in the CompVis layout (`openaimodel.py` keys), with explicit encoder, middle
and decoder sections.

Keys: `time_embed.{0,2}`, `input_blocks.{i}.{j}`, `middle_block.{0,1,2}`, `output_blocks.{i}.{j}`,
`out.{0,2}`. Block i of the encoder pushes one skip; output block i pops one (decoder order).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import SpatialTransformer
from .config import UNetConfig
from .layers import Conv2d, recompute_frozen
from .tuners import Control, CSCTuner, SCTuner, SkipIdentity


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of timesteps t [B]: cat([cos, sin]), freqs exp(-ln(P) * i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (32 groups, eps 1e-5) computed in fp32 whatever the input dtype, as the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """GN-SiLU-conv, add the projected time embedding, GN-SiLU-conv, plus a (1x1 conv) skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),  # holds index 2 so the conv is out_layers.3
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in_layers(x) and out_layers(h), with GroupNorm + SiLU recomputed in backward when frozen (the
        # Dropout at out_layers.2 has p = 0)
        h = self.in_layers[2](self._norm_silu(self.in_layers[0], x))
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers[3](self._norm_silu(self.out_layers[0], h))

    @staticmethod
    def _norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return recompute_frozen(lambda x: F.silu(norm(x)), x, norm)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: ResBlocks take the time embedding, SpatialTransformers the text context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps/v prediction network: (x [B, 4, h, w], t [B], context [B, 77, C]) -> [B, 4, h, w].

    Activations run in channels_last (NHWC): oneDNN/cuDNN convolutions are faster in it, and the
    SpatialTransformer's [B, C, H, W] <-> [B, HW, C] reshapes become free views. Keep the conv weights in
    channels_last too (`.to(memory_format=torch.channels_last)`; `load_model` does it); either layout
    gives the same values up to fp32 round-off.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_ch = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def transformer(channels: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(channels)
            return SpatialTransformer(
                channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.use_linear_in_transformer
            )

        # Encoder: conv_in, then per level num_res_blocks x (ResBlock [+ attention]) and a Downsample.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(ResBlock(ch, emb_ch, ch), transformer(ch), ResBlock(ch, emb_ch, ch))

        # Decoder: per level (num_res_blocks + 1) x (ResBlock on cat([h, skip]) [+ attention]) [+ Upsample].
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_ch, cfg.model_channels * mult)]
                ch = cfg.model_channels * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1)
        )

        # SCEdit: one tuner slot per skip (decoder order), parameter-free until a tuner is attached, and
        # the attached CSC-Tuner controllers. Neither adds keys to the base model.
        self.tuners = nn.ModuleList(SkipIdentity() for _ in self.output_blocks)
        self.controllers = nn.ModuleList()
        self.checkpoint_decoder = False  # training: recompute decoder blocks in backward instead of storing
        self.to(memory_format=torch.channels_last)

    def attach_sc_tuners(self, down_ratio: float = 1.0, skips: list[int] | None = None, op: str = "linear"):
        """Put fresh (identity) SC-Tuners on the given skips (decoder order; default all); returns them."""
        skips = range(len(self.output_blocks)) if skips is None else skips
        if any(not 0 <= m < len(self.output_blocks) for m in skips):
            raise ValueError(f"skip indices {list(skips)} out of range: this UNet has {len(self.output_blocks)} skips")
        chans = self.cfg.skip_channels()
        p = next(self.parameters())
        for m in skips:
            self.tuners[m] = SCTuner(chans[m], down_ratio, op).to(p.device, p.dtype)
        return [self.tuners[m] for m in skips]

    def attach_controller(self, controller: CSCTuner) -> CSCTuner:
        self.controllers.append(controller)
        return controller

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        tuner_scale: float = 1.0,
        control: Control | None = None,
    ) -> torch.Tensor:
        """control: hints for the attached controllers (see `Control`); None or empty: no control."""
        control = control or Control()
        if control.hints and not len(control.hints) == len(control.weights) == len(self.controllers):
            raise ValueError(
                f"control has {len(control.hints)} hint sets and {len(control.weights)} weights; "
                f"{len(self.controllers)} controllers are attached"
            )
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))  # [B, 4C]

        # -- encoder: every block's output is a skip connection --
        hs = []
        h = x.contiguous(memory_format=torch.channels_last)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)

        # -- middle --
        h = self.middle_block(h, emb, context)

        # -- decoder: pop the matching skip, edit it (SCEdit), concatenate (h first), run the block --
        for i, module in enumerate(self.output_blocks):
            skip = hs.pop()
            edited = self.tuners[i](skip, tuner_scale)  # skip + s * (T(skip) - skip); identity without tuner
            controllers = self.controllers[: len(control.hints)]  # none when no hints are given
            for ctrl, hints, w in zip(controllers, control.hints, control.weights, strict=True):
                edited = edited + (control.scale * w) * ctrl.residual(i, skip, hints[i])  # CSC-Tuner, eq. 7
            h = torch.cat([h, edited], dim=1)
            h = self._decoder_block(module, h, emb, context)

        return self.out(h).contiguous()

    def _decoder_block(self, module: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor):
        if self.checkpoint_decoder and h.requires_grad:
            # non-reentrant checkpointing: correct with frozen weights and trainable inputs
            return checkpoint(module, h, emb, context, use_reentrant=False)
        return module(h, emb, context)
