"""LoRA files made elsewhere, on this project's models: read, checked against the model, applied on the fly
or merged. SD1, SD2 and SDXL; the UNet and the text encoders.

Formats, recognised from their keys (every file goes through the safe reader):
- kohya / AUTOMATIC1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoders
  `lora_te_` (SD1, SD2), `lora_te1_` / `lora_te2_` (SDXL). <module> is the module's dotted name with `_` for
  `.`, in diffusers' names (`down_blocks_0_attentions_0_...`) or, as sd-scripts writes SDXL files, the
  original ones (`input_blocks_4_1_...`). Conv LoRA (LoCon): a `lora_down` conv of the layer's kernel and a
  1x1 `lora_up`.
- diffusers / peft: `unet.<module>.lora_A.weight`, `.lora_B.weight` (optional `.alpha`), `text_encoder.`,
  `text_encoder_2.`.
- swift (scepter Studio's `1_SwiftLoRA`): `<...>text_model.encoder.layers.<n>.<proj>.lora_A.<adapter>.weight`
  on the first text encoder, scale lora_alpha / r from its `adapter_config.json`.
- this project's trainer (`method: lora`): `<module>.parametrizations.weight.0.lora_A` (the UNet's names).

Text encoders are named as in transformers' CLIP (`text_model.encoder.layers.<n>.self_attn.q_proj`, ...,
`mlp.fc1`); on the OpenCLIP towers (SD2, SDXL's second) q/k/v are the three row blocks of the packed
`in_proj_weight`, `mlp.fc1` / `fc2` are `c_fc` / `c_proj`.

The update of a layer is W += weight * (alpha / rank) * up @ down (for convs: summed over the rank with the
down conv's kernel), alpha = rank when the file has none. On the fly it is a weight parametrization
(`torch.nn.utils.parametrize`; several LoRAs stack), merged it is added to the weights once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint_io import KIND_NAMES, CheckpointError, check_finite, file_kind, read_checkpoint

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion


@dataclass
class Target:
    """Where a LoRA goes: `module.<tensor>`, or its row block `rows` (a packed q/k/v projection)."""

    module: nn.Module
    tensor: str
    name: str  # our dotted name, for messages
    rows: slice | None = None

    @property
    def shape(self) -> torch.Size:
        w = getattr(self.module, self.tensor)
        return w[self.rows].shape if self.rows is not None else w.shape


@dataclass
class LoRALayer:
    target: Target
    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    def delta(self) -> torch.Tensor:
        """(alpha / r) up @ down, shaped like the target (fp32)."""
        return lora_delta(self.down, self.up, self.alpha / self.down.shape[0], self.target.shape)


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: torch.Size) -> torch.Tensor:
    """scale * up @ down in fp32, shaped `shape`; a conv LoRA's down kernel is kept (summed over the rank)."""
    down, up = down.float(), up.float().flatten(1)
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        d = torch.einsum("or,rihw->oihw", up, down)
    else:
        d = up @ down.flatten(1)
    return scale * d.reshape(shape)


# ---------------------------------------------------------------------------------------------------------
# Names: every name a file may use for a layer of our model -> the layer
# ---------------------------------------------------------------------------------------------------------

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj"}
_RESBLOCK |= {"out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
_TOP |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_TOP |= {"out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}


def diffusers_unet_name(unet: nn.Module, name: str) -> str | None:
    """diffusers' name of the UNet module `name` (ours, the original layout); None where it has none."""
    from .attention import SpatialTransformer
    from .unet import ResBlock

    for ours, theirs in _TOP.items():
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    parts = name.split(".")
    if parts[0] == "middle_block" and len(parts) > 2:
        sub, rest = int(parts[1]), parts[2:]
        layer = unet.middle_block[sub]
        head = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[sub]
    elif len(parts) < 4 or parts[0] not in ("input_blocks", "output_blocks"):
        return None
    else:
        k, sub, rest = int(parts[1]), int(parts[2]), parts[3:]
        layer = getattr(unet, parts[0])[k][sub]
    per_level = unet.cfg.num_res_blocks + 1
    if parts[0] == "middle_block":
        pass
    elif parts[0] == "input_blocks":
        level, j = divmod(k - 1, per_level)
        if j == per_level - 1:  # the downsampling conv: `op` there, `conv` in diffusers
            head, rest = f"down_blocks.{level}.downsamplers.0", ["conv", *rest[1:]]
        else:
            head = f"down_blocks.{level}.{'resnets' if sub == 0 else 'attentions'}.{j}"
    else:
        level, j = divmod(k, per_level)
        if isinstance(layer, ResBlock):
            head = f"up_blocks.{level}.resnets.{j}"
        elif isinstance(layer, SpatialTransformer):
            head = f"up_blocks.{level}.attentions.{j}"
        else:
            head = f"up_blocks.{level}.upsamplers.0"
    tail = ".".join(rest)
    if isinstance(layer, ResBlock):
        tail = next((theirs + tail[len(ours) :] for ours, theirs in _RESBLOCK.items() if tail.startswith(ours)), tail)
    return f"{head}.{tail}" if tail else head


_CLIP_SUBS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _text_targets(encoder: nn.Module, prefix: str, where: str) -> dict[str, Target]:
    """kohya names (`<prefix>text_model_encoder_layers_<n>_<sub>`) of a text tower's projections."""
    out = {}
    if hasattr(encoder, "transformer"):  # CLIP ViT-L, transformers' layout already
        for n, layer in enumerate(encoder.transformer.text_model.encoder.layers):
            for sub in _CLIP_SUBS:
                module = layer.get_submodule(sub)
                out[f"{prefix}text_model_encoder_layers_{n}_{sub.replace('.', '_')}"] = Target(
                    module, "weight", f"{where}.transformer.text_model.encoder.layers.{n}.{sub}"
                )
        return out
    for n, block in enumerate(encoder.model.transformer.resblocks):  # OpenCLIP: packed q/k/v
        name = f"{where}.model.transformer.resblocks.{n}"
        width = block.attn.out_proj.in_features
        kohya = f"{prefix}text_model_encoder_layers_{n}_"
        for i, proj in enumerate(("q", "k", "v")):
            rows = slice(i * width, (i + 1) * width)
            out[f"{kohya}self_attn_{proj}_proj"] = Target(block.attn, "in_proj_weight", f"{name}.attn.{proj}", rows)
        out[f"{kohya}self_attn_out_proj"] = Target(block.attn.out_proj, "weight", f"{name}.attn.out_proj")
        out[f"{kohya}mlp_fc1"] = Target(block.mlp.c_fc, "weight", f"{name}.mlp.c_fc")
        out[f"{kohya}mlp_fc2"] = Target(block.mlp.c_proj, "weight", f"{name}.mlp.c_proj")
    return out


def unet_lora_targets(unet: nn.Module) -> dict[str, Target]:
    """Every Linear and Conv2d of the UNet (not the tuners), by kohya name: diffusers' and the original one."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name.startswith(("tuners.", "controllers.")):
            continue
        target = Target(module, "weight", f"model.diffusion_model.{name}")
        out["lora_unet_" + name.replace(".", "_")] = target
        theirs = diffusers_unet_name(unet, name)
        if theirs is not None:
            out["lora_unet_" + theirs.replace(".", "_")] = target
    return out


def lora_targets(model: LatentDiffusion) -> dict[str, Target]:
    """Every layer a LoRA may change, by its kohya name (diffusers' and the original names for the UNet)."""
    out = unet_lora_targets(model.model.diffusion_model)
    if model.cfg.family == "sdxl":
        for i, encoder in enumerate(model.conditioner.embedders):
            out |= _text_targets(encoder, f"lora_te{i + 1}_", f"conditioner.embedders.{i}")
    else:
        out |= _text_targets(model.cond_stage_model, "lora_te_", "cond_stage_model")
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------

_KOHYA = re.compile(r"^(lora_(?:unet|te\d?)_\w+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(unet|text_encoder(?:_2)?)\.(.+?)\.(lora_A\.weight|lora_B\.weight|alpha)$")
SWIFT_KEY = re.compile(
    r"^(?:.*\.)?text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
    r"\.lora_([AB])\.[\w-]+\.weight$"
)
_OURS = re.compile(r"^(.+)\.parametrizations\.weight\.0\.(lora_A|lora_B)$")
_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down", "lora_B.weight": "up"}
_PART |= {"lora_A": "down", "lora_B": "up", "A": "down", "B": "up", "alpha": "alpha"}


def _kohya_name(key: str, sdxl: bool) -> tuple[str, str] | None:
    """(kohya module name, 'down' | 'up' | 'alpha') of a file key in any supported format; None: not LoRA."""
    if m := _KOHYA.match(key):
        return m[1], _PART[m[2]]
    if m := _PEFT.match(key):
        tower = {
            "unet": "lora_unet_",
            "text_encoder": "lora_te1_" if sdxl else "lora_te_",
            "text_encoder_2": "lora_te2_",
        }
        return tower[m[1]] + m[2].replace(".", "_"), _PART[m[3]]
    if m := SWIFT_KEY.match(key):
        return f"lora_te{'1' if sdxl else ''}_text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}", _PART[m[3]]
    if m := _OURS.match(key):
        return "lora_unet_" + m[1].replace(".", "_"), _PART[m[2]]
    return None


_SS_BASES = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl"}


def guess_family(sd: dict[str, torch.Tensor], metadata: dict | None = None) -> str | None:
    """The base a LoRA file was made for: from its metadata (kohya's `ss_base_model_version` / `ss_v2`, the
    SAI model spec's `modelspec.architecture`), else its keys and the cross-attention context width."""
    metadata = metadata or {}
    if metadata.get("ss_base_model_version") in _SS_BASES:
        return _SS_BASES[metadata["ss_base_model_version"]]
    arch = str(metadata.get("modelspec.architecture", ""))
    for prefix, family in (
        ("stable-diffusion-xl", "sdxl"),
        ("stable-diffusion-v2", "sd2"),
        ("stable-diffusion-v1", "sd1"),
    ):
        if arch.startswith(prefix):
            return family
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) or "add_embedding" in k for k in sd):
        return "sdxl"
    for k, v in sd.items():
        if "attn2" in k and "to_k" in k and ("lora_down" in k or "lora_A" in k) and v.ndim >= 2:
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(v.shape[1])
    return None


def read_lora(
    model: LatentDiffusion, path: str | Path, alpha: float | None = None, sd: dict | None = None
) -> list[LoRALayer]:
    """The layers of the LoRA file `path` on `model`, each checked (base, names, shapes, finite values).
    alpha: for files that store none per layer (peft, swift), lora_alpha from their config (default: the
    rank). sd: the file's tensors when already read."""
    path = Path(path)
    metadata: dict = {}
    if sd is None:
        sd, metadata = read_checkpoint(path)
    check_finite(sd, path)
    sdxl = model.cfg.family == "sdxl"
    if any(".hada_" in k or ".lokr_" in k for k in sd):
        raise CheckpointError(f"{path}: a LyCORIS LoHa / LoKr file; only LoRA (and conv LoRA) is supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        named = _kohya_name(key, sdxl)
        if named is None:
            unknown.append(key)
        else:
            parts.setdefault(named[0], {})[named[1]] = value
    if unknown:
        kind = file_kind(sd, metadata)
        if kind in ("checkpoint", "sc", "csc"):
            raise CheckpointError(f"{path}: this is {KIND_NAMES[kind]}, not a LoRA file")
        raise CheckpointError(
            f"{path}: not a LoRA file of a supported layout (kohya lora_unet_/lora_te_, diffusers/peft unet./"
            f"text_encoder., swift): keys {unknown[:3]}"
        )
    targets = lora_targets(model)
    family = guess_family(sd, metadata)
    wrong_base = CheckpointError(
        f"{path}: a LoRA for {family}, but the model is {model.cfg.family}; use a LoRA made for this base"
    )
    if family is not None and family != model.cfg.family:
        raise wrong_base
    layers = []
    for name, p in sorted(parts.items()):
        if "down" not in p or "up" not in p:
            raise CheckpointError(f"{path}: layer {name} lacks its {'up' if 'down' in p else 'down'} matrix")
        target = targets.get(name)
        if target is None:
            raise CheckpointError(f"{path}: layer {name} is not a layer of this {model.cfg.family} model")
        down, up = p["down"], p["up"]
        want = target.shape
        if not _fits(down, up, want):
            raise CheckpointError(
                f"{path}: layer {name}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} does not fit "
                f"{target.name} {tuple(want)}; use a LoRA made for this base model"
            )
        if "alpha" in p:
            if p["alpha"].numel() != 1 or not torch.isfinite(p["alpha"].float()).all():
                raise CheckpointError(f"{path}: layer {name}: alpha is {p['alpha'].tolist()!r:.40}, not one number")
            a = float(p["alpha"].float())
        else:
            a = float(alpha if alpha is not None else down.shape[0])
        layer = LoRALayer(target, down, up, a)
        layers.append(layer)
    if not layers:
        raise CheckpointError(f"{path}: no LoRA layers in the file")
    return layers


def _fits(down: torch.Tensor, up: torch.Tensor, want: torch.Size) -> bool:
    """down [r, in(, kh, kw)] and up [out, r(, 1, 1)] make a delta of the target's shape [out, in(, kh, kw)];
    1x1 convs and linears take either form."""
    if not (down.is_floating_point() and up.is_floating_point() and down.ndim in (2, 4) and up.ndim in (2, 4)):
        return False
    rank = down.shape[0]
    if rank < 1 or tuple(up.shape[1:]) not in ((rank,), (rank, 1, 1)) or len(want) not in (2, 4):
        return False
    kernel = tuple(want[2:]) if len(want) == 4 else (1, 1)
    downs = {(want[1], *kernel)} | ({(want[1],), (want[1], 1, 1)} if kernel == (1, 1) else set())
    return up.shape[0] == want[0] and tuple(down.shape[1:]) in downs


# ---------------------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------------------


class LoRADelta(nn.Module):
    """A weight parametrization W + weight * (alpha / r) up @ down (on the row block `rows` of a packed
    projection). It keeps the two factors, not their product: a LoRA costs its own size in memory."""

    def __init__(self, layer: LoRALayer, weight: float, source: str = "lora"):
        super().__init__()
        w = getattr(layer.target.module, layer.target.tensor)
        self.register_buffer("down", layer.down.to(w.device), persistent=False)
        self.register_buffer("up", layer.up.to(w.device), persistent=False)
        self.scale = weight * layer.alpha / layer.down.shape[0]
        self.shape = layer.target.shape
        self.rows = layer.target.rows
        self.source = source  # 'lora': a --lora file; 'tuner': a TEXT_SCE tuner's text LoRA

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        d = lora_delta(self.down, self.up, self.scale, self.shape).to(w.dtype)
        if self.rows is None:
            return w + d
        out = w.clone()
        out[self.rows] += d
        return out


def apply_lora(
    layers: list[LoRALayer], weight: float = 1.0, merge: bool = False, source: str = "lora"
) -> list[LoRADelta]:
    """Apply `layers` at `weight`: merged into the weights, or as parametrizations (returned; `remove_lora`
    takes them off again)."""
    from torch.nn.utils import parametrize

    added = []
    for layer in layers:
        t = layer.target
        if merge:
            w = getattr(t.module, t.tensor)
            with torch.no_grad():
                (w[t.rows] if t.rows is not None else w).add_((weight * layer.delta()).to(w.device, w.dtype))
            continue
        p = LoRADelta(layer, weight, source)
        parametrize.register_parametrization(t.module, t.tensor, p)
        added.append(p)
    return added


def remove_lora(model: nn.Module, source: str | None = None) -> None:
    """Take the on-the-fly LoRAs (of `source`; None: all) off `model`, keeping the original weights and any
    other parametrization (the trainer's own LoRA)."""
    from torch.nn.utils import parametrize

    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor, chain in list(module.parametrizations.items()):
            if not any(isinstance(p, LoRADelta) for p in chain):
                continue
            keep = [p for p in chain if not (isinstance(p, LoRADelta) and source in (None, p.source))]
            parametrize.remove_parametrizations(module, tensor, leave_parametrized=False)
            for p in keep:
                parametrize.register_parametrization(module, tensor, p)


def load_lora(
    model: LatentDiffusion, path: str | Path, weight: float = 1.0, merge: bool = False, alpha: float | None = None
) -> int:
    """Read the LoRA file `path` (any supported layout, or a folder holding a peft / swift adapter) and apply
    it to `model` at `weight`; returns the number of layers changed. Nothing changes if the file is refused."""
    path = Path(path)
    if path.is_dir():
        path, alpha = adapter_file(path, alpha)
    layers = read_lora(model, path, alpha)
    apply_lora(layers, weight, merge)
    return len(layers)


def adapter_file(folder: Path, alpha: float | None) -> tuple[Path, float | None]:
    """The weights of a peft / swift adapter folder, and lora_alpha / r from its adapter_config.json."""
    for name in ("adapter_model.safetensors", "adapter_model.bin", "pytorch_lora_weights.safetensors"):
        if (folder / name).is_file():
            break
    else:
        raise CheckpointError(f"{folder}: no adapter_model.safetensors / .bin in this folder")
    config = folder / "adapter_config.json"
    if alpha is None and config.is_file():
        try:
            alpha = float(json.loads(config.read_text()).get("lora_alpha"))
        except (ValueError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{config}: no readable lora_alpha ({e})") from None
    return folder / name, alpha


def parse_lora_arg(value: str) -> tuple[str, float]:
    """`PATH[:WEIGHT]` -> (path, weight); a ':' followed by something that is not a number is part of the path."""
    path, sep, tail = value.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, 1.0
