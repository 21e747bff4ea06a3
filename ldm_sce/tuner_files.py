"""Tuner files: the project's own format, import of the official SCEdit formats, and attaching to a model.

Own format: one `.safetensors` file whose keys are the module's attribute names (`tuners.{m}.ln1.weight`
for SC-Tuners, m in decoder order; `pre_hint_blocks.*`, `dense_hint_blocks.*`, `lsc_tuner_blocks.*` for a
CSC-Tuner controller) and whose metadata says what it is, so it loads with no other file:
`ldm_sce.tuner` = JSON {format: 1, kind: 'sc'|'csc', base: 'sd1'|'sd2'|'sdxl'|None, skip_dims, skips,
down_ratio, op, kernel, hint_channels, hint_ratio (a float, scepter's PRE_HINT_DIM_RATIO), condition,
default_weight (a controller's w_i when none is asked: a released controller's SCALE), text_lora (scepter
Studio's TEXT_SCE: the file also holds a LoRA on the first text encoder, in kohya's key layout
`lora_te_*.lora_down.weight`, `.lora_up.weight`, `.alpha`), training}. Beside it, the SAI model spec keys
(`modelspec.*`) and a kohya-style training summary (`ss_*`) for the community's tools; they are not read back.

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
  `0.dense_hint_blocks.{i}.1.*`, `0.lsc_tuner_blocks.{m}.tuner_op.*`; its `configuration.json` `SCALE` is
  the controller's default weight
- scepter Studio's TEXT_SCE folder: `0_SwiftSCETuning/` (the SC-Tuners, as above) and `1_SwiftLoRA/` (a swift
  LoRA on the first text encoder, `adapter_config.json` with r and lora_alpha)
Their structure (dims, down ratio, kernel, every hint-encoder width) is read from the weights' shapes.
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
from .lora import remove_lora
from .tuners import CSCTuner, SCTuner, SkipIdentity, TunerSet

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
    hint_ratio: float = 1
    condition: str | None = None
    default_weight: float = 1.0
    text_lora: dict | None = None
    training: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        return {"format": FORMAT, **{k: v for k, v in self.__dict__.items() if k != "state_dict"}}

    @property
    def sc_state_dict(self) -> dict[str, torch.Tensor]:
        """The tuner weights without a TEXT_SCE file's text-encoder LoRA."""
        return {k: v for k, v in self.state_dict.items() if not k.startswith("lora_te")}

    @property
    def text_lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict.items() if k.startswith("lora_te")}


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
    "hint_ratio": (lambda v: type(v) in (int, float) and math.isfinite(v) and 0 < v <= 64, "a number in (0, 64]"),
    "condition": (lambda v: v is None or v in CONDITIONS, f"null or one of {', '.join(CONDITIONS)}"),
    "default_weight": (lambda v: type(v) in (int, float) and math.isfinite(v) and abs(v) <= 100, "a number"),
    "text_lora": (lambda v: v is None or isinstance(v, dict), "null or a mapping"),
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
    metadata = {META_KEY: json.dumps(tf.metadata()), **community_metadata(tf, path.stem)}
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}
_KOHYA_BASES = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def community_metadata(tf: TunerFile, title: str) -> dict[str, str]:
    """The SAI model spec keys (`modelspec.*`, spec 1.0.0) and, where they map, kohya's training summary
    keys (`ss_*`), so that model managers and A1111-style tools can list the file. Written, never read."""
    import datetime

    what = {"sc": "SC-Tuner", "csc": "CSC-Tuner controller"}[tf.kind]
    arch = _ARCHITECTURES.get(tf.base or "", "stable-diffusion")
    t = tf.training
    out = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/scedit-{tf.kind}",
        "modelspec.implementation": "ldm_sce",
        "modelspec.title": title,
        "modelspec.description": f"SCEdit {what} (skip connection editing) on {len(tf.skips)} skips"
        + (f", condition {tf.condition}" if tf.condition else "")
        + (", with a text-encoder LoRA (TEXT_SCE)" if tf.text_lora else ""),
        "modelspec.date": datetime.date.today().isoformat(),
        "ss_network_module": f"ldm_sce.scedit.{tf.kind}",
    }
    if isinstance(t.get("resolution"), int):
        out["modelspec.resolution"] = f"{t['resolution']}x{t['resolution']}"
        out["ss_resolution"] = f"({t['resolution']}, {t['resolution']})"
    if tf.base in _KOHYA_BASES:
        out["ss_base_model_version"] = _KOHYA_BASES[tf.base]
    if isinstance(t.get("trigger"), str) and t["trigger"].strip():
        out["modelspec.trigger_phrase"] = t["trigger"].strip()
    for ours, theirs in (
        ("steps", "ss_max_train_steps"),
        ("lr", "ss_learning_rate"),
        ("batch_size", "ss_batch_size_per_device"),
    ):
        if isinstance(t.get(ours), (int, float)):
            out[theirs] = str(t[ours])
    if "converted_from" in t:
        out["ss_training_comment"] = f"converted from {t['converted_from']}"
    return out


def read_tuner_file(path: str | Path) -> TunerFile:
    """Our format, or any official SCEdit layout (a file or a directory holding one), validated."""
    path = _resolve(Path(path))
    if path.is_dir():  # scepter Studio's TEXT_SCE: SC-Tuners and a text-encoder LoRA, two swift folders
        return _text_sce(path)
    sd, extras = read_checkpoint(path)
    check_finite(sd, path)
    if META_KEY in extras:
        meta = _parse_metadata(extras[META_KEY], path)
        if meta["kind"] == "sc":
            lora = meta.get("text_lora") is not None
            bad = [k for k in sd if not (_OWN_SC_KEY.match(k) or (lora and k.startswith("lora_te")))]
            if bad:
                raise CheckpointError(f"{path}: keys that are not SC-Tuner weights: {bad[:5]}")
        return TunerFile(state_dict=sd, **meta)
    kind = file_kind(sd, extras)
    if kind in ("checkpoint", "sdxl", "lora"):
        raise CheckpointError(f"{path}: this is {KIND_NAMES[kind]}, not a tuner file")
    return _from_official(sd, path)


def convert_tuner(src: str | Path, out: str | Path, base: str | None = None, condition: str | None = None) -> TunerFile:
    """An official SCEdit tuner or controller (any layout `read_tuner_file` reads) written as one file of ours
    at `out` (never over an existing file); base: the family it was trained on (sd1, sd2, sdxl); condition:
    a controller's condition type. `tools/convert_tuner.py` and the web UI call this."""
    tf = read_tuner_file(src)
    tf.base = base or tf.base
    if condition:
        if tf.kind != "csc":
            raise CheckpointError("a condition type applies to controllers (CSC-Tuners) only")
        tf.condition = condition
    tf.training = {**tf.training, "converted_from": str(src)}
    save_tuner_file(tf, out)
    return tf


def _resolve(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir() and _lora_folder(path) is not None:
        return path
    if path.is_dir():
        for name in ("adapter_model.safetensors", "adapter_model.bin", "pytorch_model.bin", "model.safetensors"):
            for candidate in [path / name, path / "0_SwiftSCETuning" / name]:
                if candidate.is_file():
                    return candidate
        raise CheckpointError(f"{path}: no tuner weights found (adapter_model.safetensors/.bin or pytorch_model.bin)")
    raise CheckpointError(f"tuner not found: {path}")


def _lora_folder(path: Path) -> Path | None:
    """The swift LoRA folder (`<n>_SwiftLoRA`) of a scepter Studio TEXT_SCE tuner folder, if it has one."""
    found = sorted(p for p in path.glob("*_SwiftLoRA") if p.is_dir())
    return found[0] if found else None


def _text_sce(path: Path) -> TunerFile:
    """scepter Studio's TEXT_SCE folder as one TunerFile: the SC-Tuners plus the first text encoder's LoRA,
    stored in kohya's layout (`lora_te_*`) with its alpha (lora_alpha from `adapter_config.json`)."""
    from .lora import SWIFT_KEY, adapter_file

    sce = sorted(p for p in path.glob("*_SwiftSCETuning") if p.is_dir())
    if not sce:
        raise CheckpointError(f"{path}: a swift LoRA folder but no *_SwiftSCETuning folder beside it")
    tf = read_tuner_file(sce[0])
    if tf.kind != "sc":
        raise CheckpointError(f"{sce[0]}: TEXT_SCE holds SC-Tuners, found {KIND_NAMES[tf.kind]}")
    weights, alpha = adapter_file(_lora_folder(path), None)
    sd, _ = read_checkpoint(weights)
    check_finite(sd, weights)
    lora: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        m = SWIFT_KEY.match(key)
        if m is None:
            raise CheckpointError(f"{weights}: not a swift text-encoder LoRA key: {key}")
        name = f"lora_te_text_model_encoder_layers_{m[1]}_{m[2].replace('.', '_')}"
        lora[f"{name}.{'lora_down' if m[3] == 'A' else 'lora_up'}.weight"] = value
    ranks = {v.shape[0] for k, v in lora.items() if k.endswith("lora_down.weight")}
    if len(ranks) != 1:
        raise CheckpointError(f"{weights}: LoRA ranks {sorted(ranks)}; expected one rank")
    rank = ranks.pop()
    alpha = float(rank if alpha is None else alpha)
    for key in [k for k in lora if k.endswith("lora_down.weight")]:
        lora[key.replace("lora_down.weight", "alpha")] = torch.tensor(alpha)
    tf.state_dict = {**tf.state_dict, **lora}
    tf.text_lora = {"rank": rank, "alpha": alpha}
    return tf


def _controller_config(path: Path) -> dict:
    """The CSCTuners settings in a released controller's `configuration.json` (beside the weights or one
    folder up), found wherever it nests; {} without one."""
    for candidate in (path.parent / "configuration.json", path.parent.parent / "configuration.json"):
        if candidate.is_file():
            try:
                cfg = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{candidate}: not valid JSON ({e})") from None
            stack = [cfg]
            while stack:
                node = stack.pop()
                if isinstance(node, dict):
                    if "SCALE" in node or "PRE_HINT_DIM_RATIO" in node:
                        return node
                    stack.extend(node.values())
                elif isinstance(node, list):
                    stack.extend(node)
            return {}
    return {}


def _hint_ratio(sd: dict[str, torch.Tensor], path: Path, declared) -> float:
    """The width ratio r whose widths int(16 r), ..., int(96 r) are exactly the hint encoder's in the file."""
    from .tuners import HINT_WIDTH_BASES, hint_widths

    widths = [sd[f"pre_hint_blocks.{2 * i}.weight"].shape[0] for i in range(len(HINT_WIDTH_BASES))]
    candidates = [w / b for w, b in zip(widths, HINT_WIDTH_BASES, strict=True)]
    candidates += [math.nextafter(c, math.inf) for c in candidates]
    if declared is not None:
        if type(declared) not in (int, float) or hint_widths(declared) != widths:
            raise CheckpointError(
                f"{path}: its configuration.json says PRE_HINT_DIM_RATIO {declared!r}, but the hint encoder's "
                f"widths are {widths}; the folder mixes files of two controllers"
            )
        return float(declared)
    for r in candidates:
        if hint_widths(r) == widths:
            return r
    raise CheckpointError(f"{path}: hint encoder widths {widths} are not int(16 r), ..., int(96 r) for any ratio r")


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
        need = [f"lsc_tuner_blocks.{m}.ln1.weight" for m in range(n)] + ["dense_hint_blocks.0.1.weight"]
        need += [f"pre_hint_blocks.{2 * i}.weight" for i in range(6)]
        if any(k not in out for k in need):
            raise CheckpointError(f"{path}: an incomplete controller: missing {[k for k in need if k not in out][:4]}")
        dims = [out[f"lsc_tuner_blocks.{m}.ln1.weight"].shape[1] for m in range(n)]
        dense = out["dense_hint_blocks.0.1.weight"]
        config = _controller_config(path)
        scale = config.get("SCALE", 1.0)
        if type(scale) not in (int, float) or not math.isfinite(scale):
            raise CheckpointError(f"{path}: configuration.json SCALE is {scale!r}, not a number")
        return TunerFile(
            "csc",
            out,
            dims,
            list(range(n)),
            kernel=dense.shape[-1],
            hint_channels=dense.shape[1],
            hint_ratio=_hint_ratio(out, path, config.get("PRE_HINT_DIM_RATIO")),
            down_ratio=_ratio(out, "lsc_tuner_blocks", 0),
            default_weight=float(scale),
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
    check_fits(tf, list(model.cfg.unet.skip_channels), model.cfg.family, path)


def check_fits(tf: TunerFile, model_dims: list[int], family: str | None, path: str | Path) -> None:
    """The tuner file's skips and base agree with a UNet's skip dims (decoder order) and family."""
    # SC files may cover some skips (dim 0 = untuned); a controller must cover all of them
    fits = len(tf.skip_dims) <= len(model_dims) and all(d in (0, model_dims[m]) for m, d in enumerate(tf.skip_dims))
    if not fits or (tf.kind == "csc" and len(tf.skip_dims) != len(model_dims)):
        raise CheckpointError(
            f"{path}: this {tf.kind} tuner was made for a UNet with skip dims {tf.skip_dims} "
            f"({tf.base or 'base unknown'}), but the model ({family or 'family unknown'}) has {model_dims}; "
            "use a tuner trained for this base model"
        )
    if tf.base is not None and family is not None and tf.base != family:
        raise CheckpointError(
            f"{path}: tuner made for {tf.base}, model is {family}; the skip dims agree but the "
            "features do not: use a tuner trained for this base model"
        )


def load_tuner(
    model: LatentDiffusion,
    path: str | Path,
    condition: str | None = None,
    kind: str | None = None,
    text_weight: float = 1.0,
) -> list[SCTuner] | CSCTuner:
    """Attach the tuner in `path` (our format or an official one) to `model` (a LatentDiffusion) and return
    the attached SC-Tuners (list) or the CSCTuner controller. `kind` ('sc' or 'csc'): the kind the caller
    expects; a file of the other kind is refused, naming what it is. A TEXT_SCE file's text-encoder LoRA is
    applied too, at `text_weight`. The model is changed only once the whole file has been checked."""
    tf = _read_for(model, path, kind)
    unet = model.model.diffusion_model
    if tf.kind == "sc":
        tuners = build_sc_tuners(tf, unet, path)
        lora = _text_lora(model, tf, path)
        slots = list(unet.tuners)
        for m, tuner in tuners.items():
            slots[m] = tuner
        unet.replace_tuners(slots)
        if lora:
            remove_lora(model, source="tuner")  # the text LoRA of a TEXT_SCE tuner loaded before
        _apply_text_lora(lora, text_weight)
        return [slots[m] for m in tf.skips]
    p = next(unet.parameters())
    with torch.device("meta"):
        ctrl = CSCTuner(model.cfg.unet, tf.kernel, tf.hint_channels, tf.hint_ratio, tf.down_ratio)
    strict_load(ctrl, tf.state_dict, path)
    ctrl.condition = condition or tf.condition
    ctrl.default_weight = tf.default_weight
    return unet.attach_controller(ctrl.to(p.device, p.dtype).eval().requires_grad_(False))


def load_tuners(
    model: LatentDiffusion, files: list[tuple[str | Path, float]], mode: str = "sum"
) -> list[TunerSet | SCTuner]:
    """Attach several SC-Tuner files at once, file k with weight s_k, combined on each skip as `mode` says
    (`TunerSet`: 'sum' of the edits, order-free; 'sequential': scepter Studio's composition, in the order
    given). Replaces the SC-Tuners attached before; returns the new tuner slots. TEXT_SCE files' text LoRAs
    are applied at their tuner's weight. Every file is checked before the model changes."""
    from .tuners import COMPOSE_MODES

    if mode not in COMPOSE_MODES:
        raise ValueError(f"tuner composition must be one of {', '.join(COMPOSE_MODES)}, got {mode!r}")
    unet = model.model.diffusion_model
    loaded = []
    for path, weight in files:
        tf = _read_for(model, path, "sc")
        loaded.append((build_sc_tuners(tf, unet, path), _text_lora(model, tf, path), float(weight)))
    slots = list(unet.tuners)
    for m in range(len(slots)):
        here = [(tuners[m], w) for tuners, _, w in loaded if m in tuners]
        if not here:
            slots[m] = SkipIdentity()
        elif len(loaded) == 1 and here[0][1] == 1.0:
            slots[m] = here[0][0]  # one tuner at weight 1: the plain SC-Tuner
        else:
            slots[m] = TunerSet([t for t, _ in here], [w for _, w in here], mode)
    unet.replace_tuners(slots)
    remove_lora(model, source="tuner")  # the text LoRAs of the tuners replaced
    for _, lora, weight in loaded:
        _apply_text_lora(lora, weight)
    return [s for s in slots if not isinstance(s, SkipIdentity)]


def _read_for(model: LatentDiffusion, path: str | Path, kind: str | None) -> TunerFile:
    tf = read_tuner_file(path)
    if kind is not None and tf.kind != kind:
        raise CheckpointError(f"{path}: this is {KIND_NAMES[tf.kind]}, not {KIND_NAMES[kind].split(' (')[0]}")
    _check_base(tf, model, path)
    return tf


def build_sc_tuners(tf: TunerFile, unet: torch.nn.Module, path) -> dict[int, SCTuner]:
    """The file's SC-Tuners by skip, checked against its metadata and loaded, on the UNet's device, frozen."""
    with torch.device("meta"):  # built without memory: their shapes are checked against the file first
        tuners = {m: SCTuner(tf.skip_dims[m], tf.down_ratio, tf.op) for m in tf.skips}
    sd = tf.sc_state_dict
    listed = {f"tuners.{m}.{k}" for m, t in tuners.items() for k in t.state_dict()}
    unexpected = sorted(set(sd) - listed)
    if unexpected:
        raise CheckpointError(f"{path}: keys for skips not listed in its metadata: {unexpected[:5]}")
    for m, tuner in tuners.items():
        prefix = f"tuners.{m}."
        strict_load(tuner, {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, path)
    p = next(unet.parameters())
    return {m: t.to(p.device, p.dtype).eval().requires_grad_(False) for m, t in tuners.items()}


def _text_lora(model: LatentDiffusion, tf: TunerFile, path) -> list:
    """A TEXT_SCE file's text-encoder LoRA layers, checked against the model (on SDXL: its first tower)."""
    from .lora import read_lora

    sd = tf.text_lora_state_dict
    if not sd:
        return []
    if model.cfg.family == "sdxl":
        sd = {k.replace("lora_te_", "lora_te1_", 1) if k.startswith("lora_te_") else k: v for k, v in sd.items()}
    return read_lora(model, Path(path), sd=sd)


def _apply_text_lora(layers: list, weight: float) -> None:
    from .lora import apply_lora

    if layers:
        apply_lora(layers, weight, source="tuner")


def strict_load(module: torch.nn.Module, sd: dict[str, torch.Tensor], path) -> None:
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
        hint_ratio=controller.hint_ratio,
        condition=condition,
        default_weight=controller.default_weight,
        training=training or {},
    )
