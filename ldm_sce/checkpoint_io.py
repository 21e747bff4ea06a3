"""Reading original Stable Diffusion checkpoints safely, detecting their family, and loading them strictly.

`.ckpt` files are pickles. Real SD files pickle PyTorch Lightning objects, so `torch.load(weights_only=True)`
refuses them, while turning the weights-only mode off would run any code the file carries. `read_checkpoint` uses its own
unpickler over torch's zip format instead: it rebuilds tensors and plain containers, turns Lightning
objects into inert placeholders, and refuses every other callable before it is called.
"""

from __future__ import annotations

import io
import json
import logging
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from .config import PRESETS, ConfigError, ModelConfig, load_config
from .diffusion import SCHEDULE_BUFFERS, LatentDiffusion, make_schedule

log = logging.getLogger(__name__)

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SD1_TEXT, SD2_TEXT = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
SDXL_TEXT = ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model.")
# int64 position ids stored by SD1 and SDXL files (often corrupt there): never read, always arange
POSITION_IDS = (SD1_TEXT + "embeddings.position_ids", SDXL_TEXT[0] + "embeddings.position_ids")
METADATA_KEY = "ldm_sce.config"  # safetensors metadata entry holding a ModelConfig as JSON


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the fix."""


# ---------------------------------------------------------------------------------------------------------
# Safe unpickling of torch zip checkpoints
# ---------------------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def _storage(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """A storage read from the archive as a flat tensor (typed by the pickle's storage class)."""
    return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_unused) -> torch.Tensor:
    size, stride = tuple(size), tuple(stride)
    ints = all(type(v) is int for v in (offset, *size, *stride))
    if not (isinstance(storage, torch.Tensor) and ints and len(size) == len(stride)):
        raise CheckpointError("corrupt checkpoint: a tensor record is malformed")
    if offset < 0 or any(v < 0 for v in (*size, *stride)):
        raise CheckpointError("corrupt checkpoint: a tensor has a negative size, stride or offset")
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True)) if all(size) else -1
    if last >= storage.numel() or math.prod(size) > max(storage.numel(), 1):  # no view larger than its storage
        raise CheckpointError(
            f"corrupt checkpoint: a tensor {list(size)} (strides {list(stride)}) does not fit its storage of "
            f"{storage.numel()} values"
        )
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: torch.Tensor, *_unused) -> torch.Tensor:
    return data  # a Parameter in a checkpoint is just its tensor here


class _LightningPlaceholder:
    """Stands in for any pytorch_lightning / lightning object: accepts its state, does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def _placeholder(module: str, name: str) -> type:
    return type(name, (_LightningPlaceholder,), {"__module__": module})


_NUMPY_OK = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


class _SafeUnpickler(pickle.Unpickler):
    """Allow-list unpickler: tensors, plain containers, numpy scalars; Lightning objects become inert."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}  # tensors sharing a storage share it here too

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64"):
            return getattr(torch, name)
        if (module, name) in {("collections", "OrderedDict"), ("builtins", "set"), ("__builtin__", "set")}:
            return OrderedDict if name == "OrderedDict" else set
        if (module, name) in {("_codecs", "encode")}:
            import codecs

            return codecs.encode
        if (module, name) in _NUMPY_OK:
            import numpy

            return numpy.dtype if name == "dtype" else numpy._core.multiarray.scalar
        if module.split(".")[0] in ("pytorch_lightning", "lightning", "lightning_fabric"):
            return _placeholder(module, name)
        raise CheckpointError(
            f"refusing to load: the checkpoint's pickle asks for {module}.{name}, which is not a tensor or "
            "plain data and could run code. Convert the file to .safetensors with a tool you trust, or "
            "obtain it from a trusted source."
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel): the bytes live in <prefix>/data/<key>
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"corrupt checkpoint: unsupported persistent id in pickle: {pid!r:.100}")
        _, dtype, key, _location, _numel = pid
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise CheckpointError(f"corrupt checkpoint: unsupported storage record in pickle: {pid!r:.100}")
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}/data/{key}")
            if len(data) % dtype.itemsize:
                raise CheckpointError(f"corrupt checkpoint: storage {key} is not a whole number of {dtype} values")
            self.storages[key] = _storage(data, dtype)
        return self.storages[key]


def _read_pickle_checkpoint(path: Path):
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl:
                raise CheckpointError(f"{path}: a zip file but not a torch checkpoint (no data.pkl)")
            prefix = pkl[0].rpartition("/")[0]
            return _SafeUnpickler(io.BytesIO(archive.read(pkl[0])), archive, prefix).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({e}); the file is truncated or corrupt (re-download "
            "it and compare its size/hash)"
        ) from e
    except Exception as e:  # anything else the pickle or the archive throws: the file is damaged
        raise CheckpointError(
            f"{path}: the checkpoint is truncated or corrupt ({type(e).__name__}: {str(e)[:200]}); re-download it"
        ) from e


def _sniff(path: Path) -> str | None:
    """'safetensors', 'zip' (torch >= 1.6 files) or 'legacy' (older torch pickles) from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size:
        return "safetensors"
    if head[:1] == b"\x80":
        return "legacy"
    return None


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(flat state dict, extras) from a `.safetensors`, `.ckpt`/`.pt`/`.pth` or `.bin` file, never executing
    pickled code; the format is read from the file's first bytes, not its name. Wrapped (`{"state_dict":
    ...}`), unwrapped and doubly wrapped layouts are all accepted. extras holds safetensors metadata or the
    pickle's non-tensor entries (e.g. `global_step`). Any damaged file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = _sniff(path)
    if kind == "safetensors" or (kind is None and path.suffix == ".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own SafetensorError types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt") from e
    if kind == "legacy":
        raise CheckpointError(
            f"{path}: a legacy (before torch 1.6) pickle file, which is not read; re-save it with a current "
            "torch.save, or convert it to .safetensors"
        )
    if kind is None:
        raise CheckpointError(
            f"{path}: not a checkpoint (neither safetensors nor a torch zip file); it is truncated, corrupt, or "
            "another kind of file"
        )
    obj = _read_pickle_checkpoint(path)
    extras: dict = {}
    for _ in range(4):  # {"state_dict": ...}, doubly wrapped at most; a pickle may nest a dict in itself
        if not (isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict)):
            break
        extras.update({k: v for k, v in obj.items() if k != "state_dict"})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: not a state dict (its keys are not all names)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    extras.update({k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)})
    return tensors, extras


# ---------------------------------------------------------------------------------------------------------
# Family detection
# ---------------------------------------------------------------------------------------------------------


def detect_family(sd: dict[str, torch.Tensor]) -> str:
    """'sd1', 'sd2' or 'sdxl' from key names and shapes; a clear error for anything else."""
    if any(k.startswith("conditioner.embedders.") for k in sd) or UNET + "label_emb.0.0.weight" in sd:
        if not any(k.startswith(SDXL_TEXT[1]) for k in sd) and any(
            k.startswith("conditioner.embedders.0.model.") for k in sd
        ):
            raise CheckpointError("this is an SDXL refiner (one OpenCLIP-G tower), which is not supported")
        return "sdxl"
    has_sd1_text = any(k.startswith(SD1_TEXT) for k in sd)
    has_sd2_text = any(k.startswith(SD2_TEXT) for k in sd)
    proj_in = sd.get(UNET + "input_blocks.1.1.proj_in.weight")
    if has_sd2_text or (proj_in is not None and proj_in.ndim == 2):
        return "sd2"
    if has_sd1_text or (proj_in is not None and proj_in.ndim == 4):
        return "sd1"
    raise CheckpointError("cannot tell the model family from the keys; pass a config (e.g. --config sd-v1)")


KIND_NAMES = {
    "checkpoint": "a Stable Diffusion checkpoint (pass it with --ckpt)",
    "sc": "an SC-Tuner file (pass it with --tuner)",
    "csc": "a CSC-Tuner controller (pass it with --control, with a --control-image)",
    "lora": "a LoRA file (pass it with --lora PATH[:WEIGHT])",
    "unknown": "neither a Stable Diffusion checkpoint nor a tuner or LoRA file",
}
_SC_KEYS = ("lsc_identity.", "tuners.")
_CSC_KEYS = ("pre_hint_blocks.", "dense_hint_blocks.", "lsc_tuner_blocks.")


def file_kind(sd: dict[str, torch.Tensor], extras: dict) -> str:
    """What a file holds, from its metadata and key names: a key of KIND_NAMES."""
    meta = extras.get("ldm_sce.tuner")
    if isinstance(meta, str):
        return "csc" if '"kind": "csc"' in meta else "sc"
    if any(k.startswith(UNET) for k in sd):
        return "checkpoint"
    if "ldm_sce.lora" in extras or any("lora" in k.lower() for k in sd):
        return "lora"
    if sd and any(part in k for k in sd for part in _CSC_KEYS):
        return "csc"
    if sd and any(k.removeprefix("model.").startswith(_SC_KEYS) for k in sd):
        return "sc"
    return "unknown"


# ---------------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------------


def _ema_key(key: str) -> str:
    """CompVis LitEma naming: model.diffusion_model.a.b -> model_ema.diffusion_modelab."""
    return "model_ema." + key[len("model.") :].replace(".", "")


def _is_tolerated_extra(key: str) -> bool:
    # sgm-written SDXL files may hold its denoiser's sigmas (recomputed from the config like the schedule)
    return key.startswith("model_ema.") or key in (
        "logvar",
        "model_ema.decay",
        "model_ema.num_updates",
        "denoiser.sigmas",
    )


def _check_keys(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], family: str, path) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not _is_tolerated_extra(k)]
    wrong_shape = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in sd and sd[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    parts = [f"{path}: checkpoint does not match the {family} model config."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            parts.append(f"{len(items)} {title} key(s): {items[:10]}{more}")
    if unexpected and any("lora" in k or "lsc_identity" in k or "hint_blocks" in k for k in unexpected):
        parts.append("Likely cause: a LoRA/tuner file merged into or passed as --ckpt; pass tuners with --tuner.")
    elif wrong_shape:
        parts.append(
            "Likely cause: the config describes another model size or family; drop --config to "
            "auto-detect, or pass the config the checkpoint was made with."
        )
    elif missing and not unexpected:
        parts.append("Likely cause: a truncated or partial file (e.g. UNet-only); use the full checkpoint.")
    else:
        parts.append("Likely cause: the config is for another family (sd1 vs sd2); drop --config to auto-detect.")
    raise CheckpointError("\n".join(parts))


def _resolve_config(path: Path, sd, extras, config) -> tuple[ModelConfig, bool]:
    """(config, detected): detected is True when the config is only the family preset guessed from keys."""
    if config is not None:
        return load_config(config), False
    sidecar = path.with_suffix(".yaml")
    if sidecar.is_file():  # as A1111: a YAML next to the checkpoint, same stem
        return load_config(sidecar), False
    if METADATA_KEY in extras:
        return load_config(json.loads(extras[METADATA_KEY])), False
    return PRESETS[{"sd1": "sd-v1", "sd2": "sd-v2-base", "sdxl": "sdxl-base"}[detect_family(sd)]], True


def _check_stored_schedule(sd: dict[str, torch.Tensor], schedule: dict[str, torch.Tensor], path: Path) -> None:
    """Warn when a file stores a noise schedule other than its config's (beyond its dtype's rounding)."""
    stored = sd.get("alphas_cumprod")
    if stored is None or not stored.is_floating_point() or stored.shape != schedule["alphas_cumprod"].shape:
        return
    tol = 4 * torch.finfo(stored.dtype).eps
    diff = (stored.float() - schedule["alphas_cumprod"]).abs().max().item()
    if not diff <= tol:
        log.warning(
            "%s stores a noise schedule that differs from its config's (max |alphas_cumprod difference| %.3g); "
            "using the config's (linear_start, linear_end, timesteps): pass the config the file was trained "
            "with if it is another",
            path,
            diff,
        )


def check_finite(sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """Refuse weights holding NaN or inf."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(
            f"{path}: {len(bad)} tensor(s) hold NaN or inf values, e.g. {bad[:3]}: the file is corrupt (or was "
            "saved from a diverged training run); use another copy of the weights"
        )


@torch.no_grad()
def _guess_v_prediction(model: LatentDiffusion) -> bool:
    """SD2 files do not record eps vs v. Rule (as AUTOMATIC1111): run the UNet on x = 1, t = 999,
    context = 0.5; a v-model's output is far below the input (mean(out - x) < -1)."""
    unet = model.model.diffusion_model
    p = next(unet.parameters())
    x = torch.ones(1, unet.cfg.in_channels, 8, 8, dtype=p.dtype, device=p.device)
    ctx = torch.full((1, 77, unet.cfg.context_dim), 0.5, dtype=p.dtype, device=p.device)
    out = unet(x, torch.tensor([999], device=p.device), ctx)
    return (out.float() - x.float()).mean().item() < -1.0


def load_model(
    path: str | Path,
    config: str | Path | ModelConfig | None = None,
    parameterization: str | None = None,
    use_ema: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> LatentDiffusion:
    """Load an original SD checkpoint (`.ckpt` or `.safetensors`) into a `LatentDiffusion`, strictly.

    The config comes from, in order: `config` (a preset name such as 'sd-v2-v', our YAML, or an original
    CompVis/Stability inference YAML), a `<checkpoint>.yaml` next to the file, the file's `ldm_sce.config`
    metadata, or the family detected from the keys. `parameterization` ('eps'/'v') overrides the config;
    for an SD2 file with no config it is guessed by a test forward (see `_guess_v_prediction`).
    Model keys must match exactly; the only extras allowed are the schedule buffers, `model_ema.*`,
    `logvar`, the text `position_ids` and non-tensor training metadata. The noise schedule is always computed
    from the config in float64 (and kept float32), whatever the file stores; weights holding NaN or inf are
    refused.
    """
    path = Path(path)
    sd, extras = read_checkpoint(path)
    kind = file_kind(sd, extras)
    if kind != "checkpoint":
        raise CheckpointError(f"{path}: this is {KIND_NAMES[kind]}, not a model checkpoint. First keys: {list(sd)[:4]}")
    cfg, detected = _resolve_config(path, sd, extras, config)
    guess_v = detected and parameterization is None and cfg.family == "sd2"
    if parameterization is not None:
        cfg = cfg.replace(parameterization=parameterization)

    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    expected = model.state_dict()
    # The schedule is always computed from the config (float64, kept float32): a file's stored tables may be
    # missing, or stored in fp16/bf16, where alphas_cumprod rounds to 1 near t = 0 and sampling breaks.
    schedule = make_schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps)
    _check_stored_schedule(sd, schedule, path)
    for name in SCHEDULE_BUFFERS:  # SD1/SD2 files carry the tables (keys of the model); SDXL files do not
        sd.pop(name, None)
        if name in expected:
            sd[name] = schedule[name]
    for key in POSITION_IDS:
        if key in expected:
            sd[key] = torch.arange(cfg.text.context_length)[None]

    if use_ema:
        ema = {k: sd[_ema_key(k)] for k in expected if k.startswith(UNET) and _ema_key(k) in sd}
        n_unet = sum(k.startswith(UNET) for k in expected)
        if len(ema) == n_unet:
            sd.update(ema)
        elif ema:
            raise CheckpointError(f"{path}: EMA weights are incomplete ({len(ema)} of {n_unet} UNet tensors)")
        else:
            log.warning("%s has no EMA weights (model_ema.*); using its regular weights", path)

    _check_keys(sd, expected, cfg.family, path)
    check_finite({k: sd[k] for k in expected}, path)
    target = dtype or torch.float32
    state = {
        k: sd[k].to(torch.float32 if k in SCHEDULE_BUFFERS else target) if sd[k].is_floating_point() else sd[k]
        for k in expected
    }
    model.load_state_dict(state, strict=True, assign=True)
    for name in SCHEDULE_BUFFERS:
        if name not in state:  # not saved (SDXL): still on the meta device
            model.register_buffer(name, schedule[name], persistent=False)
    model.model.diffusion_model.to(memory_format=torch.channels_last)  # see UNetModel
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    if guess_v:  # the detected preset is sd-v2-base; a v-model is SD2's 768px one (sd-v2-v)
        model.parameterization = "v" if _guess_v_prediction(model) else "eps"
        model.cfg = PRESETS["sd-v2-v"] if model.parameterization == "v" else cfg
        log.info("%s: SD2 file without config; guessed parameterization %r", path, model.parameterization)
    return model


def save_checkpoint(
    model: LatentDiffusion, path: str | Path, metadata: bool = True, dtype: torch.dtype | None = None
) -> None:
    """Write `model` in the original key layout (`.safetensors`, or a `{"state_dict": ...}` `.ckpt`),
    atomically (a temporary file, then rename). `.safetensors` files carry the config as metadata.
    `dtype` (e.g. torch.float16, as the released `-fp16` files) casts the weights; the schedule buffers
    stay fp32."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() and k not in SCHEDULE_BUFFERS else v for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={METADATA_KEY: model.cfg.to_json()} if metadata else None)
    else:
        torch.save({"state_dict": sd}, tmp)
    tmp.replace(path)


__all__ = ["CheckpointError", "ConfigError", "detect_family", "load_model", "read_checkpoint", "save_checkpoint"]
