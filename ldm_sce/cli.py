"""Shared pieces of the command-line tools (`tools/txt2img.py`, `tools/img2img.py`): arguments with the
CompVis names, model loading with one-line errors, prompt batches, and PNG output with A1111-style metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .checkpoint_io import CheckpointError, load_model
from .config import ConfigError
from .sampling import SAMPLERS

SAMPLER_NAMES = {"ddim": "DDIM", "plms": "PLMS", "euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M Karras"}


class UsageError(Exception):
    """A bad argument or input file: printed as one line, exit status 2."""


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar")
    p.add_argument("--negative-prompt", type=str, default="", help="the unconditional prompt of CFG")
    p.add_argument("--from-file", type=str, help="read prompts from this file, one per line")
    p.add_argument("--outdir", type=str, default="outputs/txt2img-samples")
    p.add_argument("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps (any sampler)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    p.add_argument("--plms", action="store_true", help="same as --sampler plms")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--n_iter", type=int, default=1, help="sample this often")
    p.add_argument("--n_samples", type=int, default=1, help="batch size")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=42, help="image i uses seed + i")
    p.add_argument("--ckpt", type=str, help="checkpoint (.ckpt or .safetensors)")
    p.add_argument("--config", type=str, help="preset name or YAML (ours or the original inference YAML)")
    p.add_argument("--parameterization", choices=("eps", "v"), help="override eps/v (SD2 files do not say)")
    p.add_argument("--precision", choices=("full", "autocast"), default="autocast")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="also write each image's parameters as a .json sidecar")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace) -> None:
    if args.plms:
        args.sampler = "plms"
    for name in ("ddim_steps", "n_iter", "n_samples"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.sampler == "plms" and args.ddim_eta != 0:
        raise UsageError("--ddim_eta must be 0 with PLMS")
    if args.ckpt is None:
        raise UsageError("no --ckpt given: pass a Stable Diffusion checkpoint (.ckpt or .safetensors)")
    if not Path(args.ckpt).is_file():
        raise UsageError(f"checkpoint not found: {args.ckpt}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")


def load(args: argparse.Namespace):
    try:
        return load_model(args.ckpt, config=args.config, parameterization=args.parameterization, device=args.device)
    except (CheckpointError, ConfigError) as e:
        raise UsageError(str(e)) from e


def latent_factor(model) -> tuple[int, int]:
    """(VAE downsampling factor, required multiple of the image side) for this model."""
    f = 2 ** (len(model.cfg.vae.ch_mult) - 1)
    return f, f * 2 ** (len(model.cfg.unet.channel_mult) - 1)


def check_size(model, h: int, w: int) -> None:
    _, multiple = latent_factor(model)
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


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def a1111_parameters(p: dict) -> str:
    """The `parameters` text chunk as AUTOMATIC1111 writes it (read by most image viewers and UIs)."""
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = {
        "Steps": p["steps"],
        "Sampler": SAMPLER_NAMES[p["sampler"]],
        "CFG scale": p["scale"],
        "Seed": p["seed"],
        "Size": f"{p['width']}x{p['height']}",
        "Model": p["model"],
    }
    fields.update(p.get("extra", {}))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def save_png(img: Image.Image, path: Path, params: dict, sidecar: bool) -> None:
    """Write atomically (temporary name, then rename) with the parameters in a PNG text chunk."""
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    if sidecar:
        path.with_suffix(".json").write_text(json.dumps(params, indent=2))


def next_index(folder: Path, pattern: str) -> int:
    """First free number in `folder` for names like 00012.png (CompVis counts existing files)."""
    return len(list(folder.glob(pattern)))


def make_grid(images: list[Image.Image], n_cols: int) -> Image.Image:
    w, h = images[0].size
    n_rows = (len(images) + n_cols - 1) // n_cols
    grid = Image.new("RGB", (n_cols * w, n_rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % n_cols) * w, (i // n_cols) * h))
    return grid


def load_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read image {path}: {e}") from e


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def run_cli(main, parser: argparse.ArgumentParser) -> None:
    """Parse, run `main(args)`, and turn UsageError into one line on stderr with exit status 2."""
    args = parser.parse_args()
    try:
        main(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
