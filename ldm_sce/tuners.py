"""SCEdit tuners (Jiang et al., CVPR 2024): SC-Tuner (eq. 5-6) and CSC-Tuner (eq. 7, fig. 4c).

Both edit the UNet's skip connections, one per output block in decoder order (see `UNetModel.forward`):

    skip' = skip + tuner_scale * (T(skip) - skip) + control_scale * sum_i w_i * c_i(skip)

- Several SC-Tuners on one skip (`TunerSet`): by default the weighted sum of their edits,
  skip + s * sum_k s_k (T_k(skip) - skip), which does not depend on their order; or scepter Studio's
  composition, each on the previous one's output: x_k = x_{k-1} + s s_k (T_k(x_{k-1}) - x_{k-1}).

- SC-Tuner: T(x) = x + ln2(GELU(ln1(x))), token-wise over channels; ln2 is zero-initialised, so a fresh
  tuner is an exact identity.
- CSC-Tuner (controller i): a hint encoder takes the condition image (RGB in [0, 1], 8x the latent size)
  to the latent resolution; chained zero-initialised dense convs give one hint per skip (matching its
  channels and resolution); c_i = hint + MLP(skip + hint), MLP being an SC-Tuner's ln2(GELU(ln1(.))).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .config import HINT_STRIDES, UNetConfig


class SkipIdentity(nn.Module):
    """The tuner slot of a skip without a tuner: no parameters, so the base model's keys are unchanged."""

    def forward(self, skip: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return skip


class SCTuner(nn.Module):
    """T(x) = x + ln2(GELU(ln1(x))) on a skip x [B, d, H, W]; hidden width L = int(d * down_ratio).

    op 'linear' (the paper's default): ln1/ln2 are Linear layers applied to each position's channels.
    op 'conv' (paper tab. 5c): 3x3 convolutions instead (with down_ratio 1/8: 22.13M parameters on SD1.5).
    """

    def __init__(self, dim: int, down_ratio: float = 1.0, op: str = "linear"):
        super().__init__()
        hidden = int(dim * down_ratio + 1e-9)  # int(d * ratio) as the official code; robust to L/d round trips
        if op == "linear":
            self.ln1, self.ln2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        elif op == "conv":
            self.ln1, self.ln2 = nn.Conv2d(dim, hidden, 3, padding=1), nn.Conv2d(hidden, dim, 3, padding=1)
        else:
            raise ValueError(f"tuner op must be 'linear' or 'conv', got {op!r}")
        self.op = op
        nn.init.zeros_(self.ln2.weight)
        nn.init.zeros_(self.ln2.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ln2(GELU(ln1(x))): [B, d, H, W] -> [B, d, H, W]."""
        if self.op == "conv":
            return self.ln2(F.gelu(self.ln1(x)))
        y = self.ln2(F.gelu(self.ln1(x.permute(0, 2, 3, 1))))  # tokens [B, H, W, d]
        return y.permute(0, 3, 1, 2)

    def forward(self, skip: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """skip + scale * (T(skip) - skip)."""
        return skip + scale * self.delta(skip)


COMPOSE_MODES = ("sum", "sequential")


class TunerSet(nn.Module):
    """Several SC-Tuners on one skip, each with its weight s_k, combined as `mode` says (module docstring).
    Slots may hold a `SkipIdentity` where a tuner file does not cover this skip."""

    def __init__(self, tuners: list[nn.Module], weights: list[float], mode: str = "sum"):
        super().__init__()
        if mode not in COMPOSE_MODES:
            raise ValueError(f"tuner composition must be one of {', '.join(COMPOSE_MODES)}, got {mode!r}")
        if len(tuners) != len(weights):
            raise ValueError(f"{len(tuners)} tuners but {len(weights)} weights")
        self.tuners = nn.ModuleList(tuners)
        self.weights = [float(w) for w in weights]
        self.mode = mode

    def forward(self, skip: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        active = [(t, w) for t, w in zip(self.tuners, self.weights, strict=True) if isinstance(t, SCTuner)]
        if self.mode == "sum":
            return skip + scale * sum(w * t.delta(skip) for t, w in active)
        x = skip
        for t, w in active:
            x = x + (scale * w) * t.delta(x)
        return x


class CSCTuner(nn.Module):
    """A controller: condition image -> one hint per skip, and the per-skip tuner MLPs (`lsc_tuner_blocks`).

    Keys as the official released controllers: `pre_hint_blocks.{0,2,..,12}`, `dense_hint_blocks.{i}.1`
    (encoder order), `lsc_tuner_blocks.{m}.{ln1,ln2}` (decoder order).
    """

    def __init__(
        self,
        cfg: UNetConfig,
        kernel: int = 1,
        hint_channels: int | None = None,
        hint_ratio: float | None = None,
        down_ratio: float = 1.0,
        in_channels: int = 3,
    ):
        """hint_channels, hint_ratio: the hint encoder's output width and width ratio r (default: the base's,
        `cfg.hint_channels` and `cfg.hint_ratio`: 256 and 1 for SD1/SD2, 320 and 2 for SDXL). r is scepter's
        float `PRE_HINT_DIM_RATIO`: widths int(16 r), int(16 r), int(32 r), int(32 r), int(96 r), int(96 r)."""
        super().__init__()
        hint_channels = cfg.hint_channels if hint_channels is None else hint_channels
        hint_ratio = cfg.hint_ratio if hint_ratio is None else hint_ratio
        if kernel not in (1, 3):
            raise ValueError(f"dense hint kernel must be 1 or 3, got {kernel}")
        self.kernel = kernel
        self.condition: str | None = None  # what the hints are made from (canny, color, ...), from the file
        self.default_weight = 1.0  # its w_i when none is asked (a released controller's SCALE)
        self.hint_ratio = hint_ratio
        widths = [in_channels, *hint_widths(hint_ratio), hint_channels]
        layers: list[nn.Module] = []
        for i, stride in enumerate(HINT_STRIDES):  # image size -> latent size
            layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=stride, padding=1), nn.SiLU()]
        self.pre_hint_blocks = nn.Sequential(*layers[:-1])  # no activation after the last conv

        # one dense conv per encoder block (encoder order), halving where that block downsamples
        self.dense_hint_blocks = nn.ModuleList()
        ch = hint_channels
        for kind, out_ch, _ in cfg.encoder_blocks:
            conv = nn.Conv2d(ch, out_ch, kernel, stride=2 if kind == "down" else 1, padding=kernel // 2)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
            self.dense_hint_blocks.append(nn.Sequential(nn.SiLU(), conv))
            ch = out_ch
        self.lsc_tuner_blocks = nn.ModuleList(SCTuner(c, down_ratio) for c in cfg.skip_channels)

    def hints(self, cond: torch.Tensor) -> list[torch.Tensor]:
        """Condition image [B, 3, 8h, 8w] in [0, 1] -> hints in decoder order, hint m shaped like skip m."""
        h = self.pre_hint_blocks(cond.contiguous(memory_format=torch.channels_last))  # the UNet's layout
        out = []
        for block in self.dense_hint_blocks:  # chained: each takes the previous one's output
            h = block(h)
            out.append(h)
        return out[::-1]

    def residual(self, m: int, skip: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """c = hint + MLP_m(skip + hint) for skip m (decoder order)."""
        return hint + self.lsc_tuner_blocks[m].delta(skip + hint)


HINT_WIDTH_BASES = (16, 16, 32, 32, 96, 96)  # the hint encoder's widths at ratio 1, before its output conv


def hint_widths(ratio: float) -> list[int]:
    """The hint encoder's inner widths at width ratio `ratio`, exactly as scepter computes them."""
    return [int(b * ratio) for b in HINT_WIDTH_BASES]


@dataclass
class Control:
    """Per-call control for the UNet: the hints of each attached controller (`UNetModel.controllers`, same
    order), their weights w_i, and the global control scale (paper eq. 7). An empty Control does nothing."""

    hints: list[list[torch.Tensor]] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    scale: float = 1.0

    def repeat(self, n: int) -> Control:
        """The same control for a batch repeated n times (e.g. both halves of a CFG batch). Hints of batch
        size 1 broadcast over any batch and are kept as they are."""
        hints = [[h if h.shape[0] == 1 else h.repeat(n, 1, 1, 1) for h in hs] for hs in self.hints]
        return Control(hints, list(self.weights), self.scale)


@dataclass(frozen=True)
class Tuning:
    """How the attached tuners act in a call: the SC-Tuner scale s (skip + s * (T(skip) - skip); a sequence:
    one scale per skip, decoder order, for research), the
    CSC-Tuner control (hints, weights, scale), and the part of sampling in which control acts: while the
    progress 1 - t/T lies in `control_range` (0: pure noise, 1: clean image). The UNet applies the first two;
    the sampler's denoiser, which knows the progress, applies the range (`at`). `Tuning()`: the attached
    tuners at scale 1, no control."""

    tuner_scale: float | tuple[float, ...] = 1.0
    control: Control | None = None
    control_range: tuple[float, float] = (0.0, 1.0)

    def skip_scale(self, m: int) -> float:
        """The SC-Tuner scale at skip m (decoder order)."""
        return self.tuner_scale if isinstance(self.tuner_scale, (int, float)) else self.tuner_scale[m]

    def at(self, progress: float) -> Tuning:
        """This tuning at sampling progress `progress`: without its control outside `control_range`."""
        lo, hi = self.control_range
        return self if self.control is None or lo <= progress <= hi else replace(self, control=None)

    def repeat(self, n: int) -> Tuning:
        """The same tuning for a batch repeated n times (e.g. both halves of a CFG batch)."""
        return self if self.control is None else replace(self, control=self.control.repeat(n))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
