"""The Stable Diffusion UNet in the CompVis layout (`openaimodel.py` keys), with explicit encoder, middle
and decoder sections.

Keys: `time_embed.{0,2}`, `input_blocks.{i}.{j}`, `middle_block.{0,1,2}`, `output_blocks.{i}.{j}`,
`out.{0,2}`. Block i of the encoder pushes one skip; output block i pops one (decoder order).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import BasicTransformerBlock, SpatialTransformer
from .config import UNetConfig
from .layers import Conv2d, recompute_frozen
from .tuners import Control, CSCTuner, SCTuner, SkipIdentity, Tuning


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

    The skip layout (channels and resolution of every skip, decoder order) is `cfg.skip_shapes(h, w)`.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.model_channels
        emb_ch = ch * 4
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.has_vector:  # SDXL: the vector conditioning is added to the time embedding (keys label_emb.0.*)
            self.label_emb = nn.Sequential(
                nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
            )

        def transformer(channels: int, depth: int) -> SpatialTransformer:
            heads, dim_head = cfg.heads(channels)
            return SpatialTransformer(channels, heads, dim_head, depth, cfg.context_dim, cfg.use_linear_in_transformer)

        # Encoder (cfg.encoder_blocks): conv_in, then per level ResBlocks [+ attention] and a Downsample.
        self.input_blocks = nn.ModuleList()
        for kind, out_ch, ds in cfg.encoder_blocks:
            if kind == "conv_in":
                layers: list[nn.Module] = [Conv2d(cfg.in_channels, out_ch, 3, padding=1)]
            elif kind == "down":
                layers = [Downsample(ch)]
            else:
                depth = cfg.attention_depth(ds)
                layers = [ResBlock(ch, emb_ch, out_ch)] + ([transformer(out_ch, depth)] if depth else [])
            self.input_blocks.append(TimestepEmbedSequential(*layers))
            ch = out_ch

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_ch, ch), transformer(ch, cfg.depths[-1]), ResBlock(ch, emb_ch, ch)
        )

        # Decoder: output block m runs at the resolution of skip m: a ResBlock on cat([h, skip m])
        # [+ attention], and an Upsample where the next skip has twice the resolution.
        self.output_blocks = nn.ModuleList()
        factors = cfg.skip_factors
        for m, (skip_ch, ds) in enumerate(zip(cfg.skip_channels, factors, strict=True)):
            out_ch = cfg.model_channels * cfg.channel_mult[ds.bit_length() - 1]  # the level of factor ds
            layers = [ResBlock(ch + skip_ch, emb_ch, out_ch)]
            if cfg.attention_depth(ds):
                layers.append(transformer(out_ch, cfg.attention_depth(ds)))
            if m + 1 < len(factors) and factors[m + 1] < ds:
                layers.append(Upsample(out_ch))
            self.output_blocks.append(TimestepEmbedSequential(*layers))
            ch = out_ch

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), Conv2d(ch, cfg.out_channels, 3, padding=1))

        # SCEdit: one tuner slot per skip (decoder order), parameter-free until a tuner is attached, and
        # the attached CSC-Tuner controllers. Neither adds keys to the base model.
        self.tuners = nn.ModuleList(SkipIdentity() for _ in self.output_blocks)
        self.controllers = nn.ModuleList()
        self.skip_edits = nn.ModuleList()  # training-free research edits after the tuners (`skip_edits.py`)
        self.checkpoint_decoder = False  # training: recompute decoder blocks in backward instead of storing
        self.initialize_weights()
        self.to(memory_format=torch.channels_last)

    def initialize_weights(self) -> None:
        """The CompVis init: zero the last conv of every ResBlock, every transformer's proj_out and the
        output conv, so that each residual branch starts as the identity (`zero_module` in openaimodel.py)."""
        zero = [self.out[2]] + [m.out_layers[3] for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj_out for m in self.modules() if isinstance(m, SpatialTransformer)]
        for module in zero:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    # -- SCEdit tuners and controllers ------------------------------------------------------------------

    def attach_sc_tuners(
        self,
        down_ratio: float = 1.0,
        skips: Iterable[int] | None = None,
        op: str = "linear",
        dtype: torch.dtype | None = None,
    ) -> list[SCTuner]:
        """Put fresh (identity) SC-Tuners on the given skips (decoder order; default all); returns them. dtype:
        of their weights (default the UNet's; training keeps them fp32 on a half-precision base)."""
        skips = list(range(len(self.output_blocks)) if skips is None else skips)
        if any(not 0 <= m < len(self.output_blocks) for m in skips):
            raise ValueError(f"skip indices {skips} out of range: this UNet has {len(self.output_blocks)} skips")
        p = next(self.parameters())
        for m in skips:
            self.tuners[m] = SCTuner(self.cfg.skip_channels[m], down_ratio, op).to(p.device, dtype or p.dtype)
        return [self.tuners[m] for m in skips]

    def attach_controller(self, controller: CSCTuner) -> CSCTuner:
        self.controllers.append(controller)
        return controller

    def replace_tuners(self, tuners: Iterable[nn.Module]) -> nn.ModuleList:
        """Put `tuners` in the tuner slots (one per skip, decoder order; `SkipIdentity()` for none) and return
        the previous slots, e.g. to compare a tuned and an untuned forward on the same weights."""
        new = nn.ModuleList(tuners)
        if len(new) != len(self.output_blocks):
            raise ValueError(f"{len(new)} tuner slots for {len(self.output_blocks)} skips")
        old, self.tuners = self.tuners, new
        return old

    def replace_controllers(self, controllers: Iterable[CSCTuner]) -> nn.ModuleList:
        """Attach exactly `controllers` (in order) and return the previously attached ones."""
        old, self.controllers = self.controllers, nn.ModuleList(controllers)
        return old

    def _paired_controls(self, control: Control | None) -> list[tuple[CSCTuner, list[torch.Tensor], float]]:
        """(controller, its hints in decoder order, control scale x its weight) for each attached controller;
        empty without hints."""
        if control is None or not control.hints:
            return []
        if not len(control.hints) == len(control.weights) == len(self.controllers):
            raise ValueError(
                f"control has {len(control.hints)} hint sets and {len(control.weights)} weights; "
                f"{len(self.controllers)} controllers are attached"
            )
        return [
            (ctrl, hints, control.scale * w)
            for ctrl, hints, w in zip(self.controllers, control.hints, control.weights, strict=True)
        ]

    # -- forward ----------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        tuning: Tuning | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tuning: the SC-Tuner scale and the controllers' hints (see `Tuning`); None: tuners at scale 1,
        no control. y [B, adm_in_channels]: SDXL's vector conditioning (required there, absent otherwise)."""
        tuning = tuning or Tuning()
        controls = self._paired_controls(tuning.control)
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype))  # [B, 4C]
        if self.cfg.has_vector:
            if y is None:
                raise ValueError("this UNet (SDXL) takes the vector conditioning y: pass the conditioning dict")
            emb = emb + self.label_emb(y.to(x.dtype))  # [B, 4C]

        # -- encoder: every block's output is a skip connection --
        hs = []
        h = x.contiguous(memory_format=torch.channels_last)  # [B, 4, h, w]
        for block in self.input_blocks:
            h = block(h, emb, context)  # [B, C_k, h / ds_k, w / ds_k]
            hs.append(h)

        # -- middle --
        h = self.middle_block(h, emb, context)  # [B, C, h / ds_max, w / ds_max]

        # -- decoder: pop skip m, edit it (SCEdit), concatenate after h, run output block m --
        for m, block in enumerate(self.output_blocks):
            skip = hs.pop()  # [B, C_m, H_m, W_m]: skip m of cfg.skip_shapes(h, w)
            edited = self.tuners[m](skip, tuning.skip_scale(m))  # SC-Tuner: skip + s (T(skip) - skip), eq. 6
            for ctrl, hints, w in controls:  # CSC-Tuners: + w (hint + MLP(skip + hint)), eq. 7
                edited = edited + w * ctrl.residual(m, skip, hints[m])  # [B, C_m, H_m, W_m]
            for edit in self.skip_edits:  # FreeU, skip scaling, ...: (h, skip) -> (h, skip), in list order
                h, edited = edit(m, h, edited)
            h = torch.cat([h, edited], dim=1)  # [B, C_h + C_m, H_m, W_m]
            h = self._decoder_block(block, h, emb, context)  # [B, C_out, H_m, W_m] (x2 if it upsamples)

        return self.out(h).contiguous()  # [B, 4, h, w]

    def _decoder_block(
        self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        if self.checkpoint_decoder and h.requires_grad:
            # non-reentrant checkpointing: correct with frozen weights and trainable inputs
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)


COMPILE_MODES = ("none", "blocks", "full")


def compile_unet(unet: UNetModel, mode: str = "blocks", **options) -> UNetModel:
    """torch.compile the UNet in place. 'blocks' (regional compilation, as diffusers'
    `compile_repeated_blocks`): every ResBlock and transformer block is compiled on its own, so the decoder
    loop, the tuners and the controllers stay eager, and the tuner-free and tuned UNet share the compiled
    code (attaching or replacing tuners recompiles nothing). 'full': the whole forward (one graph per
    tuning layout). `options` go to torch.compile (e.g. mode='max-autotune'). Returns the UNet."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "full":
        unet.compile(**options)
    elif mode == "blocks":
        for module in unet.modules():
            if isinstance(module, (ResBlock, BasicTransformerBlock)):
                module.compile(**options)
    return unet
