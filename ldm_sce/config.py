"""Typed model configs, named presets, and YAML reading (ours and the original CompVis/Stability files).

A config is plain data. YAML is validated against the dataclass fields: an unknown key is an error that
names it, so a typo fails at load time rather than deep into a run. Original inference YAMLs
(`v1-inference.yaml`, `v2-inference-v.yaml`, ...) are read as data; their `target:` strings are only
compared against the classes we implement, never imported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types as types_mod
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file or preset name that cannot describe a model."""


# The CSC-Tuner hint encoder (official layout): seven 3x3 convs, three of stride 2, so it takes a condition
# image of 8x the latent size to the latent size (`ModelConfig.condition_size`).
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)
# SDXL's micro-conditioning (sgm `ConcatTimestepEmbedderND`): six numbers, each a 256-d sinusoidal embedding
SIZE_CONDITIONS = ("original_height", "original_width", "crop_top", "crop_left", "target_height", "target_width")
SIZE_EMBED_DIM = 256


@dataclass(frozen=True)
class UNetConfig:
    """CompVis / sgm `UNetModel` hyper-parameters (names as in the original YAML `unet_config.params`).

    Exactly one of `num_heads` (SD1: fixed head count) and `num_head_channels` (SD2, SDXL: fixed head dim) is
    set. `transformer_depth`: blocks per SpatialTransformer, one number or one per level (SDXL: 0, 2, 10);
    the middle block's is the last level's. `adm_in_channels`: width of the vector conditioning (SDXL's
    pooled text + size embeddings, 2816) that `label_emb` adds to the time embedding; None: no `label_emb`.
    `hint_channels`, `hint_ratio`: the CSC-Tuner hint encoder for this base (official: 256 and 1 for SD1 and
    SD2, 320 and 2 for SDXL).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsampling factors that get a SpatialTransformer
    num_heads: int | None = 8
    num_head_channels: int | None = None
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD2: proj_in/proj_out are Linear instead of 1x1 conv
    adm_in_channels: int | None = None
    hint_channels: int = 256
    hint_ratio: int = 1

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ConfigError("unet: set exactly one of num_heads (SD1) and num_head_channels (SD2)")
        _positive(
            "unet", self, "in_channels out_channels model_channels num_res_blocks context_dim hint_channels hint_ratio"
        )
        depths = self.depths
        if len(depths) != len(self.channel_mult) or not all(type(d) is int and 0 <= d <= 64 for d in depths):
            raise ConfigError(f"unet.transformer_depth must be 0 to 64, one per level, got {self.transformer_depth}")
        if self.adm_in_channels is not None and (type(self.adm_in_channels) is not int or self.adm_in_channels < 1):
            raise ConfigError(f"unet.adm_in_channels must be a positive integer or null, got {self.adm_in_channels}")
        if not self.channel_mult or not all(type(m) is int and 1 <= m <= 64 for m in self.channel_mult):
            raise ConfigError(f"unet.channel_mult must be 1 to 64 per level, got {self.channel_mult}")
        widths = sorted({self.model_channels * m for m in self.channel_mult})
        if any(w % 32 for w in widths) or widths[-1] > 65536:
            raise ConfigError(f"unet: level widths {widths} must be multiples of 32 (GroupNorm's groups), <= 65536")
        head = self.num_heads if self.num_heads is not None else self.num_head_channels
        if type(head) is not int or head < 1 or any(w % head for w in widths):
            raise ConfigError(f"unet: num_heads / num_head_channels {head} must divide every level width {widths}")

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer blocks per level (0: no attention there); the middle block has the last level's."""
        if isinstance(self.transformer_depth, int):
            return (self.transformer_depth,) * len(self.channel_mult)
        return tuple(self.transformer_depth)

    def attention_depth(self, ds: int) -> int:
        """Transformer blocks of the blocks at downsampling factor ds (0: none)."""
        level = ds.bit_length() - 1
        return self.depths[level] if ds in self.attention_resolutions and level < len(self.depths) else 0

    @property
    def has_vector(self) -> bool:
        return self.adm_in_channels is not None

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head dim) of a SpatialTransformer with `channels` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels

    # -- geometry: the one place that says where the skips are and what size they have --------------------

    @property
    def encoder_blocks(self) -> tuple[tuple[str, int, int], ...]:
        """(kind, output channels, downsampling factor) of each input block, encoder order: `conv_in`, then
        per level `num_res_blocks` x `res` and, but at the last level, a `down` (a stride-2 conv). Every
        input block's output is a skip connection."""
        blocks = [("conv_in", self.model_channels, 1)]
        for level, mult in enumerate(self.channel_mult):
            blocks += [("res", self.model_channels * mult, 2**level)] * self.num_res_blocks
            if level != len(self.channel_mult) - 1:
                blocks.append(("down", self.model_channels * mult, 2 ** (level + 1)))
        return tuple(blocks)

    @property
    def skip_channels(self) -> tuple[int, ...]:
        """Channels of the skip connections in decoder (pop) order: one per output block."""
        return tuple(ch for _, ch, _ in reversed(self.encoder_blocks))

    @property
    def skip_factors(self) -> tuple[int, ...]:
        """Downsampling factor (relative to the latent) of each skip, decoder order; output block m runs at
        the resolution of skip m."""
        return tuple(ds for _, _, ds in reversed(self.encoder_blocks))

    @property
    def size_multiple(self) -> int:
        """Latent sides must be multiples of this (the encoder halves them `len(channel_mult) - 1` times)."""
        return 2 ** (len(self.channel_mult) - 1)

    def skip_shapes(self, height: int, width: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each skip, decoder order, for a latent of height x width."""
        return [
            (ch, -(-height // ds), -(-width // ds))
            for ch, ds in zip(self.skip_channels, self.skip_factors, strict=True)
        ]


@dataclass(frozen=True)
class VAEConfig:
    """CompVis `AutoencoderKL` `ddconfig` plus `embed_dim` (the SD VAE has no attention outside the middle)."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4

    def __post_init__(self) -> None:
        _positive("vae", self, "in_channels out_ch ch num_res_blocks z_channels embed_dim")
        if not self.ch_mult or not all(type(m) is int and 1 <= m <= 64 for m in self.ch_mult):
            raise ConfigError(f"vae.ch_mult must be 1 to 64 per level, got {self.ch_mult}")
        if any(self.ch * m % 32 for m in self.ch_mult) or self.ch * max(self.ch_mult) > 65536:
            raise ConfigError(
                f"vae: level widths ch {self.ch} x ch_mult {self.ch_mult} must be multiples of 32 (GroupNorm), <= 65536"
            )

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: the encoder halves the image at every level but the last."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """A text tower. `clip`: HF CLIPTextModel layout (quick_gelu, pads with the end token); `open_clip`:
    open_clip layout (exact GELU, pads with 0). The context is the last block's output (`layer` 'last') or
    the last block's input ('penultimate'), then the final LayerNorm if `final_norm`: SD1 last + norm; SD2
    penultimate + norm; SDXL's two towers penultimate without norm. `pooled`: also the pooled embedding
    (SDXL's OpenCLIP bigG: ln_final of the last block at the end token, times text_projection)."""

    arch: Literal["clip", "open_clip"] = "clip"
    width: int = 768
    layers: int = 12
    heads: int = 12
    vocab_size: int = 49408
    context_length: int = 77
    embed_dim: int = 768  # open_clip only: text_projection is [width, embed_dim]
    layer: Literal["last", "penultimate"] = "last"
    final_norm: bool = True
    pooled: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ("clip", "open_clip"):
            raise ConfigError(f"text.arch must be 'clip' or 'open_clip', got {self.arch!r}")
        if self.layer not in ("last", "penultimate") or (self.pooled and self.arch != "open_clip"):
            raise ConfigError(f"text.layer must be last or penultimate (got {self.layer!r}); pooled needs open_clip")
        _positive("text", self, "width layers heads vocab_size context_length embed_dim")
        if self.width % self.heads or self.width > 65536 or self.vocab_size > 10**6 or self.context_length < 3:
            raise ConfigError(
                f"text: heads {self.heads} must divide width {self.width} (<= 65536); vocab_size <= 1e6; "
                f"context_length >= 3 (got {self.vocab_size}, {self.context_length})"
            )


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: the three networks plus the noise schedule. SDXL (`family` 'sdxl') has
    two text towers, `text` (CLIP ViT-L) and `text2` (OpenCLIP ViT-bigG, pooled), whose contexts are
    concatenated; its vector conditioning is text2's pooled output and six size embeddings."""

    family: Literal["sd1", "sd2", "sdxl"] = "sd1"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text2: TextConfig | None = None
    parameterization: Literal["eps", "v"] = "eps"
    scale_factor: float = 0.18215
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    image_size: int = 64  # latent side at the native resolution (CompVis `model.params.image_size`): 512px

    def __post_init__(self) -> None:
        if self.parameterization not in ("eps", "v"):
            raise ConfigError(f"parameterization must be 'eps' or 'v', got {self.parameterization!r}")
        if self.family not in ("sd1", "sd2", "sdxl"):
            raise ConfigError(f"family must be 'sd1', 'sd2' or 'sdxl', got {self.family!r}")
        if (self.family == "sdxl") != (self.text2 is not None) or (self.family == "sdxl") != self.unet.has_vector:
            raise ConfigError("an sdxl config has text2 and unet.adm_in_channels; sd1/sd2 configs have neither")
        if self.text2 is not None and not self.text2.pooled:
            raise ConfigError("text2 (SDXL's second tower) must have pooled: true")
        if self.text2 is not None and self.unet.adm_in_channels != self.vector_dim:
            raise ConfigError(
                f"unet.adm_in_channels {self.unet.adm_in_channels} != text2.embed_dim {self.text2.embed_dim} + "
                f"{len(SIZE_CONDITIONS)} x {SIZE_EMBED_DIM} (the pooled text and the size embeddings)"
            )
        _positive("model", self, "timesteps image_size")
        if not (math.isfinite(self.scale_factor) and self.scale_factor > 0):
            raise ConfigError(f"scale_factor must be a positive number, got {self.scale_factor}")
        if not 0.0 < self.linear_start < self.linear_end < 1.0 or self.timesteps > 100_000:
            raise ConfigError(
                f"the schedule needs 0 < linear_start < linear_end < 1 and timesteps <= 100000, got "
                f"{self.linear_start}, {self.linear_end}, {self.timesteps}"
            )
        if self.unet.context_dim != self.context_dim:
            raise ConfigError(
                f"unet.context_dim {self.unet.context_dim} != the text width {self.context_dim}"
                f"{' (text.width + text2.width)' if self.text2 else ''}: the text encoder does not fit this UNet"
            )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context the text towers make (SDXL: both, concatenated)."""
        return self.text.width + (self.text2.width if self.text2 is not None else 0)

    @property
    def vector_dim(self) -> int:
        """Width of SDXL's vector conditioning: text2's pooled output and the size embeddings."""
        return self.text2.embed_dim + len(SIZE_CONDITIONS) * SIZE_EMBED_DIM if self.text2 is not None else 0

    # -- geometry -------------------------------------------------------------------------------------------

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (512 for SD1, 768 for SD2-v): the CLI's default."""
        return self.image_size * self.vae.downsample_factor

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's latent multiple."""
        return self.vae.downsample_factor * self.unet.size_multiple

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the latent of a height x width image."""
        f = self.vae.downsample_factor
        return height // f, width // f

    def condition_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the condition image a CSC-Tuner takes for a height x width image: its hint
        encoder's factor (8) times the latent size, whatever the VAE's factor."""
        h, w = self.latent_size(height, width)
        factor = math.prod(HINT_STRIDES)
        return h * factor, w * factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _positive(where: str, cfg: Any, names: str) -> None:
    for name in names.split():
        value = getattr(cfg, name)
        if type(value) is not int or value < 1:
            raise ConfigError(f"{where}.{name} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------

_SD2_UNET = UNetConfig(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
_SD2_TEXT = TextConfig(arch="open_clip", width=1024, layers=24, heads=16, embed_dim=1024, layer="penultimate")
# Tiny variants keep every structural feature (3 levels, attention at 2 of them, downsample skips) for tests.
_TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1), context_dim=32)
_TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
_SDXL_CLIP = TextConfig(layer="penultimate", final_norm=False)  # hidden_states[11], no final LayerNorm
_SDXL_BIGG = TextConfig(
    arch="open_clip",
    width=1280,
    layers=32,
    heads=20,
    embed_dim=1280,
    layer="penultimate",
    final_norm=False,
    pooled=True,
)
_SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4),
    attention_resolutions=(4, 2),
    num_heads=None,
    num_head_channels=64,
    transformer_depth=(0, 2, 10),
    context_dim=2048,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
    hint_channels=320,
    hint_ratio=2,
)

PRESETS: dict[str, ModelConfig] = {
    "sd-v1": ModelConfig(),
    "sd-v2-base": ModelConfig(family="sd2", unet=_SD2_UNET, text=_SD2_TEXT),
    "sd-v2-v": ModelConfig(family="sd2", unet=_SD2_UNET, text=_SD2_TEXT, parameterization="v", image_size=96),
    "tiny-sd1": ModelConfig(
        unet=_TINY_UNET, vae=_TINY_VAE, text=TextConfig(width=32, layers=2, heads=2, embed_dim=32), image_size=8
    ),
    "tiny-sd2": ModelConfig(
        family="sd2",
        unet=dataclasses.replace(_TINY_UNET, num_heads=None, num_head_channels=16, use_linear_in_transformer=True),
        vae=_TINY_VAE,
        text=TextConfig(arch="open_clip", width=32, layers=3, heads=2, embed_dim=32, layer="penultimate"),
        image_size=8,
    ),
    "sdxl-base": ModelConfig(
        family="sdxl", unet=_SDXL_UNET, text=_SDXL_CLIP, text2=_SDXL_BIGG, scale_factor=0.13025, image_size=128
    ),
    # tiny SDXL: every structural feature (no attention at the first level, per-level and middle depths,
    # two towers, the vector conditioning, hint ratio 2), small widths
    "tiny-sdxl": ModelConfig(
        family="sdxl",
        unet=dataclasses.replace(
            _SDXL_UNET,
            model_channels=32,
            channel_mult=(1, 2, 2),
            num_head_channels=16,
            transformer_depth=(0, 1, 2),
            context_dim=64,
            adm_in_channels=32 + 6 * 256,
            hint_channels=64,
        ),
        vae=_TINY_VAE,
        text=dataclasses.replace(_SDXL_CLIP, width=32, layers=3, heads=2, embed_dim=32),
        text2=dataclasses.replace(_SDXL_BIGG, width=32, layers=3, heads=2, embed_dim=32),
        scale_factor=0.13025,
        image_size=8,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Reading configs
# ---------------------------------------------------------------------------------------------------------


def build_dataclass(cls: type, data: dict[str, Any], where: str, sections: dict[str, type] | None = None) -> Any:
    """Instantiate dataclass `cls` from plain data: unknown keys are errors naming them, nested mappings
    become the dataclasses in `sections`, numbers are checked (YAML reads `1e-4` as a string: accepted as
    a float) and lists become tuples where the field is a tuple."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        if sections and name in sections and not (value is None and type(None) in typing.get_args(hints[name])):
            kwargs[name] = build_dataclass(sections[name], value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint` (int, float, bool, str, Literal, tuple[...], list[...], unions with
    None), or ConfigError naming what was expected. YAML reads `1e-4` as a string: accepted as a float."""
    types = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types_mod.UnionType) else (hint,)
    if value is None:
        if type(None) in types:
            return None
        raise ConfigError(f"{where}: expected {_describe(types)}, got null")
    for t in types:
        origin = typing.get_origin(t)
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and not isinstance(value, bool):
            if isinstance(value, (int, float)):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        if t is str and isinstance(value, str):
            return value
        if origin is Literal and value in typing.get_args(t):
            return value
        if origin in (tuple, list) and isinstance(value, (list, tuple)):
            (item,) = {a for a in typing.get_args(t) if a is not Ellipsis}
            items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        if t in (dict, Any) or origin is dict:
            return value
    raise ConfigError(f"{where}: expected {_describe(types)}, got {value!r:.80}")


def _describe(types: tuple) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    out = []
    for t in types:
        origin = typing.get_origin(t)
        if origin is Literal:
            out.append("one of " + ", ".join(map(repr, typing.get_args(t))))
        elif origin in (tuple, list):
            out.append("a list")
        else:
            out.append(names.get(t, getattr(t, "__name__", str(t))))
    return " or ".join(out)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if cls is ModelConfig and isinstance(data, dict) and isinstance(data.get("text"), dict):
        text = data["text"]
        if "layer" not in text and text.get("arch") == "open_clip":  # written before `layer` existed: SD2's
            data = {**data, "text": {**text, "layer": "penultimate"}}
    sections = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "text2": TextConfig}
    return build_dataclass(cls, data, where, sections)


def config_from_dict(data: dict[str, Any], where: str = "config") -> ModelConfig:
    """Our own layout (see `configs/*.yaml`), or an original CompVis/Stability inference config."""
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict) and "target" in data["model"]:
        if isinstance(data["model"]["target"], str) and data["model"]["target"] in _SGM_ENGINE:
            return _from_sgm(data, where)
        return _from_compvis(data, where)
    if isinstance(data, dict) and "preset" in data:
        base = PRESETS[_preset_name(data["preset"])]
        rest = {k: v for k, v in data.items() if k != "preset"}
        merged = base.to_dict()
        for key, value in rest.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        data = merged  # unknown keys are rejected by _build below
    return _build(ModelConfig, data, where)


def _preset_name(name: Any) -> str:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return name


def load_config(spec: str | Path | ModelConfig | dict) -> ModelConfig:
    """A preset name, a YAML path (ours or CompVis), a dict, or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, dict):
        return config_from_dict(spec)
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"config {str(spec)!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return config_from_dict(data, where=str(path))


# -- original CompVis / Stability inference YAML ----------------------------------------------------------

_COMPVIS_LDM = {"ldm.models.diffusion.ddpm.LatentDiffusion"}
_COMPVIS_UNET = {"ldm.modules.diffusionmodules.openaimodel.UNetModel"}
_COMPVIS_VAE = {"ldm.models.autoencoder.AutoencoderKL"}
_COMPVIS_TEXT = {
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": TextConfig(),
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": _SD2_TEXT,
}
# Keys of the original files that change nothing in inference-time structure or numerics.
_IGNORED_LDM = set(
    "log_every_t first_stage_key cond_stage_key image_size channels cond_stage_trainable conditioning_key monitor "
    "use_ema scale_by_std num_timesteps_cond scheduler_config ckpt_path ignore_keys load_only_unet loss_type "
    "linear_start linear_end timesteps scale_factor parameterization unet_config first_stage_config "
    "cond_stage_config".split()
)
_IGNORED_UNET = {"image_size", "use_checkpoint", "use_fp16", "legacy", "use_spatial_transformer", "dropout"}


def _section(d: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    """d[key] as a mapping (or `default` when absent), or ConfigError naming the path."""
    if key not in d and default is not ...:
        return default
    value = d.get(key)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{key}: expected a mapping, got {'nothing' if key not in d else repr(value)[:60]}")
    return value


def _target(d: dict[str, Any], known, where: str) -> str:
    target = d.get("target")
    if not isinstance(target, str) or target not in known:
        raise ConfigError(f"{where}.target {target!r} is not supported (expected {', '.join(sorted(known))})")
    return target


def _from_compvis(data: dict[str, Any], where: str) -> ModelConfig:
    model = _section(data, "model", where)
    _target(model, _COMPVIS_LDM, f"{where}: model")
    params = _section(model, "params", f"{where}: model", {})
    unknown = sorted(map(str, set(params) - _IGNORED_LDM))
    if unknown:
        raise ConfigError(f"{where}: unsupported model.params key(s) {unknown}")
    if params.get("conditioning_key", "crossattn") != "crossattn":
        raise ConfigError(f"{where}: conditioning_key {params['conditioning_key']!r} is not supported (crossattn only)")
    p = f"{where}: model.params"

    unet_cfg = _section(params, "unet_config", p)
    _target(unet_cfg, _COMPVIS_UNET, f"{p}.unet_config")
    up = dict(_section(unet_cfg, "params", f"{p}.unet_config"))
    for heads in ("num_heads", "num_head_channels"):  # -1 (or absent) means "not set" in the original
        if up.get(heads, -1) == -1:
            up[heads] = None
    unet = _build(UNetConfig, {k: v for k, v in up.items() if k not in _IGNORED_UNET}, f"{p}.unet_config")

    vae_cfg = _section(params, "first_stage_config", p)
    _target(vae_cfg, _COMPVIS_VAE, f"{p}.first_stage_config")
    vae_params = _section(vae_cfg, "params", f"{p}.first_stage_config")
    dd = dict(_section(vae_params, "ddconfig", f"{p}.first_stage_config.params"))
    if dd.pop("attn_resolutions", []):
        raise ConfigError(f"{where}: VAE attn_resolutions other than [] are not supported")
    if not dd.pop("double_z", True):
        raise ConfigError(f"{where}: a VAE with double_z false is not a KL autoencoder")
    for ignored in ("resolution", "dropout"):
        dd.pop(ignored, None)
    if "embed_dim" not in vae_params:
        raise ConfigError(f"{p}.first_stage_config.params: embed_dim is missing")
    vae = _build(VAEConfig, {**dd, "embed_dim": vae_params["embed_dim"]}, f"{p}.first_stage_config.params.ddconfig")

    text_cfg = _section(params, "cond_stage_config", p)
    text_target = _target(text_cfg, _COMPVIS_TEXT, f"{p}.cond_stage_config")
    text_params = _section(text_cfg, "params", f"{p}.cond_stage_config", {}) or {}
    layer = "penultimate" if "OpenCLIP" in text_target else "last"
    if text_params.get("layer", layer) != layer:
        raise ConfigError(f"{where}: cond_stage_config layer {text_params['layer']!r} is not supported")
    text = _COMPVIS_TEXT[text_target]

    scalars = {
        "parameterization": "eps",
        "scale_factor": 0.18215,
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "timesteps": 1000,
        "image_size": 64,
    }
    values = {k: params.get(k, default) for k, default in scalars.items()}
    fields = {"family": "sd2" if text.arch == "open_clip" else "sd1", **values}
    cfg = build_dataclass(ModelConfig, fields, p)
    return cfg.replace(unet=unet, vae=vae, text=text)


# -- Stability's sgm inference YAML (SDXL: `sd_xl_base.yaml`) ---------------------------------------------

_SGM_ENGINE = {"sgm.models.diffusion.DiffusionEngine"}
_SGM_UNET = {"sgm.modules.diffusionmodules.openaimodel.UNetModel"}
_SGM_VAE = {"sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "sgm.models.autoencoder.AutoencoderKL"}
_SGM_TEXT = {
    "sgm.modules.encoders.modules.FrozenCLIPEmbedder": _SDXL_CLIP,
    "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2": _SDXL_BIGG,
}
_SGM_SIZES = "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"
_SGM_IGNORED = {
    "disable_first_stage_autocast",
    "denoiser_config",
    "sampler_config",
    "loss_fn_config",
    "ckpt_path",
    "input_key",
    "log_keys",
    "no_cond_log",
    "compile_model",
    "en_and_decode_n_samples_a_time",
    "optimizer_config",
    "scheduler_config",
    "network_wrapper",
    "use_ema",
    "ema_decay_rate",
}
_SGM_IGNORED_UNET = _IGNORED_UNET | {"num_classes", "spatial_transformer_attn_type"}


def _from_sgm(data: dict[str, Any], where: str) -> ModelConfig:
    """An sgm DiffusionEngine config with the SDXL base's conditioner (CLIP-L, bigG, size embeddings)."""
    model = _section(data, "model", where)
    params = _section(model, "params", f"{where}: model", {})
    p = f"{where}: model.params"
    unknown = sorted(
        map(
            str,
            set(params) - _SGM_IGNORED - {"scale_factor", "network_config", "conditioner_config", "first_stage_config"},
        )
    )
    if unknown:
        raise ConfigError(f"{p}: unsupported key(s) {unknown}")
    net = _section(params, "network_config", p)
    _target(net, _SGM_UNET, f"{p}.network_config")
    up = dict(_section(net, "params", f"{p}.network_config"))
    if up.get("num_classes", "sequential") != "sequential":
        raise ConfigError(f"{p}.network_config: num_classes {up['num_classes']!r} is not supported (sequential)")
    for heads in ("num_heads", "num_head_channels"):
        if up.get(heads, -1) == -1:
            up[heads] = None
    unet = _build(UNetConfig, {k: v for k, v in up.items() if k not in _SGM_IGNORED_UNET}, f"{p}.network_config")
    unet = dataclasses.replace(unet, hint_channels=_SDXL_UNET.hint_channels, hint_ratio=_SDXL_UNET.hint_ratio)

    vae_cfg = _section(params, "first_stage_config", p)
    _target(vae_cfg, _SGM_VAE, f"{p}.first_stage_config")
    vae_params = _section(vae_cfg, "params", f"{p}.first_stage_config")
    dd = {
        k: v
        for k, v in _section(vae_params, "ddconfig", f"{p}.first_stage_config.params").items()
        if k not in ("resolution", "dropout", "attn_type", "double_z", "attn_resolutions")
    }
    vae = _build(VAEConfig, {**dd, "embed_dim": vae_params.get("embed_dim", 4)}, f"{p}.first_stage_config")

    cond = _section(_section(params, "conditioner_config", p), "params", f"{p}.conditioner_config")
    models = cond.get("emb_models")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"{p}.conditioner_config.params.emb_models: expected a list of embedders")
    texts = [_SGM_TEXT[m.get("target")] for m in models if m.get("target") in _SGM_TEXT]
    others = [m.get("target") for m in models if m.get("target") not in _SGM_TEXT and m.get("target") != _SGM_SIZES]
    if len(texts) != 2 or others:
        raise ConfigError(
            f"{p}: the conditioner must be SDXL base's (CLIP-L, OpenCLIP bigG, size embedders), "
            f"got {[m.get('target') for m in models]}"
        )
    scale = _coerce(params.get("scale_factor", 0.13025), float, f"{p}.scale_factor")
    return PRESETS["sdxl-base"].replace(unet=unet, vae=vae, text=texts[0], text2=texts[1], scale_factor=scale)


def _to_sgm_yaml(cfg: ModelConfig) -> dict[str, Any]:
    """sgm's inference YAML (as `configs/inference/sd_xl_base.yaml`) describing an SDXL config."""
    u, v = cfg.unet, cfg.vae
    unet = {
        "adm_in_channels": u.adm_in_channels,
        "num_classes": "sequential",
        "use_checkpoint": True,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "num_head_channels": u.num_head_channels,
        "use_linear_in_transformer": u.use_linear_in_transformer,
        "transformer_depth": list(u.depths),
        "context_dim": u.context_dim,
        "spatial_transformer_attn_type": "softmax-xformers",
    }
    sizes = [
        {"is_trainable": False, "input_key": key, "target": _SGM_SIZES, "params": {"outdim": SIZE_EMBED_DIM}}
        for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
    ]
    texts = [
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"layer": "hidden", "layer_idx": 11},
        },
        {
            "is_trainable": False,
            "input_key": "txt",
            "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
            "params": {
                "arch": "ViT-bigG-14",
                "version": "laion2b_s39b_b160k",
                "freeze": True,
                "layer": "penultimate",
                "always_return_pooled": True,
                "legacy": False,
            },
        },
    ]
    ddconfig = {
        "attn_type": "vanilla-xformers",
        "double_z": True,
        "z_channels": v.z_channels,
        "resolution": 256,
        "in_channels": v.in_channels,
        "out_ch": v.out_ch,
        "ch": v.ch,
        "ch_mult": list(v.ch_mult),
        "num_res_blocks": v.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {
        "scale_factor": cfg.scale_factor,
        "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser"},
        "network_config": {"target": next(iter(_SGM_UNET)), "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": texts + sizes}},
        "first_stage_config": {
            "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
            "params": {
                "embed_dim": v.embed_dim,
                "monitor": "val/rec_loss",
                "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
    }
    return {"model": {"target": next(iter(_SGM_ENGINE)), "params": params}}


def to_compvis_yaml(cfg: ModelConfig) -> dict[str, Any]:
    """The original CompVis/Stability inference YAML (as a dict) describing `cfg`; `load_config` reads it back
    (the text tower is named by its class only, so tiny text sizes do not survive the round trip).
    diffusers' single-file conversion takes it as `original_config`. SDXL: sgm's YAML instead."""
    if cfg.family == "sdxl":
        return _to_sgm_yaml(cfg)
    u, v = cfg.unet, cfg.vae
    unet: dict[str, Any] = {
        "use_checkpoint": True,
        "use_fp16": False,
        "image_size": 32,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
        "use_spatial_transformer": True,
        "transformer_depth": u.transformer_depth,
        "context_dim": u.context_dim,
        "legacy": False,
    }
    if u.num_heads is not None:
        unet["num_heads"] = u.num_heads
    else:
        unet.update(num_head_channels=u.num_head_channels, use_linear_in_transformer=u.use_linear_in_transformer)
    ddconfig = {
        "double_z": True,
        "z_channels": v.z_channels,
        "resolution": 256,
        "in_channels": v.in_channels,
        "out_ch": v.out_ch,
        "ch": v.ch,
        "ch_mult": list(v.ch_mult),
        "num_res_blocks": v.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    text_target = "FrozenCLIPEmbedder" if cfg.text.arch == "clip" else "FrozenOpenCLIPEmbedder"
    params: dict[str, Any] = {
        "linear_start": cfg.linear_start,
        "linear_end": cfg.linear_end,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": cfg.timesteps,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": cfg.image_size,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": cfg.scale_factor,
        "use_ema": False,
        "unet_config": {"target": next(iter(_COMPVIS_UNET)), "params": unet},
        "first_stage_config": {
            "target": next(iter(_COMPVIS_VAE)),
            "params": {
                "embed_dim": v.embed_dim,
                "monitor": "val/rec_loss",
                "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {"target": f"ldm.modules.encoders.modules.{text_target}"},
    }
    if cfg.parameterization == "v":
        params["parameterization"] = "v"
    if cfg.text.arch == "open_clip":
        params["cond_stage_config"]["params"] = {"freeze": True, "layer": "penultimate"}
    return {"model": {"base_learning_rate": 1e-4, "target": next(iter(_COMPVIS_LDM)), "params": params}}
