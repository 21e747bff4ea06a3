"""Tuner files: the project's own format, import of the official SCEdit formats, and attaching to a model.

Own format: one `.safetensors` file whose keys are the module's attribute names (`tuners.{m}.ln1.weight`
for SC-Tuners, m in decoder order; `pre_hint_blocks.*`, `dense_hint_blocks.*`, `lsc_tuner_blocks.*` for a
CSC-Tuner controller) and whose metadata says what it is, so it loads with no other file:
`ldm_sce.tuner` = JSON {format: 1, kind: 'sc'|'csc', base: 'sd1'|'sd2'|None, skip_dims, skips, down_ratio,
op, kernel, hint_channels, hint_ratio, condition, training}.

Reading validates that metadata against this schema: bad JSON, a missing or mistyped field, or an unknown
field is an error naming it (an unknown field means a newer ldm-sce wrote the file, or it was edited; a
field that changes how the tuner computes cannot be skipped safely, so it is not ignored), and so is a
`format` above the one this version reads. Files of earlier versions of this project, with no `format`,
are format 1. `training` is free-form (the training summary) and not checked.

Official formats (SPEC section 5), recognised from their key names:
- swift adapter dir (`0_SwiftSCETuning/adapter_model.safetensors|.bin`):
  `model.lsc_identity.{m}.scetuner_0_SwiftSCETuning.tuner_op.ln{1,2}.*`
- native scepter checkpoint (`ldm_step-N/pytorch_model.bin`): `model.lsc_identity.{m}.tuner_op.ln{1,2}.*`
- released controller dir (`0_SwiftSCETuning/pytorch_model.bin`): `[model.]0.pre_hint_blocks.*`,
  `0.dense_hint_blocks.{i}.1.*`, `0.lsc_tuner_blocks.{m}.tuner_op.*`
Their structure (dims, down ratio, kernel, hint width) is read from the weights' shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint_io import KIND_NAMES, CheckpointError, check_finite, file_kind, read_checkpoint
from .conditions import CONDITIONS
from .tuners import CSCTuner, SCTuner

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion

META_KEY = "ldm_sce.tuner"
FORMAT = 1  # the tuner-file format this version writes and reads


@dataclass
class TunerFile:
    kind: str  # 'sc' or 'csc'
    state_dict: dict[str, torch.Tensor]
    skip_dims: list[int]
    skips: list[int]
    base: str | None = None
    down_ratio: float = 1.0
    op: str = "linear"
    kernel: int = 1
    hint_channels: int = 256
    hint_ratio: int = 1
    condition: str | None = None
    training: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        return {"format": FORMAT, **{k: v for k, v in self.__dict__.items() if k != "state_dict"}}


def _is_int(v) -> bool:
    return type(v) is int


_SCHEMA = {  # field: (check, what it must be)
    "kind": (lambda v: v in ("sc", "csc"), "'sc' or 'csc'"),
    "skip_dims": (
        lambda v: isinstance(v, list) and all(_is_int(d) and 0 <= d <= 65536 for d in v),
        "a list of channels",
    ),
    "skips": (lambda v: isinstance(v, list) and all(_is_int(m) and m >= 0 for m in v), "a list of skip indices"),
    "base": (lambda v: v is None or isinstance(v, str), "a family name or null"),
    "down_ratio": (lambda v: type(v) in (int, float) and math.isfinite(v) and 0 < v <= 64, "a number in (0, 64]"),
    "op": (lambda v: v in ("linear", "conv"), "'linear' or 'conv'"),
    "kernel": (lambda v: v in (1, 3) and _is_int(v), "1 or 3"),
    "hint_channels": (lambda v: _is_int(v) and 0 < v <= 65536, "an integer in 1..65536"),
    "hint_ratio": (lambda v: _is_int(v) and 0 < v <= 64, "an integer in 1..64"),
    "condition": (lambda v: v is None or v in CONDITIONS, f"null or one of {', '.join(CONDITIONS)}"),
    "training": (lambda v: isinstance(v, dict), "a mapping"),
}


def _parse_metadata(raw: str, path: Path) -> dict:
    """The `ldm_sce.tuner` JSON, checked against the schema (module docstring)."""
    where = f"{path}: its '{META_KEY}' metadata"
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{where} is not valid JSON ({e}); the file is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    fmt = meta.pop("format", 1)
    if not _is_int(fmt) or fmt < 1:
        raise CheckpointError(f"{where} has format {fmt!r}, not a version number")
    if fmt > FORMAT:
        raise CheckpointError(
            f"{where} is format {fmt}, written by a newer ldm-sce; this version reads format {FORMAT}: upgrade"
        )
    unknown = sorted(set(meta) - set(_SCHEMA))
    if unknown:
        raise CheckpointError(
            f"{where} has unknown field(s) {unknown}: written by a newer ldm-sce (upgrade) or edited by hand"
        )
    missing = sorted({"kind", "skip_dims", "skips"} - set(meta))
    if missing:
        raise CheckpointError(f"{where} lacks the field(s) {missing}; the file is damaged or not a tuner file")
    for name, value in meta.items():
        ok, what = _SCHEMA[name]
        if not ok(value):
            raise CheckpointError(f"{where}: field {name!r} is {value!r:.80}, expected {what}")
    if any(m >= len(meta["skip_dims"]) for m in meta["skips"]) or len(set(meta["skips"])) != len(meta["skips"]):
        raise CheckpointError(f"{where}: skips {meta['skips']} do not index its skip_dims {meta['skip_dims']}")
    return meta


# ---------------------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------------------


def save_tuner_file(tf: TunerFile, path: str | Path, overwrite: bool = False) -> None:
    """Write atomically (a temporary file in the same folder, then rename); an existing file is replaced only
    with `overwrite` (FileExistsError otherwise)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or remove it first")
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tf.state_dict.items()}
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(tf.metadata())})
    os.replace(tmp, path)


def read_tuner_file(path: str | Path) -> TunerFile:
    """Our format, or any official SCEdit layout (a file or a directory holding one), validated."""
    path = _resolve(Path(path))
    sd, extras = read_checkpoint(path)
    check_finite(sd, path)
    if META_KEY in extras:
        meta = _parse_metadata(extras[META_KEY], path)
        if meta["kind"] == "sc":
            bad = [k for k in sd if not _OWN_SC_KEY.match(k)]
            if bad:
                raise CheckpointError(f"{path}: keys that are not SC-Tuner weights: {bad[:5]}")
        return TunerFile(state_dict=sd, **meta)
    kind = file_kind(sd, extras)
    if kind in ("checkpoint", "sdxl", "lora"):
        raise CheckpointError(f"{path}: this is {KIND_NAMES[kind]}, not a tuner file")
    return _from_official(sd, path)


def _resolve(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin", "model.safetensors"):
            for candidate in [path / name, path / "0_SwiftSCETuning" / name]:
                if candidate.is_file():
                    return candidate
        raise CheckpointError(f"{path}: no tuner weights found (adapter_model.safetensors/.bin or pytorch_model.bin)")
    raise CheckpointError(f"tuner not found: {path}")


_OWN_SC_KEY = re.compile(r"^tuners\.(\d+)\.ln[12]\.(?:weight|bias)$")
_SC_KEY = re.compile(r"^(?:model\.)?lsc_identity\.(\d+)\.(?:scetuner_\d+_\w+\.)?tuner_op\.(ln[12]\.(?:weight|bias))$")
_CSC_KEY = re.compile(r"^(?:model\.)?0\.(pre_hint_blocks|dense_hint_blocks|lsc_tuner_blocks)\.(.+)$")


def _from_official(sd: dict[str, torch.Tensor], path: Path) -> TunerFile:
    if sd and all(_SC_KEY.match(k) for k in sd):
        out = {}
        for k, v in sd.items():
            m, rest = _SC_KEY.match(k).groups()
            out[f"tuners.{int(m)}.{rest}"] = v
        skips = sorted({int(k.split(".")[1]) for k in out})
        dims = [out[f"tuners.{m}.ln1.weight"].shape[1] for m in skips]
        return TunerFile("sc", out, _full_dims(skips, dims), skips, down_ratio=_ratio(out, "tuners", skips[0]))
    if sd and all(_CSC_KEY.match(k) for k in sd):
        out = {}
        for k, v in sd.items():
            part, rest = _CSC_KEY.match(k).groups()
            out[f"{part}.{rest.replace('tuner_op.', '')}"] = v
        n = len({k.split(".")[1] for k in out if k.startswith("lsc_tuner_blocks.")})
        dims = [out[f"lsc_tuner_blocks.{m}.ln1.weight"].shape[1] for m in range(n)]
        dense = out["dense_hint_blocks.0.1.weight"]
        return TunerFile(
            "csc",
            out,
            dims,
            list(range(n)),
            kernel=dense.shape[-1],
            hint_channels=dense.shape[1],
            hint_ratio=out["pre_hint_blocks.0.weight"].shape[0] // 16,
            down_ratio=_ratio(out, "lsc_tuner_blocks", 0),
        )
    raise CheckpointError(
        f"{path}: not a tuner file: neither our format (metadata '{META_KEY}') nor an official SCEdit layout "
        f"(lsc_identity.* tuners or 0.pre_hint_blocks.* controllers). First keys: {list(sd)[:4]}"
    )


def _ratio(sd, prefix, m) -> float:
    w = sd[f"{prefix}.{m}.ln1.weight"]
    return w.shape[0] / w.shape[1]


def _full_dims(skips: list[int], dims: list[int]) -> list[int]:
    """Skip dims indexed by skip number; unknown (untuned) skips are 0."""
    full = [0] * (max(skips) + 1)
    for m, d in zip(skips, dims, strict=True):
        full[m] = d
    return full


# ---------------------------------------------------------------------------------------------------------
# Attaching to a model
# ---------------------------------------------------------------------------------------------------------


def _check_base(tf: TunerFile, model: LatentDiffusion, path: str | Path) -> None:
    model_dims = list(model.cfg.unet.skip_channels)
    # SC files may cover some skips (dim 0 = untuned); a controller must cover all of them
    fits = len(tf.skip_dims) <= len(model_dims) and all(d in (0, model_dims[m]) for m, d in enumerate(tf.skip_dims))
    if not fits or (tf.kind == "csc" and len(tf.skip_dims) != len(model_dims)):
        raise CheckpointError(
            f"{path}: this {tf.kind} tuner was made for a UNet with skip dims {tf.skip_dims} "
            f"({tf.base or 'base unknown'}), but the model ({model.cfg.family}) has {model_dims}; "
            "use a tuner trained for this base model"
        )
    if tf.base is not None and tf.base != model.cfg.family:
        raise CheckpointError(
            f"{path}: tuner made for {tf.base}, model is {model.cfg.family}; the skip dims agree but the "
            "features do not: use a tuner trained for this base model"
        )


def load_tuner(
    model: LatentDiffusion, path: str | Path, condition: str | None = None, kind: str | None = None
) -> list[SCTuner] | CSCTuner:
    """Attach the tuner in `path` (our format or an official one) to `model` (a LatentDiffusion) and return
    the attached SC-Tuners (list) or the CSCTuner controller. `kind` ('sc' or 'csc'): the kind the caller
    expects; a file of the other kind is refused, naming what it is. The model is changed only once the
    whole file has been checked."""
    tf = read_tuner_file(path)
    if kind is not None and tf.kind != kind:
        raise CheckpointError(f"{path}: this is {KIND_NAMES[tf.kind]}, not {KIND_NAMES[kind].split(' (')[0]}")
    _check_base(tf, model, path)
    unet = model.model.diffusion_model
    p = next(unet.parameters())
    if tf.kind == "sc":
        with torch.device("meta"):  # built without memory: their shapes are checked against the file first
            tuners = {m: SCTuner(tf.skip_dims[m], tf.down_ratio, tf.op) for m in tf.skips}
        listed = {f"tuners.{m}.{k}" for m, t in tuners.items() for k in t.state_dict()}
        unexpected = sorted(set(tf.state_dict) - listed)
        if unexpected:
            raise CheckpointError(f"{path}: keys for skips not listed in its metadata: {unexpected[:5]}")
        for m, tuner in tuners.items():
            prefix = f"tuners.{m}."
            _strict_load(tuner, {k[len(prefix) :]: v for k, v in tf.state_dict.items() if k.startswith(prefix)}, path)
        slots = list(unet.tuners)
        for m, tuner in tuners.items():
            slots[m] = tuner.to(p.device, p.dtype).eval().requires_grad_(False)
        unet.replace_tuners(slots)
        return [slots[m] for m in tf.skips]
    with torch.device("meta"):
        ctrl = CSCTuner(model.cfg.unet, tf.kernel, tf.hint_channels, tf.hint_ratio, tf.down_ratio)
    _strict_load(ctrl, tf.state_dict, path)
    ctrl.condition = condition or tf.condition
    return unet.attach_controller(ctrl.to(p.device, p.dtype).eval().requires_grad_(False))


def _strict_load(module: torch.nn.Module, sd: dict[str, torch.Tensor], path) -> None:
    """Load `sd` into `module` (built on the meta device) if its keys and shapes are exactly the module's."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: tuner weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {shapes[:5]}"
        )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, assign=True)


def sc_tuner_file(model: LatentDiffusion, training: dict | None = None) -> TunerFile:
    """The SC-Tuners attached to `model` as a TunerFile (for `save_tuner_file`)."""
    unet = model.model.diffusion_model
    skips = [m for m, t in enumerate(unet.tuners) if isinstance(t, SCTuner)]
    if not skips:
        raise ValueError("the model has no SC-Tuners attached")
    first = unet.tuners[skips[0]]
    sd = {f"tuners.{m}.{k}": v for m in skips for k, v in unet.tuners[m].state_dict().items()}
    return TunerFile(
        "sc",
        sd,
        list(model.cfg.unet.skip_channels),
        skips,
        base=model.cfg.family,
        op=first.op,
        down_ratio=first.ln1.weight.shape[0] / first.ln1.weight.shape[1],
        training=training or {},
    )


def csc_tuner_file(
    model: LatentDiffusion, controller: CSCTuner, condition: str | None, training: dict | None = None
) -> TunerFile:
    w = controller.lsc_tuner_blocks[0].ln1.weight
    return TunerFile(
        "csc",
        controller.state_dict(),
        list(model.cfg.unet.skip_channels),
        list(range(len(controller.lsc_tuner_blocks))),
        base=model.cfg.family,
        down_ratio=w.shape[0] / w.shape[1],
        kernel=controller.kernel,
        hint_channels=controller.pre_hint_blocks[-1].out_channels,
        hint_ratio=controller.pre_hint_blocks[0].out_channels // 16,
        condition=condition,
        training=training or {},
    )
