"""Training methods: per method, what it attaches to the UNet, which parameters train, how a training step
uses it, what it exports and what its validation images need. The trainer (`training.py`) keeps the loop,
checkpoints and DDP; `tools/bench.py` builds its methods here too. A new method is one class and one entry
in `METHODS`.

- `sc`: SC-Tuners on the chosen skips (paper eq. 5-6), exported as a tuner file;
- `csc`: a CSC-Tuner controller (eq. 7) trained on condition images, exported as a tuner file;
- `lora`: the LoRA baseline (Hu et al. 2021) on the attention q/k/v/out and feed-forward linears;
- `full`: the whole UNet, exported as a whole checkpoint.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from PIL import Image
from torch import nn

from .conditions import CONDITIONS, condition_tensor, make_condition
from .tuner_files import csc_tuner_file, save_tuner_file, sc_tuner_file
from .tuners import Control, CSCTuner, Tuning

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion
    from .unet import UNetModel


@dataclass
class MethodSection:
    """The `method:` section of a training config."""

    name: str = "sc"  # a key of METHODS
    down_ratio: float = 1.0  # sc, csc: tuner hidden width = int(dim * down_ratio)
    skips: list[int] | None = None  # sc: the tuned skips (decoder order); None: all
    op: str = "linear"  # sc: linear | conv
    kernel: int = 1  # csc: dense hint kernel (official released controllers: 3)
    condition: str | None = None  # csc: canny | color | inpaint | raw, made from each image on the fly
    random_thresholds: bool = False  # csc canny: thresholds 50-100 / 200-350
    lora_rank: int = 64  # lora: rank on attention q/k/v/out and the feed-forward


class Method(ABC):
    """A way to train a frozen base: subclasses say what trains and what comes out."""

    name: ClassVar[str]
    export_name: ClassVar[str]

    def __init__(self, cfg: MethodSection):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: MethodSection, condition_dir: str | None) -> list[str]:
        """What is wrong with this method's settings (an empty list: nothing)."""
        return []

    @property
    def data_condition(self) -> str | None:
        """The condition image the data must provide with every training image (None: none)."""
        return None

    @abstractmethod
    def attach(self, unet: UNetModel) -> list[nn.Parameter]:
        """Attach what trains to `unet` and return the trainable parameters (set to require gradients)."""

    def tuning(self, cond: torch.Tensor | None) -> Tuning | None:
        """The UNet's tuning in a training step, from the batch's condition images [B, 3, H, W] in [0, 1]."""
        return None

    def validation_tuning(self, image: Image.Image | None, size: tuple[int, int]) -> Tuning | None:
        """The tuning for a validation image made with control image `image` at condition size (h, w)."""
        return None

    @abstractmethod
    def export(self, model: LatentDiffusion, out_dir: Path, summary: dict) -> Path:
        """Write the trained result to `out_dir / self.export_name`; returns the path."""


def _train(params: list[nn.Parameter]) -> list[nn.Parameter]:
    for p in params:
        p.requires_grad_(True)
    return params


class SCMethod(Method):
    name, export_name = "sc", "sc_tuner.safetensors"

    @classmethod
    def check(cls, cfg: MethodSection, condition_dir: str | None) -> list[str]:
        return [] if cfg.op in ("linear", "conv") else [f"method.op must be linear or conv, got {cfg.op!r}"]

    def attach(self, unet: UNetModel) -> list[nn.Parameter]:
        tuners = unet.attach_sc_tuners(self.cfg.down_ratio, self.cfg.skips, self.cfg.op, dtype=torch.float32)
        return _train([p for t in tuners for p in t.parameters()])

    def export(self, model: LatentDiffusion, out_dir: Path, summary: dict) -> Path:
        path = out_dir / self.export_name
        save_tuner_file(sc_tuner_file(model, summary), path, overwrite=True)
        return path


class CSCMethod(Method):
    name = "csc"

    def __init__(self, cfg: MethodSection):
        super().__init__(cfg)
        self.controller: CSCTuner | None = None

    @classmethod
    def check(cls, cfg: MethodSection, condition_dir: str | None) -> list[str]:
        errors = []
        if cfg.condition is None and condition_dir is None:
            errors.append("method csc needs method.condition (canny, color, inpaint) or data.condition_dir")
        if cfg.condition is not None and cfg.condition not in CONDITIONS:
            errors.append(f"method.condition must be one of {', '.join(CONDITIONS)}, got {cfg.condition!r}")
        if cfg.kernel not in (1, 3):
            errors.append(f"method.kernel must be 1 or 3, got {cfg.kernel}")
        return errors

    @property
    def data_condition(self) -> str:
        return self.cfg.condition or "raw"  # with data.condition_dir: the precomputed maps, as they are

    @property
    def export_name(self) -> str:
        return f"csc_{self.data_condition}.safetensors"

    def attach(self, unet: UNetModel) -> list[nn.Parameter]:
        p = next(unet.parameters())
        ctrl = CSCTuner(unet.cfg, self.cfg.kernel, down_ratio=self.cfg.down_ratio).to(p.device)
        self.controller = unet.attach_controller(ctrl)
        return _train(list(ctrl.parameters()))

    def tuning(self, cond: torch.Tensor | None) -> Tuning:
        return Tuning(control=Control([self.controller.hints(cond)], [1.0]))

    def validation_tuning(self, image: Image.Image | None, size: tuple[int, int]) -> Tuning | None:
        if image is None:
            return None
        p = next(self.controller.parameters())
        cond = make_condition(self.data_condition, image, size[1], size[0])
        return self.tuning(condition_tensor(cond).to(p.device))

    def export(self, model: LatentDiffusion, out_dir: Path, summary: dict) -> Path:
        path = out_dir / self.export_name
        save_tuner_file(csc_tuner_file(model, self.controller, self.data_condition, summary), path, overwrite=True)
        return path


class LoRAMethod(Method):
    name, export_name = "lora", "lora.safetensors"

    def attach(self, unet: UNetModel) -> list[nn.Parameter]:
        return _train(add_lora(unet, self.cfg.lora_rank))

    def export(self, model: LatentDiffusion, out_dir: Path, summary: dict) -> Path:
        from safetensors.torch import save_file

        path = out_dir / self.export_name
        unet = model.model.diffusion_model
        tensors = {n: p.detach().contiguous().cpu() for n, p in unet.named_parameters() if ".lora_" in n}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"ldm_sce.lora": json.dumps(summary)})
        tmp.replace(path)
        return path


class FullMethod(Method):
    name, export_name = "full", "model.safetensors"

    def attach(self, unet: UNetModel) -> list[nn.Parameter]:
        return _train([p for n, p in unet.named_parameters() if not n.startswith(("tuners.", "controllers."))])

    def export(self, model: LatentDiffusion, out_dir: Path, summary: dict) -> Path:
        from .checkpoint_io import save_checkpoint

        path = out_dir / self.export_name
        save_checkpoint(model, path)
        return path


METHODS: dict[str, type[Method]] = {m.name: m for m in (SCMethod, CSCMethod, LoRAMethod, FullMethod)}


def build_method(cfg: MethodSection) -> Method:
    return METHODS[cfg.name](cfg)


# ---------------------------------------------------------------------------------------------------------
# LoRA (the baseline), on PyTorch's own parametrizations
# ---------------------------------------------------------------------------------------------------------


class LoRAWeight(nn.Module):
    """A weight parametrization W + (alpha / r) B A (Hu et al. 2021), B zero-initialised. The LoRA baseline
    uses PyTorch's own `parametrize`, so the model's modules and forward stay as they are."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
        self.scale = (alpha or rank) / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def add_lora(unet: nn.Module, rank: int) -> list[nn.Parameter]:
    """LoRA on every attention q/k/v/out projection and feed-forward linear of the UNet's transformers."""
    from torch.nn.utils import parametrize

    from .attention import BasicTransformerBlock

    params = []
    for block in (m for m in unet.modules() if isinstance(m, BasicTransformerBlock)):
        targets = [getattr(a, n) for a in (block.attn1, block.attn2) for n in ("to_q", "to_k", "to_v")]
        targets += [block.attn1.to_out[0], block.attn2.to_out[0], block.ff.net[0].proj, block.ff.net[2]]
        for linear in targets:
            w = linear.weight
            lora = LoRAWeight(w.shape[0], w.shape[1], rank).to(w.device)  # fp32, whatever the base's dtype
            parametrize.register_parametrization(linear, "weight", lora)
            params += [lora.lora_A, lora.lora_B]
    return params
