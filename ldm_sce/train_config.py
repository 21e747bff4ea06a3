"""The training config: plain data read from YAML plus `section.key=value` overrides, every value checked
(type, finite, in range) before anything is loaded, and the comparison a resumed run makes with the config
its checkpoint was saved with."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, build_dataclass
from .methods import METHODS, MethodSection
from .shards import is_shards


@dataclass
class ModelSection:
    ckpt: str = ""
    config: str | None = None  # preset or YAML; None: detected from the checkpoint
    parameterization: str | None = None
    # the frozen UNet and text encoders in fp16/bf16 to save memory (needs precision fp16/bf16); what trains
    # and the VAE stay fp32 (not for method full, which trains the UNet)
    dtype: str = "fp32"


@dataclass
class DataSection:
    # an image folder (captions beside the images, `N_name` subfolders), train.csv, metadata.jsonl, or tar
    # shards streamed in WebDataset's layout (a .tar, a folder of them, a glob or {000..099} braces: shards.py)
    path: str = ""
    shuffle_buffer: int = 1000  # tar shards: samples in the shuffle buffer (references, not images)
    resolution: int = 512
    trigger: str = ""  # prefix of every caption, e.g. "<sce> "
    suffix: str = ""  # appended to every caption, e.g. " zqx style" (kohya's caption_suffix)
    caption_dropout: float = 0.0
    caption_extension: str = ".txt"  # the caption file beside each image (kohya's caption_extension)
    shuffle_caption: bool = False  # shuffle the comma-separated tags of each caption (kohya's shuffle_caption)
    keep_tokens: int = 0  # the first N tags stay first and are never shuffled or dropped (kohya's keep_tokens)
    tag_dropout: float = 0.0  # drop each other tag with this probability (kohya's caption_tag_dropout_rate)
    condition_dir: str | None = None
    cache: bool = False  # keep VAE posteriors and text features in memory (small datasets)
    # keep VAE posteriors and text features on disk here, keyed by the image's content, its size, the caption
    # and the weights that made them: reused across runs, recomputed when any of them changes
    cache_dir: str | None = None
    workers: int = 0  # threads decoding a batch's images in parallel (PIL and OpenCV release the GIL); 0: none
    # aspect-ratio buckets (kohya's): sides multiples of bucket_reso_steps, area <= resolution^2
    buckets: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False  # an image smaller than the area gets a bucket of its own (rounded) size


@dataclass
class OptimSection:
    lr: float = 5e-5
    weight_decay: float = 0.01
    eps: float = 1e-8  # AdamW epsilon
    batch_size: int = 1  # global batch per optimiser micro-step, split over processes
    grad_accum: int = 1
    warmup_steps: int = 0
    max_steps: int = 1000
    lr_schedule: str = "constant"  # after warmup: constant | cosine (to 0 at max_steps)


@dataclass
class ValidationSection:
    every: int = 0  # 0: only at the end
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 20
    scale: float = 7.5
    control_images: list[str] = field(default_factory=list)  # csc: one per prompt (raw images)


@dataclass
class EmaSection:
    """An exponential moving average of the trainable weights: ema = decay * ema + (1 - decay) * w after
    every step from `start_step` on (before it, ema = w). decay 0: off. export: the exported tuner holds the
    EMA weights (validation images too), else the trained ones."""

    decay: float = 0.0
    start_step: int = 0
    export: bool = True


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    ema: EmaSection = field(default_factory=EmaSection)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute decoder blocks in backward (less memory, more time)
    compile: str = "none"  # torch.compile the UNet: none | blocks (its ResBlocks and transformer blocks) | full
    # offset noise (kohya's and diffusers' --noise_offset): add offset * N(0, 1) per image and channel to the
    # noise, so the model cannot read the image's mean colour from the noise's at high t (0.1 is usual)
    noise_offset: float = 0.0
    # min-SNR-gamma loss weighting (Hang et al. 2023): each sample's loss times min(SNR_t, gamma) / SNR_t for eps
    # prediction, / (SNR_t + 1) for v; 0: off (plain MSE). 5 is the paper's value.
    min_snr_gamma: float = 0.0
    # train on the schedule rescaled to zero terminal SNR (Lin et al. 2024; v-prediction models, e.g. SD2-v):
    # at t = T the model sees pure noise, as when sampling starts; sample the result with --zero-terminal-snr
    zero_terminal_snr: bool = False
    seed: int = 0
    output_dir: str = "outputs/train"
    save_every: int = 500  # 0: only at the end
    keep_last: int = 3
    log_every: int = 10

    def check(self) -> TrainConfig:
        """Raise ConfigError naming the first bad setting and its allowed values; returns self."""
        if self.method.name not in METHODS:
            raise ConfigError(f"method.name must be one of {', '.join(METHODS)}, got {self.method.name!r}")
        o, d, v = self.optim, self.data, self.validation
        errors = [
            # tar shards carry precomputed conditions as a part of each sample (shards.py)
            *METHODS[self.method.name].check(self.method, d.condition_dir or ("shards" if is_shards(d.path) else None)),
            _choice("precision", self.precision, ("fp32", "bf16", "fp16")),
            _choice("compile", self.compile, ("none", "blocks", "full")),
            _choice("model.dtype", self.model.dtype, ("fp32", "bf16", "fp16")),
            "model.dtype fp16/bf16 needs precision fp16 or bf16 (autocast)"
            if self.model.dtype != "fp32" and self.precision == "fp32"
            else "",
            "model.dtype fp16/bf16 is for frozen bases: method full trains the UNet in fp32"
            if self.model.dtype != "fp32" and self.method.name == "full"
            else "",
            _choice("optim.lr_schedule", o.lr_schedule, ("constant", "cosine")),
            "" if self.model.ckpt else "model.ckpt is required (the base checkpoint)",
            "" if d.path else "data.path is required",
            _number("optim.lr", o.lr, 0.0, 1.0, low_open=True),
            _number("optim.weight_decay", o.weight_decay, 0.0, 10.0),
            _number("optim.eps", o.eps, 0.0, 1.0, low_open=True),
            _number("data.caption_dropout", d.caption_dropout, 0.0, 1.0),
            _number("noise_offset", self.noise_offset, 0.0, 10.0),
            _number("min_snr_gamma", self.min_snr_gamma, 0.0, 1000.0),
            _number("ema.decay", self.ema.decay, 0.0, 1.0),
            "ema.decay must be below 1 (1 would never move)" if self.ema.decay == 1.0 else "",
            _integer("ema.start_step", self.ema.start_step, 0),
            _number("data.tag_dropout", d.tag_dropout, 0.0, 1.0),
            _integer("data.bucket_reso_steps", d.bucket_reso_steps, 8, 1024),
            _integer("data.min_bucket_reso", d.min_bucket_reso, 8, 16384),
            _integer("data.max_bucket_reso", d.max_bucket_reso, 8, 16384),
            "data.min_bucket_reso is above data.max_bucket_reso"
            if d.buckets and d.min_bucket_reso > d.max_bucket_reso
            else "",
            _integer("data.keep_tokens", d.keep_tokens, 0),
            _integer("data.workers", d.workers, 0, 256),
            _integer("data.shuffle_buffer", d.shuffle_buffer, 1),
            "data.caption_extension must start with '.' (e.g. .txt, .caption)"
            if not d.caption_extension.startswith(".")
            else "",
            _number("validation.scale", v.scale, 0.0, 100.0),
            _integer("optim.batch_size", o.batch_size, 1),
            _integer("optim.grad_accum", o.grad_accum, 1),
            _integer("optim.max_steps", o.max_steps, 1),
            _integer("optim.warmup_steps", o.warmup_steps, 0),
            _integer("data.resolution", d.resolution, 8, 16384),
            _integer("seed", self.seed, 0, 2**32 - 1),
            _integer("save_every", self.save_every, 0),
            _integer("keep_last", self.keep_last, 1),
            _integer("log_every", self.log_every, 1),
            _integer("validation.every", v.every, 0),
            _integer("validation.steps", v.steps, 1, 1000),
            *(_integer("validation.seeds", s, 0, 2**32 - 1) for s in v.seeds),
            "validation.seeds is empty: give at least one seed" if v.prompts and not v.seeds else "",
        ]
        errors = [e for e in errors if e]
        if errors:
            raise ConfigError(errors[0] if len(errors) == 1 else "; ".join(errors))
        return self


def _choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    return "" if value in options else f"{name} must be one of {', '.join(options)}, got {value!r}"


def _number(name: str, value: float, lo: float, hi: float, low_open: bool = False) -> str:
    ok = math.isfinite(value) and (lo < value if low_open else lo <= value) and value <= hi
    return "" if ok else f"{name} must be a number in {'(' if low_open else '['}{lo:g}, {hi:g}], got {value}"


def _integer(name: str, value: int, lo: int, hi: int | None = None) -> str:
    if type(value) is int and value >= lo and (hi is None or value <= hi):
        return ""
    allowed = f"at least {lo}" if hi is None else f"in {lo}..{hi}"
    return f"{name} must be an integer {allowed}, got {value!r}"


_SECTIONS = {
    "model": ModelSection,
    "method": MethodSection,
    "data": DataSection,
    "optim": OptimSection,
    "validation": ValidationSection,
    "ema": EmaSection,
}


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """YAML file plus `section.key=value` overrides (values parsed as YAML), checked (`TrainConfig.check`)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read the training config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (the training config is YAML)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the training config must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value) if value.strip() else ""  # `data.trigger=` sets an empty string
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return build_dataclass(TrainConfig, data, str(path), _SECTIONS).check()


# Settings a resumed run may change: they do not change what the steps compute (max_steps only where the run
# ends, and with a cosine schedule where its learning rate goes; the caches return what they stored, bitwise).
RESUMABLE = {"optim.max_steps", "output_dir", "save_every", "keep_last", "log_every", "data.cache", "data.cache_dir"}
RESUMABLE |= {"data.workers"}
RESUMABLE_SECTIONS = ("validation.",)


def config_changes(saved: dict, current: TrainConfig) -> tuple[list[str], list[str]]:
    """(changes that break an exact resume, harmless ones) between a checkpoint's saved config and `current`,
    each as 'key: saved -> current'."""
    now = _flatten(dataclasses.asdict(current))
    before = _flatten(saved)
    defaults = _flatten(dataclasses.asdict(TrainConfig()))
    breaking, harmless = [], []
    for key in sorted(set(now) | set(before)):
        a, b = before.get(key, "<absent>"), now.get(key, "<absent>")
        if a == "<absent>" and b == defaults.get(key, "<absent>"):
            continue  # a setting newer than the checkpoint, at its default: the run computes as before
        if a != b:
            line = f"{key}: {a!r} -> {b!r}"
            (harmless if key in RESUMABLE or key.startswith(RESUMABLE_SECTIONS) else breaking).append(line)
    return breaking, harmless


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
