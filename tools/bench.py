"""Speed and memory benchmarks; figures go to docs/BENCHMARKS.md. Never asserted in tests.

    python tools/bench.py unet --preset sd-v1 --batch 2 --latent 64 --runs 5

    python tools/bench.py step --preset sd-v1 --steps 3 --runs 2

`unet`: UNet forward of the full-size config with random weights, this project vs diffusers'
UNet2DConditionModel built from the same weights by diffusers' single-file conversion. The two run
alternately in one process (so both see the same machine state); the median of `--runs` timed runs each,
after a warm-up.

`infer`: UNet forward of the full-size config (random weights) without and with SCEdit: all 12 SC-Tuners,
one CSC-Tuner controller (kernel 1 and 3), and both; the controller's hints are computed once per image,
outside the timed steps (their cost is reported separately).

`train`: one training step (forward, MSE loss, backward, AdamW step) for each method, each in its own
process so peaks do not mix: trainable parameters, peak memory (CPU: peak resident set; GPU:
max_memory_allocated), training overhead = peak minus the memory held once the frozen model and the
trainable modules are built, and median step time. The frozen VAE and text encoder are the same for every
method and run under no_grad, so the step takes precomputed latents and text features.

    python tools/bench.py train --preset sd-v1 --res 256 --batch 1 --methods sc,lora,full,csc1,csc3

Methods: sc (SC-Tuners on all skips), sc_hires (on the full-resolution decoder skips only), csc1 / csc3
(a CSC-Tuner, dense kernel 1 / 3), lora (rank 64, this project), lora_peft (peft on diffusers' UNet), full,
controlnet (diffusers' ControlNetModel).

`step`: seconds per DDIM sampling step with classifier-free guidance (B=1 image, so a UNet batch of 2),
`ldm_sce.sample` vs diffusers' StableDiffusionPipeline denoising loop on the same UNet weights (given
precomputed text embeddings, output_type="latent": the VAE decode is not timed). With `--scedit` also
`ldm_sce.sample` with all 12 SC-Tuners and a CSC-Tuner controller (hints computed inside the timed call) vs
diffusers' StableDiffusionControlNetPipeline with a ControlNet built from the same UNet.

    python tools/bench.py step --preset sd-v1 --steps 3 --runs 2 --scedit

`train` is written in bench_train.py; `stream` (bench_data.py): peak memory and step time of toy training
streamed from tar shards, for growing dataset sizes; `gpu` (bench_gpu.py): the GPU suite in one command.
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

from ldm_sce.config import PRESETS, ModelConfig, to_compvis_yaml  # noqa: E402
from ldm_sce.diffusion import LatentDiffusion  # noqa: E402
from ldm_sce.unet import UNetModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def alternate(runners: dict, rounds: int, per: int = 1) -> dict[str, list[float]]:
    """Seconds of each runner, the runners taking turns for `rounds` rounds (same machine state for all);
    each time is divided by `per` (e.g. the number of steps one run makes)."""
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append((time.perf_counter() - start) / per)
    return times


def sync() -> None:
    """Wait for the GPU's queued work (CUDA runs asynchronously): timings end when the work does."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (no zero-initialised layer, so no computation can be skipped or vanish):
    normal with std 1/sqrt(fan-in) for matrices and kernels, 0.1 for vectors."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 1.0 / p[0].numel() ** 0.5 if p.ndim > 1 else 0.1)
    return module


def condition_size(cfg: ModelConfig, latent: int) -> tuple[int, int]:
    """A CSC-Tuner's (and a ControlNet's) condition image size for a square latent of side `latent`."""
    side = latent * cfg.vae.downsample_factor
    return cfg.condition_size(side, side)


def unet_inputs(cfg: ModelConfig, batch: int, latent: tuple[int, int], device="cpu"):
    """(x, t, context, our extra kwargs, diffusers' extra kwargs): random inputs of a UNet forward; for SDXL
    also the vector conditioning (ours: y; diffusers: the pooled text and the size ids it embeds itself)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, *latent, generator=g)
    t = torch.full((batch,), 500)
    ctx = torch.randn(batch, 77, cfg.unet.context_dim, generator=g)
    ours, theirs = {}, {}
    if cfg.unet.has_vector:
        from ldm_sce.text_encoders import Conditioner

        pooled = torch.randn(batch, cfg.text2.embed_dim, generator=g)
        side = [v * cfg.vae.downsample_factor for v in latent]
        sizes = torch.tensor([[*side, 0, 0, *side]] * batch, dtype=torch.float32)
        ours = {"y": Conditioner.vector(pooled, sizes).to(device)}
        theirs = {"added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": sizes.to(device)}}
    return x.to(device), t.to(device), ctx.to(device), ours, theirs


def diffusers_unet_config(cfg: ModelConfig) -> dict:
    """diffusers' UNet config for our UNet config, from diffusers' own single-file code."""
    from diffusers.loaders import single_file_utils as su

    with torch.device("meta"):
        keys = {"model.diffusion_model." + k: v for k, v in UNetModel(cfg.unet).state_dict().items()}
    dcfg = su.create_unet_diffusers_config_from_ldm(to_compvis_yaml(cfg), keys)
    if cfg.unet.has_vector:  # diffusers picks SDXL's text_time embedding only for context 2048 or 1280
        dcfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    return dcfg


def diffusers_unet_from(ours: UNetModel, preset: str):
    """diffusers' UNet with our weights, converted by diffusers' own single-file code."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as su

    ckpt = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    dcfg = diffusers_unet_config(PRESETS[preset])
    ref = UNet2DConditionModel(**dcfg)
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(ckpt, dcfg), strict=True)
    return ref.eval().requires_grad_(False)


def unet_runner(impl: str, cfg: ModelConfig, ours: UNetModel | None, args):
    """A no-argument forward of our UNet or of diffusers' (on `ours`'s weights when given, else random)."""
    x, t, ctx, extra_ours, extra_theirs = unet_inputs(cfg, args.batch, (args.latent, args.latent))
    if impl == "ldm_sce":
        return lambda: ours(x, t, ctx, **extra_ours)
    from diffusers import UNet2DConditionModel

    if ours is not None:
        theirs = diffusers_unet_from(ours, args.preset)
    else:
        theirs = randomize(UNet2DConditionModel(**diffusers_unet_config(cfg))).eval().requires_grad_(False)
    return lambda: theirs(x, t, ctx, **extra_theirs).sample


def unet_one(args) -> list[float]:
    """Seconds of `args.runs` forwards (after a warm-up) of one implementation, alone in this process."""
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    ours = randomize(UNetModel(cfg.unet)).eval().requires_grad_(False) if args.impl == "ldm_sce" else None
    run = unet_runner(args.impl, cfg, ours, args)
    with torch.inference_mode():
        run()
        return alternate({"one": run}, args.runs)["one"]


def bench_unet(args) -> dict:
    import subprocess

    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    diff = None
    if args.separate:  # one model per process (SDXL: two fp32 UNets do not fit in 24 GB together)
        times = {}
        for impl in ("ldm_sce", "diffusers"):
            cmd = [
                sys.executable,
                __file__,
                "unet-one",
                "--impl",
                impl,
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--latent",
                str(args.latent),
                "--runs",
                str(args.runs),
            ]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"unet-one {impl} failed: {r.stderr.strip()[-2000:]}")
            times[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        ours = randomize(UNetModel(cfg.unet)).eval().requires_grad_(False)
        runners = {impl: unet_runner(impl, cfg, ours, args) for impl in ("ldm_sce", "diffusers")}
        compile_seconds = {}
        with torch.inference_mode():
            diff = (runners["ldm_sce"]() - runners["diffusers"]()).abs().max().item()  # warm-up and sanity
            if args.compile != "none":  # the same models compiled, next to their eager runs
                runners |= compiled_unet_runners(cfg, ours, args, compile_seconds)
            times = alternate(runners, args.runs)
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
        "separate_processes": args.separate,
        "compile": args.compile,
        "compile_seconds": {} if args.separate else compile_seconds,
    }


def compiled_unet_runners(cfg: ModelConfig, ours: UNetModel, args, compile_seconds: dict) -> dict:
    """Compiled copies of our UNet (`compile_unet`, the chosen mode) and of diffusers' (regional:
    `compile_repeated_blocks`; full: `.compile()`), each run once to compile (the seconds are recorded)."""
    import copy

    from ldm_sce.unet import compile_unet

    compiled = {"ldm_sce+compiled": unet_runner("ldm_sce", cfg, compile_unet(copy.deepcopy(ours), args.compile), args)}
    theirs = diffusers_unet_from(ours, args.preset)
    if args.compile == "blocks":
        theirs.compile_repeated_blocks()
    else:
        theirs.compile()
    x, t, ctx, _, extra = unet_inputs(cfg, args.batch, (args.latent, args.latent))
    compiled["diffusers+compiled"] = lambda: theirs(x, t, ctx, **extra).sample
    for name, run in compiled.items():
        start = time.perf_counter()
        run()
        compile_seconds[name] = time.perf_counter() - start
    return compiled


def bench_infer(args) -> dict:
    from ldm_sce.tuners import Control, CSCTuner, SkipIdentity, Tuning

    torch.manual_seed(0)
    cfg = PRESETS[args.preset]
    unet = randomize(UNetModel(cfg.unet)).eval().requires_grad_(False)
    x, t, ctx, extra_ours, extra_theirs = unet_inputs(cfg, args.batch, (args.latent, args.latent))
    ctrls = {k: CSCTuner(cfg.unet, kernel=k).eval().requires_grad_(False) for k in (1, 3)}
    for ctrl in ctrls.values():
        for p in ctrl.parameters():
            p.data.normal_(0, 0.02)  # non-zero: nothing may be skipped
    runners = {}
    if args.peers:  # what users would run instead: diffusers' UNet on the same weights, and with a ControlNet
        from diffusers import ControlNetModel

        dunet = diffusers_unet_from(unet, args.preset)
        dctrl = ControlNetModel.from_unet(dunet).eval().requires_grad_(False)
        dcond = torch.rand(args.batch, 3, *condition_size(cfg, args.latent))

        def diffusers_forward(controlnet: bool) -> torch.Tensor:
            if not controlnet:
                return dunet(x, t, ctx, **extra_theirs).sample
            down, mid = dctrl(x, t, ctx, controlnet_cond=dcond, return_dict=False, **extra_theirs)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            return dunet(x, t, ctx, **residuals, **extra_theirs).sample

        runners = {
            "diffusers": lambda: diffusers_forward(False),
            "diffusers+controlnet": lambda: diffusers_forward(True),
        }
    tuners = unet.attach_sc_tuners()
    for p in unet.tuners.parameters():
        p.data.normal_(0, 0.02)  # non-zero: nothing may be skipped
    cond = torch.rand(1, 3, *condition_size(cfg, args.latent))
    hint_seconds = {}
    with torch.inference_mode():
        hints = {}
        for k, ctrl in ctrls.items():
            start = time.perf_counter()
            hints[k] = ctrl.hints(cond)
            hint_seconds[f"csc{k}"] = time.perf_counter() - start

    sc_slots = list(unet.tuners)
    no_slots = [SkipIdentity() for _ in tuners]

    def forward(sc: bool, csc: int | None) -> torch.Tensor:
        unet.replace_tuners(sc_slots if sc else no_slots)
        unet.replace_controllers([ctrls[csc]] if csc else [])
        return unet(x, t, ctx, Tuning(control=Control([hints[csc]], [1.0]) if csc else None), **extra_ours)

    variants = {"base": (False, None), "sc": (True, None), "csc1": (False, 1), "csc3": (False, 3), "sc+csc1": (True, 1)}
    runners = {name: (lambda sc=sc, csc=csc: forward(sc, csc)) for name, (sc, csc) in variants.items()} | runners
    extra_runners, extra_parts = lora_and_tuner_set_runners(cfg, unet, sc_slots, args, (x, t, ctx), extra_ours)
    runners |= extra_runners
    with torch.inference_mode():
        alternate(runners, 1)  # warm-up round
        times = alternate(runners, args.runs)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    # The end-to-end differences are within this machine's run-to-run noise, so also time exactly what
    # the tuners add: the skip edits, on tensors shaped as the skips of this forward, 5 times each.
    skips = [
        torch.randn(args.batch, *shape).contiguous(memory_format=torch.channels_last)
        for shape in cfg.unet.skip_shapes(args.latent, args.latent)
    ]

    def edits(sc: bool, csc: int | None):
        for m, skip in enumerate(skips):
            out = sc_slots[m](skip, 1.0) if sc else skip
            if csc:
                out = out + ctrls[csc].residual(m, skip, hints[csc][m])

    isolated = {}
    with torch.inference_mode():
        for name, (sc, csc) in variants.items():
            ts = []
            for _ in range(6):
                start = time.perf_counter()
                edits(sc, csc)
                ts.append(time.perf_counter() - start)
            isolated[name] = statistics.median(ts[1:])
        for name, part in extra_parts.items():  # what a LoRA adds per forward, what a second tuner set adds
            ts = []
            for _ in range(6):
                start = time.perf_counter()
                part(skips)
                ts.append(time.perf_counter() - start)
            isolated[name] = statistics.median(ts[1:])
    return {
        "bench": "unet_forward_with_tuners",
        "preset": args.preset,
        "batch": args.batch,
        "latent": args.latent,
        "runs": args.runs,
        "machine": machine(),
        "seconds_median": med,
        "seconds_all": times,
        "overhead_vs_base": {name: med[name] / med["base"] - 1 for name in med},
        "isolated_edit_seconds": isolated,
        "isolated_overhead_vs_base": {name: isolated[name] / med["base"] for name in isolated},
        "hint_seconds_once_per_image": hint_seconds,
    }


def lora_and_tuner_set_runners(cfg, unet, sc_slots, args, inputs, extra) -> dict:
    """With --lora-rank R: the UNet with a rank-R LoRA on every attention and feed-forward linear (kohya's
    default targets) applied on the fly (a second UNet with the same weights), also with the SC-Tuners; and
    two SC-Tuner sets on every skip (a TunerSet, summed)."""
    import copy

    from ldm_sce.lora import LoRALayer, apply_lora, unet_lora_targets
    from ldm_sce.tuners import SCTuner, SkipIdentity, TunerSet

    if not args.lora_rank:
        return {}, {}
    lora_unet = copy.deepcopy(unet)
    lora_unet.replace_tuners(copy.deepcopy(sc_slots))
    lora_unet.replace_controllers([])
    g = torch.Generator().manual_seed(1)
    layers = []
    for target in {id(t.module): t for t in unet_lora_targets(lora_unet).values()}.values():
        w = target.shape
        if len(w) == 2 and ".transformer_blocks." in target.name:
            down = torch.randn(args.lora_rank, w[1], generator=g) * 0.01
            layers.append(LoRALayer(target, down, torch.randn(w[0], args.lora_rank, generator=g) * 0.01, 1.0))
    apply_lora(layers)
    second = [SCTuner(t.ln1.in_features) for t in sc_slots]
    for tuner in second:
        for p in tuner.parameters():
            p.data.normal_(0, 0.02)
    sets = [TunerSet([a, b], [0.8, 0.5]) for a, b in zip(sc_slots, second, strict=True)]
    x, t, ctx = inputs

    def with_lora(sc: bool) -> torch.Tensor:
        lora_unet.replace_tuners(copy.copy(sc_slots) if sc else [SkipIdentity() for _ in sc_slots])
        return lora_unet(x, t, ctx, **extra)

    def two_sets() -> torch.Tensor:
        unet.replace_tuners(sets)
        unet.replace_controllers([])
        return unet(x, t, ctx, **extra)

    def lora_weights(_skips) -> None:  # the parametrizations: every LoRA layer's W + up @ down, once per forward
        for target in {id(layer.target.module): layer.target for layer in layers}.values():
            target.module.weight  # noqa: B018 (computes the parametrized weight)

    def set_edits(skips) -> None:
        for m, skip in enumerate(skips):
            sets[m](skip, 1.0)

    name = f"lora{args.lora_rank}"
    runners = {name: lambda: with_lora(False), f"sc+{name}": lambda: with_lora(True), "sc_x2": two_sets}
    return runners, {name: lora_weights, "sc_x2": set_edits}


def random_model(
    preset: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LatentDiffusion:
    """The full model of a preset with random weights (time does not depend on their values), the schedule
    computed, built directly on `device`."""
    from ldm_sce.diffusion import make_schedule

    cfg = PRESETS[preset]
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    model.to_empty(device=device)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    for name, value in make_schedule(cfg.linear_start, cfg.linear_end, cfg.timesteps).items():
        model.register_buffer(name, value.to(device), persistent=cfg.text2 is None)
    return model.to(dtype).eval().requires_grad_(False)


def sd_step_runners(preset: str, latent: int, steps: int, scedit: bool, device="cpu", dtype=torch.float32):
    """({name: one image's sampling}, (max |ours - diffusers|, max |ours|)): `ldm_sce.sample` (DDIM, CFG
    7.5) and diffusers' StableDiffusionPipeline denoising loop on the same UNet weights, given the same text
    embeddings and latents, output_type='latent' (no VAE decode); with `scedit` also SC-Tuners + a CSC-Tuner
    and diffusers' ControlNet pipeline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from ldm_sce.sampling import batch_noise, sample

    torch.manual_seed(0)
    cfg = PRESETS[preset]
    if cfg.family == "sdxl":
        raise SystemExit("this compares with diffusers' SD pipeline: use an SD1/SD2 preset (SDXL: sdxl_runners)")
    model = random_model(preset, device, dtype)
    unet = diffusers_unet_from(model.model.diffusion_model.float(), preset).to(device, dtype)
    model.to(dtype)
    sched = DDIMScheduler(
        beta_start=cfg.linear_start,
        beta_end=cfg.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    c, uc = (torch.randn(1, 77, cfg.unet.context_dim, generator=g).to(device, dtype) for _ in range(2))
    x_t = batch_noise((1, 4, latent, latent), [0], dtype, device)
    runners = {
        "ldm_sce": lambda: sample(model, c, uc, x_T=x_t, steps=steps, seed=0),
        "diffusers": lambda: (
            pipe(
                prompt_embeds=c,
                negative_prompt_embeds=uc,
                latents=x_t.clone(),
                num_inference_steps=steps,
                guidance_scale=7.5,
                output_type="latent",
                height=latent * 8,
                width=latent * 8,
            ).images
        ),
    }
    with torch.inference_mode():
        ours = runners["ldm_sce"]().float()
        diff = (ours - runners["diffusers"]().float()).abs().max().item(), ours.abs().max().item()
    if scedit:
        runners |= scedit_step_runners(model, pipe, c, uc, x_t, steps, latent)
    with torch.inference_mode():
        for run in runners.values():
            run()  # warm-up
    return runners, diff


def sdxl_runners(preset: str, latent: int, steps: int, device="cpu", dtype=torch.float32):
    """({name: one image's sampling}, (max |ours - diffusers|, max |ours|)): `ldm_sce.sample` (Euler, sgm's
    trailing schedule, CFG 5) and diffusers' StableDiffusionXLPipeline (EulerDiscreteScheduler, trailing) on
    the same UNet weights, given the same embeddings and latents, output_type='latent'."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ldm_sce.sampling import batch_noise, sample

    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model = random_model(preset, device, dtype)
    unet = diffusers_unet_from(model.model.diffusion_model.float(), preset).to(device, dtype)
    model.to(dtype)
    sched = EulerDiscreteScheduler(
        beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear", timestep_spacing="trailing"
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(),
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=sched,
    )
    pipe.set_progress_bar_config(disable=True)
    side = latent * cfg.vae.downsample_factor
    g = torch.Generator().manual_seed(1)
    ctx = torch.randn(1, 77, cfg.unet.context_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, cfg.text2.embed_dim, generator=g).to(device, dtype)
    c = {"crossattn": ctx, "vector": None}
    sizes = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32)
    from ldm_sce.text_encoders import Conditioner

    c["vector"] = Conditioner.vector(pooled, sizes).to(device, dtype)
    uc = model.get_unconditional_conditioning(c)
    x_t = batch_noise((1, 4, latent, latent), [0], dtype, device)
    sigma_max = float(((1 - model.alphas_cumprod[-1]) / model.alphas_cumprod[-1]).sqrt())
    runners = {
        "ldm_sce": lambda: sample(model, c, uc, x_T=x_t, sampler="euler", steps=steps, scale=5.0, seed=0),
        # the same start as sgm's (x_T sqrt(1 + sigma_max^2)); diffusers' trailing Euler would use sigma_max
        "diffusers": lambda: (
            pipe(
                prompt_embeds=ctx,
                negative_prompt_embeds=torch.zeros_like(ctx),
                pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=torch.zeros_like(pooled),
                latents=x_t * (1 + sigma_max**2) ** 0.5 / sched.init_noise_sigma,
                num_inference_steps=steps,
                guidance_scale=5.0,
                output_type="latent",
                height=side,
                width=side,
            ).images
        ),
    }
    with torch.inference_mode():
        ours = runners["ldm_sce"]().float()
        diff = (ours - runners["diffusers"]().float()).abs().max().item(), ours.abs().max().item()
        for run in runners.values():
            run()  # warm-up
    return runners, diff


def bench_step(args) -> dict:
    runners, (diff, _) = sd_step_runners(args.preset, args.latent, args.steps, args.scedit)
    with torch.inference_mode():
        times = alternate(runners, args.runs, per=args.steps)
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
        "overhead_vs_own_base": {name: med[name] / med[name.split("+")[0]] - 1 for name in med if "+" in name},
        "max_abs_diff": diff,
    }


def scedit_step_runners(model: LatentDiffusion, pipe, c, uc, x_t, steps: int, latent: int) -> dict:
    """Sampling with all SC-Tuners and a CSC-Tuner controller (kernel 1; its hints computed inside the
    timed call, once per image), and diffusers' ControlNet pipeline on the same UNet, both with random
    non-zero weights and a random condition image."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from ldm_sce.sampling import sample
    from ldm_sce.tuners import Control, CSCTuner, SkipIdentity, Tuning

    unet = model.model.diffusion_model
    p = next(unet.parameters())
    ctrl = CSCTuner(unet.cfg, kernel=1).to(p.device, p.dtype)
    tuned = unet.attach_sc_tuners()
    plain = [SkipIdentity() for _ in tuned]
    for q in [*unet.tuners.parameters(), *ctrl.parameters()]:
        q.data.normal_(0, 0.02)  # non-zero: nothing may be skipped
    model.requires_grad_(False)
    side = latent * 8
    cond = torch.rand(1, 3, side, side).to(p.device, p.dtype)

    def ours(sc: bool, csc: bool) -> torch.Tensor:
        unet.replace_tuners(tuned if sc else plain)
        unet.replace_controllers([ctrl] if csc else [])
        tuning = Tuning(control=Control([ctrl.hints(cond)], [1.0])) if csc else None
        return sample(model, c, uc, x_T=x_t, steps=steps, seed=0, tuning=tuning)

    cnet = ControlNetModel.from_unet(pipe.unet).to(p.device, p.dtype).eval().requires_grad_(False)
    cpipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cnet)
    cpipe.set_progress_bar_config(disable=True)

    def theirs() -> torch.Tensor:
        return cpipe(
            prompt_embeds=c,
            negative_prompt_embeds=uc,
            latents=x_t.clone(),
            image=cond,
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="latent",
            height=side,
            width=side,
        ).images

    return {
        "ldm_sce": lambda: ours(False, False),
        "ldm_sce+sc": lambda: ours(True, False),
        "ldm_sce+sc+csc1": lambda: ours(True, True),
        "diffusers+controlnet": theirs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add(name: str, help: str, runs: int, batch: int | None = 2, res: str = "latent", count: str = "--runs"):
        p = sub.add_parser(name, help=help)
        p.add_argument("--preset", "--base", dest="preset", default="sd-v1", choices=sorted(PRESETS))
        if batch is not None:
            p.add_argument("--batch", type=int, default=batch)
        if res == "latent":
            p.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
        else:
            p.add_argument("--res", type=int, default=256, help="image side (latent = res / 8)")
        p.add_argument(count, type=int, default=runs)
        p.add_argument("--json", type=Path, help="also write the result here")
        return p

    add("unet", "UNet forward: ldm_sce vs diffusers on the same random weights", runs=5)
    sub.choices["unet"].add_argument(
        "--separate", action="store_true", help="each model in its own process (own random weights; no parity check)"
    )
    sub.choices["unet"].add_argument(
        "--compile", choices=("none", "blocks", "full"), default="none", help="also both UNets torch.compile'd"
    )
    add("unet-one", "one implementation's UNet forward times (used by unet --separate)", runs=2)
    sub.choices["unet-one"].add_argument("--impl", choices=("ldm_sce", "diffusers"), required=True)
    add("infer", "UNet forward without / with SC-Tuners and CSC-Tuner controllers", runs=3)
    sub.choices["infer"].add_argument("--peers", action="store_true", help="also diffusers' UNet and UNet + ControlNet")
    sub.choices["infer"].add_argument(
        "--lora-rank", type=int, default=0, help="also a LoRA of this rank on the fly, and two SC-Tuner sets"
    )
    add("step", "seconds per DDIM+CFG sampling step: ldm_sce.sample vs diffusers' pipeline", runs=2, batch=None)
    sub.choices["step"].add_argument("--steps", type=int, default=3)
    sub.choices["step"].add_argument(
        "--scedit", action="store_true", help="also with SC-Tuners + a CSC-Tuner, and diffusers with a ControlNet"
    )
    for name in ("train", "train-one"):
        p = add(
            name, "training step memory and time per method (timed steps after one warm-up)", 2, 1, "res", "--steps"
        )
        p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the decoder blocks")
        p.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="autocast (fp16: a grad scaler)")
        p.add_argument("--frozen-dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the frozen base")
        p.add_argument("--methods" if name == "train" else "--method", default="sc,lora,full,csc1,csc3")
    import bench_data
    import bench_gpu

    bench_data.add_arguments(sub.add_parser("stream", help="peak memory of training streamed from tar shards"))
    bench_gpu.add_arguments(sub.add_parser("gpu", help="the GPU benchmark in one command (--tiny: a CPU dry run)"))
    one = sub.add_parser("gpu-one", help="one job of `gpu` (used by it)")
    one.add_argument("--job", choices=bench_gpu.JOBS, required=True)
    one.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    if args.cmd == "train-one":
        import bench_train

        print(json.dumps(bench_train.train_one(args)))
        return
    if args.cmd == "unet-one":
        print(json.dumps(unet_one(args)))
        return
    if args.cmd == "stream":
        import bench_data

        print(f"streamed toy training, {args.steps} steps of batch {args.batch}, {machine()}")
        bench_data.run(args)
        return
    if args.cmd in ("gpu", "gpu-one"):
        import bench_gpu

        if args.cmd == "gpu-one":
            print(json.dumps(bench_gpu.run_job(args.job, args.tiny)))
        else:
            bench_gpu.main(args)
        return
    import bench_train

    result = {"unet": bench_unet, "infer": bench_infer, "step": bench_step, "train": bench_train.bench_train}[args.cmd](
        args
    )
    if args.cmd == "train":
        print(
            f"train step {args.preset} {args.res}px B={args.batch} {args.precision} AdamW, grad_ckpt={args.grad_ckpt}, {result['machine']}"
        )
        for r in result["rows"]:
            if "error" in r:
                print(f"  {r['method']:10s} failed: {r['error']}")
            else:
                print(
                    f"  {r['method']:10s} params {r['trainable_params'] / 1e6:8.2f}M  peak {r['peak_mb']:8.0f} MB  "
                    f"overhead {r['overhead_mb']:8.0f} MB  step {r['step_seconds_median']:6.2f} s  "
                    f"(its forward {r['step_forward_seconds_median']:6.2f} s; no-grad forward "
                    f"{r['forward_seconds_median']:6.2f} s)"
                )
        for k, v in result["ratios"].items():
            print(f"  {k}: {v:.2f}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return
    med = result.get("seconds_median") or result["seconds_per_step_median"]
    print(f"{result['bench']} {args.preset} {args.latent}x{args.latent} latent, fp32 on {result['machine']}")
    for name, s in med.items():
        print(f"  {name:20s} {s:8.3f} s  (median of {args.runs})")
    if "overhead_vs_base" in result:
        for name, o in result["overhead_vs_base"].items():
            iso = result["isolated_overhead_vs_base"].get(name)
            edits = f"   isolated skip edits {100 * iso:+.2f}% of the base forward" if iso is not None else ""
            print(f"  {name:20s} end-to-end {100 * o:+.1f}%{edits}")
        print(f"  hints, once per image: {result['hint_seconds_once_per_image']}")
    else:
        ratio, diff = result["ratio_ldm_sce_over_diffusers"], result["max_abs_diff"]
        parity = "separate processes, own weights" if diff is None else f"max|diff| = {diff:.2e}"
        print(f"  ratio ldm_sce / diffusers = {ratio:.3f}   {parity}")
        if getattr(args, "scedit", False):
            print(
                "  vs own base: " + ", ".join(f"{k} {100 * v:+.1f}%" for k, v in result["overhead_vs_own_base"].items())
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
