"""Speed and memory benchmarks; figures go to docs/BENCHMARKS.md. Never asserted in tests.

    python tools/bench.py unet --preset sd-v1 --batch 2 --latent 64 --runs 5

    python tools/bench.py step --preset sd-v1 --steps 3 --runs 2

`unet`: UNet forward of the full-size config with random weights, this project vs diffusers'
UNet2DConditionModel built from the same weights by diffusers' single-file conversion. The two run
alternately in one process (so both see the same machine state); the median of `--runs` timed runs each,
after a warm-up.

`step`: seconds per DDIM sampling step with classifier-free guidance (B=1 image, so a UNet batch of 2),
`ldm_sce.sample` vs diffusers' StableDiffusionPipeline denoising loop on the same UNet weights (given
precomputed text embeddings, output_type="latent": the VAE decode is not timed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sce.config import PRESETS  # noqa: E402
from ldm_sce.unet import UNetModel  # noqa: E402


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def diffusers_unet_from(ours: UNetModel, preset: str):
    """diffusers' UNet with our weights, converted by diffusers' own single-file code."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import compvis_yaml

    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    dcfg = su.create_unet_diffusers_config_from_ldm(compvis_yaml(PRESETS[preset]), ckpt)
    ref = UNet2DConditionModel(**dcfg)
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    return ref.eval().requires_grad_(False)


def bench_unet(args) -> dict:
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    ours = UNetModel(cfg.unet).eval().requires_grad_(False)
    theirs = diffusers_unet_from(ours, args.preset)
    x = torch.randn(args.batch, 4, args.latent, args.latent)
    t = torch.full((args.batch,), 500)
    ctx = torch.randn(args.batch, 77, cfg.unet.context_dim)
    runners = {"ldm_sce": lambda: ours(x, t, ctx), "diffusers": lambda: theirs(x, t, ctx).sample}
    with torch.inference_mode():
        diff = (runners["ldm_sce"]() - runners["diffusers"]()).abs().max().item()  # warm-up and sanity
        times = {name: [] for name in runners}
        for _ in range(args.runs):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "bench": "unet_forward",
        "preset": args.preset,
        "batch": args.batch,
        "latent": args.latent,
        "dtype": "float32",
        "runs": args.runs,
        "machine": machine(),
        "seconds_median": med,
        "seconds_all": times,
        "ratio_ldm_sce_over_diffusers": med["ldm_sce"] / med["diffusers"],
        "max_abs_diff": diff,
    }


def bench_step(args) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from ldm_sce.diffusion import LatentDiffusion, make_schedule
    from ldm_sce.sampling import batch_noise, sample

    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    model.to_empty(device="cpu")  # random weights are enough: time does not depend on their values
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    for name, value in make_schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps).items():
        getattr(model, name).copy_(value)
    model.eval().requires_grad_(False)
    unet = diffusers_unet_from(model.model.diffusion_model, args.preset)
    sched = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    c = torch.randn(1, 77, cfg.unet.context_dim)
    uc = torch.randn(1, 77, cfg.unet.context_dim)
    x_t = batch_noise((1, 4, args.latent, args.latent), [0])
    runners = {
        "ldm_sce": lambda: sample(model, c, uc, x_T=x_t, steps=args.steps, seed=0),
        "diffusers": lambda: (
            pipe(
                prompt_embeds=c,
                negative_prompt_embeds=uc,
                latents=x_t.clone(),
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="latent",
                height=args.latent * 8,
                width=args.latent * 8,
            ).images
        ),  # fmt: skip
    }
    with torch.inference_mode():
        diff = (runners["ldm_sce"]() - runners["diffusers"]()).abs().max().item()
        times = {name: [] for name in runners}
        for _ in range(args.runs):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "bench": "ddim_step_cfg",
        "preset": args.preset,
        "latent": args.latent,
        "steps": args.steps,
        "runs": args.runs,
        "machine": machine(),
        "seconds_per_step_median": med,
        "seconds_per_step_all": times,
        "ratio_ldm_sce_over_diffusers": med["ldm_sce"] / med["diffusers"],
        "max_abs_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("unet", help="UNet forward: ldm_sce vs diffusers on the same random weights")
    p.add_argument("--preset", default="sd-v1", choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path, help="also write the result here")
    p = sub.add_parser("step", help="seconds per DDIM+CFG sampling step: ldm_sce.sample vs diffusers' pipeline")
    p.add_argument("--preset", default="sd-v1", choices=sorted(PRESETS))
    p.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    result = bench_unet(args) if args.cmd == "unet" else bench_step(args)
    med = result.get("seconds_median") or result["seconds_per_step_median"]
    print(f"{result['bench']} {args.preset} {args.latent}x{args.latent} latent, fp32 on {result['machine']}")
    for name, s in med.items():
        print(f"  {name:10s} {s:8.3f} s  (median of {args.runs})")
    print(
        f"  ratio ldm_sce / diffusers = {result['ratio_ldm_sce_over_diffusers']:.3f}   max|diff| = {result['max_abs_diff']:.2e}"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
