"""Generation as the command-line tools run it: `txt2img` and `img2img` take the tools' parsed arguments
(`tools/txt2img.py`, `tools/img2img.py` are these functions behind argparse), so every caller (the CLI, the
web UI, a script) goes through the same checks, conditioning, tuners, samplers and PNG parameters."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from . import cli
from .diffusion import LatentDiffusion
from .images import NonFiniteError, image_to_tensor, load_image, make_grid, next_index, save_png, to_pil
from .lora import remove_lora
from .sampling import (
    Callback,
    NoiseStream,
    batch_noise,
    cfg_denoiser,
    ddim_stochastic_encode,
    non_finite_cause,
    sample,
    sample_ddim,
    sample_plms,
)
from .tuners import SkipIdentity


def txt2img(
    args: argparse.Namespace, model: LatentDiffusion | None = None, callback: Callback | None = None
) -> list[Path]:
    """`tools/txt2img.py` with parsed arguments: the numbered sample PNGs written (and a grid unless
    --skip_grid). model: an already loaded base (the web UI keeps one; `reset_model` it between runs), else
    --ckpt is loaded; callback: called with each sampling step's `Step`."""
    # -- arguments and model --
    cli.check_args(args)
    model = model if model is not None else cli.load(args)
    native = model.cfg.native_size  # from the model's config: 512 for SD1, 768 for SD2-v, 64 for the toy
    args.H, args.W = args.H or native, args.W or native
    cli.check_size(model, args.H, args.W)
    prompts = cli.read_prompts(args)

    outdir = Path(args.outdir)
    tuning = cli.attach_tuners(model, args, args.W, args.H, outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(sample_dir, "[0-9][0-9][0-9][0-9][0-9].png", 5)
    seed = args.seed

    # -- sampling --
    images, first_params, paths = [], None, []
    with torch.no_grad(), cli.precision_context(args):
        for batch in cli.batches(prompts, args.n_samples, args.n_iter):
            n = len(batch)
            c, uc = cli.conditioning(model, args, batch, args.H, args.W)
            seeds = list(range(seed, seed + n))
            seed += n
            z = sample(
                model,
                c,
                uc,
                sampler=args.sampler,
                steps=args.ddim_steps,
                scale=args.scale,
                eta=args.ddim_eta,
                seed=seeds,
                shape=model.cfg.latent_size(args.H, args.W),
                tuning=tuning,
                callback=callback,
                progress=not args.quiet,
                spacing=cli.spacing(model, args),
                schedule=args.schedule,
                guidance_rescale=args.guidance_rescale,
            )
            batch_images = to_pil(cli.decode(model, z, args))

            # -- outputs: one numbered PNG per image, parameters inside --
            for img, prompt, s in zip(batch_images, batch, seeds, strict=True):
                params = _params(args, prompt, s, args.W, args.H, cli.extra_params(args, model))
                cli.save_sample(img, sample_dir / f"{index:05}.png", params, args.json)
                paths.append(sample_dir / f"{index:05}.png")
                first_params = first_params or params
                index += 1
            images += batch_images

    if not args.skip_grid:
        grid_index = next_index(outdir, "grid-[0-9][0-9][0-9][0-9].png", 4)
        grid = make_grid(images, n_cols=args.n_samples)
        cli.save_sample(grid, outdir / f"grid-{grid_index:04}.png", first_params, sidecar=False)
    return paths


def img2img(
    args: argparse.Namespace, model: LatentDiffusion | None = None, callback: Callback | None = None
) -> list[Path]:
    """`tools/img2img.py` with parsed arguments (SDEdit: the init image noised to `strength` of the DDIM
    schedule, then denoised with the prompt); as `txt2img` otherwise."""
    # -- arguments, model and init image --
    cli.check_args(args)
    if args.sampler not in ("ddim", "plms"):
        raise cli.UsageError(f"img2img supports --sampler ddim or plms, not {args.sampler}")
    if not 0.0 < args.strength <= 1.0:
        raise cli.UsageError(f"--strength must be in (0, 1], got {args.strength}")
    model = model if model is not None else cli.load(args)
    multiple = model.cfg.image_multiple
    init = load_image(args.init_img)
    w, h = (s - s % multiple for s in init.size)  # as CompVis: crop the size down to a usable multiple
    if w == 0 or h == 0:
        raise cli.UsageError(f"--init-img is {init.size[0]}x{init.size[1]}; it must be at least {multiple}px a side")
    init = init.resize((w, h), resample=Image.LANCZOS)
    prompts = cli.read_prompts(args)
    t_enc = int(args.strength * args.ddim_steps)
    if t_enc < 1:
        raise cli.UsageError("--strength * --ddim_steps must be at least 1 step")

    outdir = Path(args.outdir)
    tuning = cli.attach_tuners(model, args, w, h, outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    index = next_index(sample_dir, "[0-9][0-9][0-9][0-9][0-9].png", 5)
    seed = args.seed
    p = next(model.parameters())

    # -- encode, noise to t_enc, denoise --
    images, paths = [], []
    with torch.no_grad(), cli.precision_context(args):
        x0_img = image_to_tensor(init).to(p.device, p.dtype)
        with cli.on_device(model.first_stage_model, args), cli.vae_context(model, args):
            posterior = model.encode_first_stage(x0_img)
        for batch in cli.batches(prompts, args.n_samples, args.n_iter):
            n = len(batch)
            seeds = list(range(seed, seed + n))
            seed += n
            # the posterior sample and the forward noise of image i come from seed i, as in txt2img
            eps_q = batch_noise((n, *posterior.mean.shape[1:]), [x + 0x1000 for x in seeds], p.dtype, p.device)
            z0 = model.scale_factor * (posterior.mean + posterior.std * eps_q)
            noise = batch_noise(tuple(z0.shape), seeds, dtype=p.dtype, device=p.device)
            spacing = cli.spacing(model, args)
            z = ddim_stochastic_encode(model.alphas_cumprod, z0, args.ddim_steps, t_enc, noise, spacing)
            c, uc = cli.conditioning(model, args, batch, h, w)
            denoiser = cfg_denoiser(model, c, uc, args.scale, tuning, spacing)
            if args.sampler == "ddim":
                noise_fn = NoiseStream(tuple(z.shape), seeds, z.dtype, z.device)
                z = sample_ddim(
                    denoiser,
                    z,
                    args.ddim_steps,
                    args.ddim_eta,
                    noise_fn,
                    t_start=t_enc,
                    callback=callback,
                    progress=not args.quiet,
                    spacing=spacing,
                )
            else:
                z = sample_plms(
                    denoiser,
                    z,
                    args.ddim_steps,
                    t_start=t_enc,
                    callback=callback,
                    progress=not args.quiet,
                    spacing=spacing,
                )
            if not torch.isfinite(z).all():
                raise NonFiniteError(
                    f"the sampled latents hold NaN or inf: {non_finite_cause(model, c, uc, z, tuning)}"
                )
            batch_images = to_pil(cli.decode(model, z, args))

            # -- outputs --
            for img, prompt, s in zip(batch_images, batch, seeds, strict=True):
                extra = {"Denoising strength": args.strength, "Init image": Path(args.init_img).name}
                params = _params(args, prompt, s, w, h, {**extra, **cli.extra_params(args, model)}, schedule=False)
                cli.save_sample(img, sample_dir / f"{index:05}.png", params, args.json)
                paths.append(sample_dir / f"{index:05}.png")
                index += 1
            images += batch_images

    if not args.skip_grid:
        grid_index = next_index(outdir, "grid-[0-9][0-9][0-9][0-9].png", 4)
        save_png(make_grid(images, n_cols=args.n_samples), outdir / f"grid-{grid_index:04}.png")
    return paths


def txt2img_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments of `tools/txt2img.py` (CompVis's, plus this project's)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    cli.add_tuner_args(p)
    p.add_argument(
        "--from-png", help="replay the parameters of a PNG made by this project or AUTOMATIC1111 (flags given win)"
    )
    p.add_argument("--H", type=int, help="image height in pixels (default: the model's own, e.g. 512 for SD1)")
    p.add_argument("--W", type=int, help="image width in pixels (default: the model's own, e.g. 512 for SD1)")
    return p


def img2img_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The arguments of `tools/img2img.py` (CompVis's, plus this project's)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    cli.add_tuner_args(p)
    p.set_defaults(outdir="outputs/img2img-samples")
    p.add_argument("--init-img", type=str, required=True, help="path to the input image")
    p.add_argument("--strength", type=float, default=0.75, help="0: keep the image, 1: ignore it")
    return p


def _params(args, prompt: str, seed: int, width: int, height: int, extra: dict, schedule: bool = True) -> dict:
    """The parameters a sample's PNG carries (`cli.a1111_parameters` writes them)."""
    params = {
        "prompt": prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.ddim_steps,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "scale": args.scale,
        "seed": seed,
        "width": width,
        "height": height,
        "model": Path(args.ckpt).stem,
        "extra": extra,
    }
    if not schedule:  # img2img: DDIM or PLMS, no sigma schedule
        del params["schedule"]
    return params


def reset_model(model: LatentDiffusion) -> LatentDiffusion:
    """Take every tuner, controller, skip edit and on-the-fly LoRA off a loaded model (what `txt2img` /
    `img2img` attach for a run), leaving the base weights as loaded."""
    unet = model.model.diffusion_model
    unet.replace_tuners(SkipIdentity() for _ in unet.output_blocks)
    unet.replace_controllers([])
    unet.skip_edits = torch.nn.ModuleList()
    remove_lora(model)
    return model
