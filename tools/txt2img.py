"""Text to image, with the CompVis `scripts/txt2img.py` arguments.

    python tools/txt2img.py --prompt "a large red circle"                  # the embedded toy model
    python tools/txt2img.py --ckpt weights/v1-5-pruned-emaonly.safetensors --prompt "a red bicycle"

Writes <outdir>/samples/NNNNN.png (one per image, seed + i) and <outdir>/grid-NNNN.png; every PNG carries
its parameters in a `parameters` text chunk (AUTOMATIC1111's convention), `--json` adds a sidecar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce import cli  # noqa: E402
from ldm_sce.images import make_grid, next_index, to_pil  # noqa: E402
from ldm_sce.sampling import sample  # noqa: E402


def main(args: argparse.Namespace) -> None:
    # -- arguments and model --
    cli.check_args(args)
    model = cli.load(args)
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
    images, first_params = [], None
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
                progress=not args.quiet,
                spacing=cli.spacing(model, args),
                schedule=args.schedule,
                guidance_rescale=args.guidance_rescale,
            )
            batch_images = to_pil(cli.decode(model, z, args))

            # -- outputs: one numbered PNG per image, parameters inside --
            for img, prompt, s in zip(batch_images, batch, seeds, strict=True):
                params = {
                    "prompt": prompt,
                    "negative_prompt": args.negative_prompt,
                    "steps": args.ddim_steps,
                    "sampler": args.sampler,
                    "schedule": args.schedule,
                    "scale": args.scale,
                    "seed": s,
                    "width": args.W,
                    "height": args.H,
                    "model": Path(args.ckpt).stem,
                    "extra": cli.extra_params(args, model),
                }
                cli.save_sample(img, sample_dir / f"{index:05}.png", params, args.json)
                first_params = first_params or params
                index += 1
            images += batch_images

    if not args.skip_grid:
        grid_index = next_index(outdir, "grid-[0-9][0-9][0-9][0-9].png", 4)
        grid = make_grid(images, n_cols=args.n_samples)
        cli.save_sample(grid, outdir / f"grid-{grid_index:04}.png", first_params, sidecar=False)
    print(f"Your samples are ready and waiting for you here: {outdir}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(p)
    cli.add_tuner_args(p)
    p.add_argument(
        "--from-png", help="replay the parameters of a PNG made by this project or AUTOMATIC1111 (flags given win)"
    )
    p.add_argument("--H", type=int, help="image height in pixels (default: the model's own, e.g. 512 for SD1)")
    p.add_argument("--W", type=int, help="image width in pixels (default: the model's own, e.g. 512 for SD1)")
    return p


if __name__ == "__main__":
    cli.run_cli(main, parser())
