"""Image to image (SDEdit) as the CompVis `scripts/img2img.py`: noise the encoded init image to
`strength` of the DDIM schedule, then denoise it with the prompt.

    python tools/img2img.py --ckpt weights/v1-5-pruned-emaonly.safetensors --init-img sketch.png \
        --strength 0.75 --prompt "a fantasy landscape, trending on artstation"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from ldm_sce import cli  # noqa: E402
from ldm_sce.images import NonFiniteError, image_to_tensor, load_image, make_grid, next_index, save_png, to_pil  # noqa: E402
from ldm_sce.sampling import (  # noqa: E402
    NoiseStream,
    batch_noise,
    cfg_denoiser,
    ddim_stochastic_encode,
    non_finite_cause,
    sample_ddim,
    sample_plms,
)


def main(args: argparse.Namespace) -> None:
    # -- arguments, model and init image --
    cli.check_args(args)
    if args.sampler not in ("ddim", "plms"):
        raise cli.UsageError(f"img2img supports --sampler ddim or plms, not {args.sampler}")
    if not 0.0 < args.strength <= 1.0:
        raise cli.UsageError(f"--strength must be in (0, 1], got {args.strength}")
    model = cli.load(args)
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
    images = []
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
                    progress=not args.quiet,
                    spacing=spacing,
                )
            else:
                z = sample_plms(denoiser, z, args.ddim_steps, t_start=t_enc, progress=not args.quiet, spacing=spacing)
            if not torch.isfinite(z).all():
                raise NonFiniteError(
                    f"the sampled latents hold NaN or inf: {non_finite_cause(model, c, uc, z, tuning)}"
                )
            batch_images = to_pil(cli.decode(model, z, args))

            # -- outputs --
            for img, prompt, s in zip(batch_images, batch, seeds, strict=True):
                params = {
                    "prompt": prompt,
                    "negative_prompt": args.negative_prompt,
                    "steps": args.ddim_steps,
                    "sampler": args.sampler,
                    "scale": args.scale,
                    "seed": s,
                    "width": w,
                    "height": h,
                    "model": Path(args.ckpt).stem,
                    "extra": {
                        "Denoising strength": args.strength,
                        "Init image": Path(args.init_img).name,
                        **cli.extra_params(args, model),
                    },
                }
                cli.save_sample(img, sample_dir / f"{index:05}.png", params, args.json)
                index += 1
            images += batch_images

    if not args.skip_grid:
        grid_index = next_index(outdir, "grid-[0-9][0-9][0-9][0-9].png", 4)
        save_png(make_grid(images, n_cols=args.n_samples), outdir / f"grid-{grid_index:04}.png")
    print(f"Your samples are ready and waiting for you here: {outdir}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    cli.add_tuner_args(p)
    p.set_defaults(outdir="outputs/img2img-samples")
    p.add_argument("--init-img", type=str, required=True, help="path to the input image")
    p.add_argument("--strength", type=float, default=0.75, help="0: keep the image, 1: ignore it")
    return p


if __name__ == "__main__":
    cli.run_cli(main, parser())
