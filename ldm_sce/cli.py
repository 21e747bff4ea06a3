"""Shared pieces of the command-line tools (`tools/txt2img.py`, `tools/img2img.py`): arguments with the
CompVis names, model loading with one-line errors, prompt batches, and PNG output with A1111-style metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from PIL import Image

from .checkpoint_io import CheckpointError, load_model
from .conditions import CONDITIONS, condition_tensor, make_condition
from .config import ConfigError
from .diffusion import LatentDiffusion
from .images import ImageError, NonFiniteError, free_path, load_image, save_png
from .lora import load_lora, parse_lora_arg
from .sampling import SAMPLER_NAMES, SCHEDULES, SPACINGS, display_name, resolve_sampler
from .tuner_files import load_tuner, load_tuners
from .tuners import COMPOSE_MODES, Control, Tuning
from .unet import COMPILE_MODES, compile_unet

# The embedded default: the toy shapes model this project trains itself (docs/RESULTS.md), 64x64 images.
DEFAULT_CKPT = Path(__file__).resolve().parents[1] / "weights" / "toy-shapes.safetensors"


class UsageError(Exception):
    """A bad argument or input file: printed as one line, exit status 2."""


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    p.add_argument("--negative-prompt", type=str, default="", help="the unconditional prompt of CFG")
    p.add_argument(
        "--prompt-syntax",
        choices=("a1111", "plain"),
        default="a1111",
        help="a1111: (word:1.3), [word], BREAK and prompts of any length in 75-token chunks; plain: the text "
        "as it is, cut at 75 tokens (CompVis's scripts)",
    )
    p.add_argument("--clip-skip", type=int, help="the text encoder's N-th layer from the end (A1111's meaning)")
    p.add_argument(
        "--embedding", action="append", default=[], help="textual-inversion embedding (.pt/.safetensors); repeatable"
    )
    p.add_argument("--from-file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps (any sampler)")
    p.add_argument(
        "--sampler",
        default="ddim",
        help=f"{', '.join(SAMPLER_NAMES)}, or AUTOMATIC1111's names ('DPM++ 2M Karras', 'Euler a', ...)",
    )
    p.add_argument("--schedule", choices=SCHEDULES, help="sigma schedule (default: Karras for DPM++, else uniform)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale phi (Lin et al. 2024), 0..1")
    p.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="sample on the schedule rescaled to zero terminal SNR (Lin et al. 2024) that a v model was trained "
        "with (training's zero_terminal_snr): ddim, trailing timesteps by default",
    )
    p.add_argument("--plms", action="store_true", help="same as --sampler plms")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n_iter", type=int, default=1, help="sample this often")
    p.add_argument("--n_samples", type=int, default=1, help="batch size")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=42, help="image i uses seed + i")
    p.add_argument(
        "--ckpt",
        type=str,
        help="checkpoint (.ckpt or .safetensors); default: the embedded toy model weights/toy-shapes.safetensors",
    )
    p.add_argument("--config", type=str, help="preset name or YAML (ours or the original inference YAML)")
    p.add_argument("--parameterization", choices=("eps", "v"), help="override eps/v (SD2 files do not say)")
    p.add_argument("--precision", choices=("full", "autocast"), default="autocast")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="also write each image's parameters as a .json sidecar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--spacing", choices=SPACINGS, help="timesteps: compvis (SD1/SD2's default) or trailing (sgm's, SDXL's)"
    )
    p.add_argument(
        "--offload",
        action="store_true",
        help="keep the text encoders and the VAE on the CPU, each moved to the device only while it runs",
    )
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="none",
        help="torch.compile the UNet: blocks (regional: its ResBlocks and transformer blocks) or full",
    )
    p.add_argument(
        "--vae-precision",
        choices=("auto", "full", "autocast"),
        default="auto",
        help="auto: the VAE in fp32 when the rest runs in fp16 on an SDXL model (its VAE overflows in fp16)",
    )
    g = p.add_argument_group("SDXL micro-conditioning (default: as diffusers' pipeline)")
    g.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), help="default: the image size")
    g.add_argument("--crop-coords", type=int, nargs=2, metavar=("TOP", "LEFT"), help="default: 0 0")
    g.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), help="default: the image size")


def add_tuner_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SCEdit tuners and controllers")
    g.add_argument(
        "--tuner",
        action="append",
        default=[],
        help="SC-Tuner file (ours, or an official swift/scepter file or folder); repeatable",
    )
    g.add_argument(
        "--tuner-scale",
        action="append",
        default=[],
        type=float,
        help="skip + s * (T(skip) - skip); one per --tuner, in order (default 1)",
    )
    g.add_argument(
        "--tuner-compose",
        choices=COMPOSE_MODES,
        default="sum",
        help="several tuners: 'sum' of their edits (order-free) or 'sequential' (scepter Studio's: each on the "
        "previous one's output)",
    )
    g.add_argument(
        "--skip-scales", type=str, help="research: one tuner scale per skip, decoder order, e.g. 1,1,0.5,..."
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="LoRA file for the base model (kohya/A1111, diffusers/peft); repeatable",
    )
    g.add_argument("--lora-merge", action="store_true", help="merge the LoRAs into the weights (faster sampling)")
    g.add_argument(
        "--freeu",
        metavar="PRESET|B1,B2,S1,S2",
        help="FreeU (Si et al. 2024): sd1, sd2, sdxl (the official values) or four numbers; works with tuners",
    )
    g.add_argument(
        "--freeu-rule", choices=("official", "diffusers"), default="official", help="which blocks FreeU edits"
    )
    g.add_argument("--freeu-v2", action="store_true", help="FreeU v2's structure-related backbone scaling")
    g.add_argument("--control", action="append", default=[], help="CSC-Tuner controller file; repeatable")
    g.add_argument("--control-image", action="append", default=[], help="one image per --control, in order")
    g.add_argument(
        "--control-type",
        action="append",
        default=[],
        choices=CONDITIONS,
        help="how to make the condition from the image (default: the controller's own)",
    )
    g.add_argument("--control-weight", action="append", default=[], type=float, help="w_i per --control (1.0)")
    g.add_argument("--control-mask", type=str, help="inpainting mask (white = masked); random if absent")
    g.add_argument("--control-scale", type=float, default=1.0, help="global control scale (paper eq. 7)")
    g.add_argument("--control-start", type=float, default=0.0, help="fraction of sampling where control starts")
    g.add_argument("--control-end", type=float, default=1.0, help="fraction of sampling where control ends")


def _per_control(values: list, n: int, name: str, default, per: str = "--control"):
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{name} is given {len(values)} times for {n} {per} files")
    return list(values)


def attach_tuners(model: LatentDiffusion, args: argparse.Namespace, width: int, height: int, outdir: Path) -> Tuning:
    """Attach --tuner and --control files to the model; returns the `Tuning` of the run (tuner scale, the
    control with its hints computed once, its range). Conditions are made at `model.cfg.condition_size`
    (the image size for SD) and saved next to the outputs as control-<i>-<type>.png (never over a file)."""
    height, width = model.cfg.condition_size(height, width)
    for value in args.lora:
        path, weight = parse_lora_arg(value)
        load_lora(model, path, weight, merge=args.lora_merge)
    tuner_scale = 1.0
    if len(args.tuner) == 1 and len(args.tuner_scale) <= 1:  # one tuner: its scale is the run's tuner scale
        tuner_scale = args.tuner_scale[0] if args.tuner_scale else 1.0
        load_tuner(model, args.tuner[0], kind="sc", text_weight=tuner_scale)
    elif args.tuner:
        scales = _per_control(args.tuner_scale, len(args.tuner), "--tuner-scale", 1.0, "--tuner")
        load_tuners(model, list(zip(args.tuner, scales, strict=True)), args.tuner_compose)
    elif args.tuner_scale:
        raise UsageError("--tuner-scale without --tuner")
    if args.skip_scales:
        tuner_scale = tuple(tuner_scale * s for s in _skip_scales(args.skip_scales, model))
    if args.freeu:
        from .skip_edits import FREEU_PRESETS, FreeU

        if args.freeu in FREEU_PRESETS:
            values = FREEU_PRESETS[args.freeu]
        else:
            try:
                values = tuple(float(v) for v in args.freeu.split(","))
            except ValueError:
                values = ()
            if len(values) != 4 or not all(math.isfinite(v) for v in values):
                raise UsageError(f"--freeu {args.freeu!r}: a preset ({', '.join(FREEU_PRESETS)}) or B1,B2,S1,S2")
        unet = model.model.diffusion_model
        unet.skip_edits.append(FreeU(unet.cfg, *values, rule=args.freeu_rule, v2=args.freeu_v2))
    n = len(args.control)
    if len(args.control_image) != n:
        raise UsageError(f"{n} --control file(s) but {len(args.control_image)} --control-image(s): give one each")
    types = _per_control(args.control_type, n, "--control-type", None)
    weights = _per_control(args.control_weight, n, "--control-weight", None)
    mask = load_image(args.control_mask) if args.control_mask else None
    hints = []
    p = next(model.parameters())
    for i, (path, image) in enumerate(zip(args.control, args.control_image, strict=True)):
        ctrl = load_tuner(model, path, kind="csc")
        if weights[i] is None:  # the controller's own default (a released controller's SCALE), else 1
            weights[i] = ctrl.default_weight
        kind = types[i] or ctrl.condition
        if kind is None:
            raise UsageError(f"{path} does not say which condition it takes: pass --control-type")
        cond = make_condition(kind, load_image(image), width, height, mask=mask, seed=args.seed)
        save_png(Image.fromarray(cond), free_path(outdir / f"control-{i}-{kind}.png"))
        with torch.no_grad():
            hints.append(ctrl.hints(condition_tensor(cond).to(p.device, p.dtype)))
    control = Control(hints, weights, args.control_scale) if n else None
    args.control_weight = weights  # as used, for the PNG parameters
    return Tuning(tuner_scale, control, (args.control_start, args.control_end))


def _skip_scales(text: str, model: LatentDiffusion) -> list[float]:
    n = len(model.cfg.unet.skip_channels)
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--skip-scales {text!r}: not a comma-separated list of numbers") from None
    if len(values) != n or not all(math.isfinite(v) and abs(v) <= 10 for v in values):
        raise UsageError(f"--skip-scales: this model has {n} skips; give {n} numbers in [-10, 10], got {text!r}")
    return values


# Allowed values of the numeric arguments (inclusive): flag -> (low, high)
RANGES = {
    "--ddim_steps": (1, 1000),
    "--n_iter": (1, 10_000),
    "--n_samples": (1, 256),
    "--seed": (0, 2**32 - 1),
    "--H": (1, 16384),
    "--W": (1, 16384),
    "--scale": (0.0, 100.0),
    "--ddim_eta": (0.0, 1.0),
    "--tuner-scale": (-10.0, 10.0),
    "--clip-skip": (1, 48),
    "--guidance-rescale": (0.0, 1.0),
    "--control-scale": (0.0, 10.0),
    "--control-weight": (-10.0, 10.0),
    "--control-start": (0.0, 1.0),
    "--control-end": (0.0, 1.0),
    "--strength": (0.0, 1.0),
    "--original-size": (1, 16384),
    "--crop-coords": (0, 16384),
    "--target-size": (1, 16384),
}


def check_args(args: argparse.Namespace) -> None:
    """Every argument checked before a model is loaded: numbers in range, files present, device and output
    folder usable. UsageError names the argument and what it accepts."""
    if args.plms:
        args.sampler = "plms"
    try:
        args.sampler, named = resolve_sampler(args.sampler)
    except ValueError as e:
        raise UsageError(f"--sampler: {e}") from None
    args.schedule = args.schedule or named
    if args.schedule is not None and args.schedule not in SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {args.schedule!r}")
    for flag, (lo, hi) in RANGES.items():
        values = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        for value in values if isinstance(values, list) else [values]:
            if value is not None and not (math.isfinite(value) and lo <= value <= hi):
                allowed = f"an integer in {lo}..{hi}" if isinstance(lo, int) else f"a number in [{lo:g}, {hi:g}]"
                raise UsageError(f"{flag} must be {allowed}, got {value}")
    if args.control_start > args.control_end:
        raise UsageError(f"--control-start {args.control_start} is after --control-end {args.control_end}")
    if args.sampler == "plms" and args.ddim_eta != 0:
        raise UsageError("--ddim_eta must be 0 with PLMS")
    if args.zero_terminal_snr and args.sampler != "ddim":
        raise UsageError(f"--zero-terminal-snr samples with ddim only, got --sampler {args.sampler}")
    if args.ckpt is None:
        if not DEFAULT_CKPT.is_file():
            raise UsageError(
                f"no --ckpt given and the embedded model {DEFAULT_CKPT} is missing: pass a Stable "
                "Diffusion checkpoint (.ckpt or .safetensors), or restore weights/ from git"
            )
        args.ckpt = str(DEFAULT_CKPT)
    paths = [("--ckpt", args.ckpt)] + [("--tuner", t) for t in args.tuner] + [("--control", c) for c in args.control]
    paths += [("--embedding", e) for e in args.embedding]
    paths += [("--lora", parse_lora_arg(v)[0]) for v in args.lora]
    for flag, path in paths:
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag} {path}: not found" if flag != "--ckpt" else f"checkpoint not found: {path}")
    check_device(args.device)
    outdir = Path(args.outdir)
    try:
        (outdir / "samples").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--outdir {outdir}: cannot create it ({e.strerror or e})") from None
    if not os.access(outdir, os.W_OK):
        raise UsageError(f"--outdir {outdir}: not writable")


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: only cpu, cuda and mps are supported")


def load(args: argparse.Namespace) -> LatentDiffusion:
    """The checkpoint on --device (with --offload only the UNet; the rest waits on the CPU), compiled if asked."""
    model = load_model(
        args.ckpt,
        config=args.config,
        parameterization=args.parameterization,
        device=None if args.offload else args.device,
    )
    if args.offload:
        model.model.to(args.device)
    if args.zero_terminal_snr:
        try:
            model.set_zero_terminal_snr()
        except ValueError as e:
            raise UsageError(f"--zero-terminal-snr: {e} (--parameterization v for a v model)") from None
    compile_unet(model.model.diffusion_model, args.compile)
    return model


@contextmanager
def on_device(module: torch.nn.Module, args: argparse.Namespace):
    """With --offload: `module` on --device while the block runs, then back on the CPU."""
    if not args.offload:
        yield module
        return
    module.to(args.device)
    try:
        yield module
    finally:
        module.to("cpu")


def _to_device(c, device):
    if c is None:
        return None
    return {k: v.to(device) for k, v in c.items()} if isinstance(c, dict) else c.to(device)


def conditioning(model: LatentDiffusion, args: argparse.Namespace, prompts: list[str], height: int, width: int):
    """(c, uc) for a batch of prompts: the context, or for SDXL the dict with the micro-conditioning of the
    --original-size / --crop-coords / --target-size flags (default: diffusers' (H, W), (0, 0), (H, W)).
    uc: the negative prompt's (SDXL with none: sgm's zeros), None without guidance."""
    text = model.conditioner if model.cfg.family == "sdxl" else model.cond_stage_model
    with on_device(text, args):
        c, uc = _conditioning(model, args, prompts, height, width)
    return _to_device(c, args.device), _to_device(uc, args.device)


def _conditioning(model: LatentDiffusion, args: argparse.Namespace, prompts: list[str], height: int, width: int):
    sizes = {"original_size": args.original_size, "crop_coords": args.crop_coords, "target_size": args.target_size}
    if model.cfg.family != "sdxl":
        given = [f"--{k.replace('_', '-')}" for k, v in sizes.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only SDXL models take the micro-conditioning")
    else:
        defaults = {"original_size": (height, width), "crop_coords": (0, 0), "target_size": (height, width)}
        sizes = {k: tuple(v or defaults[k]) for k, v in sizes.items()}
    if args.prompt_syntax == "a1111":
        from .prompts import encode_prompts

        negative = [args.negative_prompt] * len(prompts) if args.negative_prompt else None
        try:
            c, uc = encode_prompts(model, prompts, negative, args.clip_skip, _embeddings(args), sizes)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return c, (None if args.scale == 1.0 else uc)
    if args.clip_skip or args.embedding:
        raise UsageError("--clip-skip and --embedding need --prompt-syntax a1111")
    if model.cfg.family != "sdxl":
        c = model.get_learned_conditioning(prompts)
    else:
        c = model.get_learned_conditioning(prompts, **sizes)
    if args.scale == 1.0:
        return c, None
    return c, model.get_unconditional_conditioning(
        c, [args.negative_prompt] * len(prompts) if args.negative_prompt else None
    )


def _embeddings(args: argparse.Namespace) -> list:
    """The --embedding files, read once per run."""
    from .prompts import load_embedding

    if getattr(args, "_embeddings", None) is None:
        args._embeddings = [load_embedding(path) for path in args.embedding]
    return args._embeddings


def vae_context(model: LatentDiffusion, args: argparse.Namespace):
    """Where the VAE runs: in fp32 (autocast off) where --vae-precision asks or, by default, for an SDXL
    model when the rest runs in fp16 (its VAE overflows there: diffusers' force_upcast, kohya's
    --no_half_vae); otherwise under the run's precision."""
    fp16 = args.precision == "autocast" and torch.device(args.device).type == "cuda"
    full = args.vae_precision == "full" or (args.vae_precision == "auto" and model.cfg.family == "sdxl" and fp16)
    return torch.autocast(torch.device(args.device).type, enabled=False) if full else nullcontext()


def decode(model: LatentDiffusion, z: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    with on_device(model.first_stage_model, args) as vae, vae_context(model, args):
        return model.decode_first_stage(z.to(next(vae.parameters()).dtype))


def spacing(model: LatentDiffusion, args: argparse.Namespace) -> str:
    return args.spacing or ("trailing" if model.cfg.family == "sdxl" or model.zero_snr else "compvis")


def check_size(model: LatentDiffusion, h: int, w: int) -> None:
    multiple = model.cfg.image_multiple
    if h % multiple or w % multiple or h <= 0 or w <= 0:
        raise UsageError(f"--H {h} --W {w}: both must be positive multiples of {multiple} for this model")


def read_prompts(args: argparse.Namespace) -> list[str]:
    if not args.from_file:
        return [args.prompt]
    try:
        prompts = [line.strip() for line in Path(args.from_file).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts from {args.from_file}: {e}") from e
    prompts = [p for p in prompts if p]
    if not prompts:
        raise UsageError(f"{args.from_file} has no prompts (one per line)")
    return prompts


def batches(prompts: list[str], n_samples: int, n_iter: int) -> Iterator[list[str]]:
    """CompVis order: a single prompt is repeated n_samples times per batch; a file is cut into batches of
    n_samples. Everything is repeated n_iter times."""
    data = (
        [prompts * n_samples]
        if len(prompts) == 1
        else [prompts[i : i + n_samples] for i in range(0, len(prompts), n_samples)]
    )
    for _ in range(n_iter):
        yield from data


def precision_context(args: argparse.Namespace):
    if args.precision != "autocast":
        return nullcontext()
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)


def extra_params(args: argparse.Namespace, model: LatentDiffusion | None = None) -> dict:
    """Generation parameters beyond the basic ones, for the PNG metadata."""
    extra = {"Eta": args.ddim_eta} if args.sampler == "ddim" else {}
    if model is not None:
        extra["Schedule"] = spacing(model, args)
    if args.guidance_rescale:
        extra["CFG rescale"] = args.guidance_rescale
    if args.zero_terminal_snr:
        extra["Zero terminal SNR"] = True
    if model is not None and model.cfg.family == "sdxl":
        extra.update({"Original size": args.original_size, "Crop": args.crop_coords, "Target size": args.target_size})
        extra = {k: ("-".join(map(str, v)) if isinstance(v, list) else v) for k, v in extra.items() if v is not None}
    if args.clip_skip:
        extra["Clip skip"] = args.clip_skip
    if args.embedding:
        extra["Embeddings"] = [Path(e).stem for e in args.embedding]
    if args.prompt_syntax != "a1111":
        extra["Prompt syntax"] = args.prompt_syntax
    if args.lora:
        extra["LoRA"] = [f"{Path(p).stem}:{w:g}" for p, w in map(parse_lora_arg, args.lora)]
    if args.tuner:
        scales = args.tuner_scale or [1.0]
        if len(args.tuner) == 1:
            extra.update({"SC-Tuner": Path(args.tuner[0]).stem, "Tuner scale": scales[0]})
        else:
            extra.update({"SC-Tuners": [Path(t).stem for t in args.tuner], "Tuner scales": scales})
            extra["Tuner compose"] = args.tuner_compose
    if args.skip_scales:
        extra["Skip scales"] = args.skip_scales
    if args.freeu:
        extra["FreeU"] = f"{args.freeu} ({args.freeu_rule}{', v2' if args.freeu_v2 else ''})"
    if args.control:
        extra.update(
            {
                "Controls": [Path(path).stem for path in args.control],
                "Control types": args.control_type or "default",
                "Control weights": args.control_weight or [1.0],
                "Control scale": args.control_scale,
                "Control range": f"{args.control_start}-{args.control_end}",
            }
        )
    return extra


def a1111_parameters(p: dict) -> str:
    """The `parameters` text chunk as AUTOMATIC1111 writes it (read by most image viewers and UIs)."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = {
        "Steps": p["steps"],
        "Sampler": display_name(p["sampler"], p.get("schedule")),
        "CFG scale": p["scale"],
        "Seed": p["seed"],
        "Size": f"{p['width']}x{p['height']}",
        "Model": p["model"],
    }
    fields.update(p.get("extra", {}))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """The `parameters` text of a PNG (AUTOMATIC1111's layout, which this project writes too) as a mapping:
    'Prompt', 'Negative prompt', and the fields of the last line ('Steps', 'Sampler', 'Seed', ...)."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:  # A1111's rule: a line of at least three fields
        for key, value in _FIELD.findall(lines.pop()):
            fields[key.strip()] = value[1:-1] if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def _known(names):
    def conv(value: str) -> str:
        if value.lower() not in names:
            raise ValueError(value)
        return value.lower()

    return conv


def png_defaults(path: str) -> tuple[dict, list[str]]:
    """(argument defaults, fields left out) from a PNG's generation parameters, for --from-png."""
    try:
        with Image.open(path) as img:
            text = img.info.get("parameters")
    except (OSError, ValueError) as e:
        raise UsageError(f"--from-png {path}: cannot read the image ({e})") from None
    if not text:
        raise UsageError(f"--from-png {path}: the image holds no generation parameters (no 'parameters' text)")
    p = parse_a1111_parameters(text)
    out: dict = {"prompt": p.pop("Prompt"), "negative_prompt": p.pop("Negative prompt")}
    conv = {
        "Steps": ("ddim_steps", int),
        "Sampler": ("sampler", str),
        "Schedule type": ("schedule", _known(SCHEDULES)),
        "Schedule": ("spacing", _known(SPACINGS)),
        "CFG scale": ("scale", float),
        "Seed": ("seed", int),
        "Clip skip": ("clip_skip", int),
        "Eta": ("ddim_eta", float),
        "CFG rescale": ("guidance_rescale", float),
    }
    left = []
    for key, value in p.items():
        try:
            if key == "Size":
                out["W"], out["H"] = (int(v) for v in value.split("x"))
            elif key in conv:
                out[conv[key][0]] = conv[key][1](value)
            else:
                left.append(f"{key}: {value}")
        except ValueError:
            left.append(f"{key}: {value}")
    return out, left


def save_sample(img: Image.Image, path: Path, params: dict, sidecar: bool) -> None:
    """Write a PNG with its parameters in the `parameters` text chunk (atomic, never over an existing file),
    and with `sidecar` the same parameters as JSON next to it."""
    save_png(img, path, {"parameters": a1111_parameters(params)})
    if sidecar:
        json_path = path.with_suffix(".json")
        tmp = json_path.with_name(json_path.name + ".tmp")
        tmp.write_text(json.dumps(params, indent=2))
        os.replace(tmp, json_path)


def _parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments; with --from-png, the PNG's parameters are the defaults (flags given still win)."""
    known, _ = parser.parse_known_args()
    if getattr(known, "from_png", None):
        defaults, left = png_defaults(known.from_png)
        parser.set_defaults(**defaults)
        if left:
            print(f"--from-png: not replayed (set them with flags if needed): {'; '.join(left)}", file=sys.stderr)
    return parser.parse_args()


def run_cli(main: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser) -> None:
    """Parse, run `main(args)`, and turn the project's input errors (a bad argument, checkpoint, config, tuner
    or image) into one line on stderr with exit status 2."""
    try:
        args = _parse(parser)
        main(args)
    except (UsageError, CheckpointError, ConfigError, ImageError, NonFiniteError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
