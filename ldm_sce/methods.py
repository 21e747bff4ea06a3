"""Training methods: per method, what it attaches to the UNet, which parameters train, how a training step
uses it, what it exports and what its validation images need. The trainer (`training.py`) keeps the loop,
checkpoints and DDP; `tools/bench.py` builds its methods here too. A new method is one class and one entry
in `METHODS`.

- `sc`: SC-Tuners on the chosen skips (paper eq. 5-6), exported as a tuner file; with `text_lora_rank`, also
  a LoRA on the first text encoder's q/k/v/out_proj and mlp.fc1/fc2 (scepter Studio's TEXT_SCE: rank 256),
  in the same file;
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
    text_lora_rank: int = 0  # sc: a LoRA of this rank on the first text encoder too (TEXT_SCE: 256); 0: none
    text_lora_alpha: float | None = None  # sc: its alpha (scale alpha / rank); None: the rank


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

    def attach_text(self, model: LatentDiffusion) -> list[nn.Parameter]:
        """Attach what trains in the text encoder (none by default) and return its parameters; the trainer
        then encodes captions with gradients."""
        return []

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

    def __init__(self, cfg: MethodSection):
        super().__init__(cfg)
        self.text_loras: dict[str, LoRAWeight] = {}  # kohya name -> the LoRA of that text-encoder layer

    @classmethod
    def check(cls, cfg: MethodSection, condition_dir: str | None) -> list[str]:
        errors = [] if cfg.op in ("linear", "conv") else [f"method.op must be linear or conv, got {cfg.op!r}"]
        if type(cfg.text_lora_rank) is not int or not 0 <= cfg.text_lora_rank <= 4096:
            errors.append(f"method.text_lora_rank must be an integer in 0..4096, got {cfg.text_lora_rank!r}")
        alpha = cfg.text_lora_alpha
        if alpha is not None and not (type(alpha) in (int, float) and 0 < alpha <= 1e6):
            errors.append(f"method.text_lora_alpha must be a positive number or null, got {alpha!r}")
        return errors

    def attach(self, unet: UNetModel) -> list[nn.Parameter]:
        tuners = unet.attach_sc_tuners(self.cfg.down_ratio, self.cfg.skips, self.cfg.op, dtype=torch.float32)
        return _train([p for t in tuners for p in t.parameters()])

    def attach_text(self, model: LatentDiffusion) -> list[nn.Parameter]:
        """TEXT_SCE: a LoRA on the first text encoder's projections (CLIP ViT-L: SD1's, SDXL's first tower)."""
        from torch.nn.utils import parametrize

        rank = self.cfg.text_lora_rank
        if not rank:
            return []
        text = model.conditioner.embedders[0] if model.cfg.family == "sdxl" else model.cond_stage_model
        if not hasattr(text, "transformer"):
            raise ValueError("method.text_lora_rank: the text LoRA is for CLIP ViT-L towers (SD1, SDXL), not SD2's")
        params = []
        for n, layer in enumerate(text.transformer.text_model.encoder.layers):
            for sub in (
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ):
                linear = layer.get_submodule(sub)
                w = linear.weight
                lora = LoRAWeight(w.shape[0], w.shape[1], rank, self.cfg.text_lora_alpha).to(w.device)
                parametrize.register_parametrization(linear, "weight", lora)
                self.text_loras[f"lora_te_text_model_encoder_layers_{n}_{sub.replace('.', '_')}"] = lora
                params += [lora.lora_A, lora.lora_B]
        return _train(params)

    def export(self, model: LatentDiffusion, out_dir: Path, summary: dict) -> Path:
        path = out_dir / self.export_name
        tf = sc_tuner_file(model, summary)
        if self.text_loras:  # in kohya's layout, as a converted TEXT_SCE file
            alpha = float(self.cfg.text_lora_alpha or self.cfg.text_lora_rank)
            for name, lora in self.text_loras.items():
                tf.state_dict[f"{name}.lora_down.weight"] = lora.lora_A.detach()
                tf.state_dict[f"{name}.lora_up.weight"] = lora.lora_B.detach()
                tf.state_dict[f"{name}.alpha"] = torch.tensor(alpha)
            tf.text_lora = {"rank": self.cfg.text_lora_rank, "alpha": alpha}
        save_tuner_file(tf, path, overwrite=True)
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
