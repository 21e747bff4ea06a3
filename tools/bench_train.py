"""`bench.py train`: one training step (forward, MSE loss, backward, AdamW step) per method, each in its own
process so peaks do not mix; see bench.py's docstring for what is measured."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import bench  # first: puts the project root on sys.path
import torch

from ldm_sce.config import ModelConfig
from ldm_sce.unet import UNetModel


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# bench method -> the training method (ldm_sce.methods) it measures; lora_peft and controlnet are diffusers'
OWN_METHODS = {
    "sc": {"name": "sc"},
    "sc_hires": {"name": "sc"},  # skips: the full-resolution decoder ones, set from the config below
    "csc1": {"name": "csc", "kernel": 1},
    "csc3": {"name": "csc", "kernel": 3},
    "lora": {"name": "lora", "lora_rank": 64},
    "full": {"name": "full"},
}


def train_one(args) -> dict:
    """One method's training steps in this process (called by `bench_train` in a fresh process)."""
    from ldm_sce.methods import MethodSection, build_method

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench.PRESETS[args.preset]
    if args.method in ("lora_peft", "controlnet"):
        return train_one_diffusers(args, dev)
    if args.method not in OWN_METHODS:
        raise SystemExit(
            f"unknown method {args.method}; choose from {', '.join([*OWN_METHODS, 'lora_peft', 'controlnet'])}"
        )
    section = MethodSection(**OWN_METHODS[args.method])
    if args.method == "sc_hires":  # backward stops after the blocks of the full-resolution skips
        section.skips = [m for m, ds in enumerate(cfg.unet.skip_factors) if ds == 1]
    unet = bench.randomize(UNetModel(cfg.unet)).to(dev).requires_grad_(False)
    if args.frozen_dtype != "fp32":  # the frozen base in half precision; what trains stays fp32
        if args.method == "full":
            raise SystemExit("--frozen-dtype: method full trains the base itself")
        unet.to(bench.DTYPES[args.frozen_dtype])
    method = build_method(section)
    params = method.attach(unet)
    unet.checkpoint_decoder = args.grad_ckpt

    def forward(x, t, ctx, cond, extra):
        return unet(x, t, ctx, method.tuning(cond), **extra[0])

    return _timed_training(args, dev, params, forward, cfg)


def _timed_training(args, dev, params, forward, cfg: ModelConfig) -> dict:
    """AdamW steps of MSE(forward(x, t, ctx, cond), target) on random inputs: peak memory, overhead over
    the memory held before the first step, and step times after one warm-up step."""
    import resource

    import torch.nn.functional as F

    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    autocast = torch.autocast(dev.type, dtype=bench.DTYPES[args.precision], enabled=args.precision != "fp32")
    scaler = torch.amp.GradScaler(dev.type, enabled=args.precision == "fp16")
    x, t, ctx, extra_ours, extra_theirs = bench.unet_inputs(cfg, args.batch, cfg.latent_size(args.res, args.res), dev)
    extra = (extra_ours, extra_theirs)
    target = torch.randn_like(x)
    cond = torch.rand(args.batch, 3, *cfg.condition_size(args.res, args.res), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated() / 2**20
    else:
        loaded = _rss_mb()

    times, fwd_times = [], []
    for i in range(args.steps + 1):  # the first step is a warm-up (and allocates the optimiser state)
        start = time.perf_counter()
        with autocast:
            loss = F.mse_loss(forward(x, t, ctx, cond, extra).float(), target)
        bench.sync()
        fwd = time.perf_counter() - start
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        bench.sync()
        if i:
            times.append(time.perf_counter() - start)
            fwd_times.append(fwd)
    forward_times = []  # the forward alone, no autograd: the floor of any method's step
    with torch.no_grad(), autocast:
        for _ in range(args.steps):
            start = time.perf_counter()
            forward(x, t, ctx, cond, extra)
            bench.sync()
            forward_times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "method": args.method,
        "batch": args.batch,
        "precision": args.precision,
        "frozen_dtype": args.frozen_dtype,
        "trainable_params": sum(p.numel() for p in params),
        "loaded_mb": loaded,
        "peak_mb": peak,
        "overhead_mb": peak - loaded,
        "step_seconds_median": statistics.median(times),
        "step_seconds_all": times,
        "step_forward_seconds_median": statistics.median(fwd_times),  # the step's forward (with autograd)
        "forward_seconds_median": statistics.median(forward_times),  # a forward without autograd
    }


def train_one_diffusers(args, dev) -> dict:
    """What users would run instead: peft's LoRA (rank 64, q/k/v/out and the feed-forward, as ours) on
    diffusers' UNet, or a diffusers ControlNet. The UNet has the same configuration as ours, with random
    weights built directly (nothing else allocated first, so the memory baseline is clean)."""

    from diffusers import UNet2DConditionModel

    cfg = bench.PRESETS[args.preset]
    unet = UNet2DConditionModel(**bench.diffusers_unet_config(cfg)).to(dev, bench.DTYPES[args.frozen_dtype])
    controlnet = None
    if args.method == "lora_peft":
        from peft import LoraConfig

        targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
        unet.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=targets))
        params = [p for n, p in unet.named_parameters() if "lora" in n]
        for p in params:  # trainable weights in fp32 (diffusers' training scripts: cast_training_params)
            p.data = p.data.float()
    else:
        from diffusers import ControlNetModel

        controlnet = ControlNetModel.from_unet(unet).to(dev, torch.float32).train()
        params = list(controlnet.parameters())
    unet.requires_grad_(False)

    def forward(x, t, ctx, cond, extra):
        if controlnet is None:
            return unet(x, t, ctx, **extra[1]).sample
        down, mid = controlnet(x, t, ctx, controlnet_cond=cond, return_dict=False, **extra[1])
        return unet(
            x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid, **extra[1]
        ).sample

    return _timed_training(args, dev, params, forward, cfg)


def bench_train(args) -> dict:
    import subprocess

    rows = []
    for method in args.methods.split(","):
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("bench.py")),
            "train-one",
            "--method",
            method,
            "--preset",
            args.preset,
            "--res",
            str(args.res),
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--precision",
            args.precision,
            "--frozen-dtype",
            args.frozen_dtype,
        ] + (["--grad-ckpt"] if args.grad_ckpt else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            rows.append(
                {
                    "method": method,
                    "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                }
            )
        else:
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    ok = {r["method"]: r for r in rows if "error" not in r}
    ratios = {}
    pairs = (("sc", "lora"), ("sc", "lora_peft"), ("sc_hires", "lora_peft"), ("sc", "full"), ("csc1", "controlnet"))
    for mine, ref in pairs:
        if mine in ok and ref in ok:
            ratios[f"{mine}/{ref} overhead"] = ok[mine]["overhead_mb"] / ok[ref]["overhead_mb"]
            ratios[f"{mine}/{ref} time"] = ok[mine]["step_seconds_median"] / ok[ref]["step_seconds_median"]
    return {
        "bench": "train_step",
        "preset": args.preset,
        "res": args.res,
        "batch": args.batch,
        "grad_ckpt": args.grad_ckpt,
        "precision": args.precision,
        "optimizer": "AdamW",
        "attention": "SDPA",
        "machine": bench.machine(),
        "rows": rows,
        "ratios": ratios,
    }
