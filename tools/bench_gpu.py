"""`python tools/bench.py gpu`: the GPU benchmark in one command (`--tiny`: the same code on tiny configs, on
the CPU, in seconds; a test runs it, so a GPU window is never spent on a typo).

Every job runs in its own process (memory peaks must not mix), in this order, each with what is left of the
time budget as its timeout (`--budget`, default 450 s; a job that does not start in time is reported as
skipped, one that runs out of it as timed out), so the command ends within the budget on any machine:

0. smoke_cli: the user's commands on the device with the embedded toy model (tools/txt2img.py in autocast and
   full precision, a 10-step fp16 SC-Tuner run of tools/train.py over the fp32 base, its tuner sampled);
1. infer_sd15: 50-step 512px SD1.5 DDIM with CFG 7.5, one image: ldm_sce base, + 12 SC-Tuners, + SC-Tuners and
   a CSC-Tuner; diffusers' pipeline and diffusers + ControlNet, on the same weights (fp16 on a GPU);
2. train_sd15_{sc,lora_peft,csc1,controlnet,full}: training steps at 512px, batch 1 and then 8, fp16 autocast
   with fp32 trainable weights (the frozen base in fp16 but for `full`), AdamW; peak memory and step time;
3. infer_sdxl: 30-step 1024px SDXL Euler with CFG 5: ldm_sce (sgm's schedule) vs diffusers' SDXL pipeline;
4. train_sdxl_{sc,lora_peft,sc_ckpt}: SDXL at 1024px, batch 1, frozen base in fp16; sc_ckpt with decoder
   checkpointing (the low-memory setting).

Weights are random (time and memory do not depend on their values); parity of the same computations is the
tests' job (max |ours - diffusers| is still reported for the sampling jobs). Writes JSON and a markdown
table (`--json`, `--md`)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench
import bench_train
import torch

SIZES = {  # (preset, image side, sampling steps, training batches)
    False: {"sd15": ("sd-v1", 512, 50, (1, 8)), "sdxl": ("sdxl-base", 1024, 30, (1,))},
    True: {"sd15": ("tiny-sd1", 16, 3, (1, 2)), "sdxl": ("tiny-sdxl", 16, 3, (1,))},
}
JOBS = [
    "smoke_cli",
    "infer_sd15",
    "train_sd15_sc",
    "train_sd15_lora_peft",
    "train_sd15_csc1",
    "train_sd15_controlnet",
    "train_sd15_full",
    "infer_sdxl",
    "train_sdxl_sc",
    "train_sdxl_lora_peft",
    "train_sdxl_sc_ckpt",
]


def _device(tiny: bool) -> tuple[torch.device, torch.dtype]:
    """The device and the precision: fp16 on CUDA, as users run it, and fp16 on the CPU too for the tiny dry
    run, so that it takes the GPU run's dtype paths (fp16 weights, fp16 autocast with fp32 trainable weights,
    the gradient scaler); a full-size run on a CPU stays fp32 (CPU fp16 kernels are slow)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float16 if tiny else torch.float32


def infer(family: str, tiny: bool) -> dict:
    preset, side, steps, _ = SIZES[tiny][family]
    dev, dtype = _device(tiny)
    latent = side // bench.PRESETS[preset].vae.downsample_factor
    if family == "sd15":
        runners, (diff, scale) = bench.sd_step_runners(preset, latent, steps, True, dev, dtype)
    else:
        runners, (diff, scale) = bench.sdxl_runners(preset, latent, steps, dev, dtype)
    with torch.inference_mode():
        times = bench.alternate(runners, 1 if tiny else 3)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "preset": preset,
        "side": side,
        "steps": steps,
        "dtype": str(dtype),
        "seconds_per_image": med,
        "seconds_all": times,
        "max_abs_diff": diff,
        "max_abs": scale,  # of our latent: half precision's round-off is relative to it
        "ratios": {
            f"{name} / {peer}": med[name] / med[peer]
            for name, peer in (("ldm_sce", "diffusers"), ("ldm_sce+sc+csc1", "diffusers+controlnet"))
            if name in med
        },
    }


def train(family: str, method: str, tiny: bool) -> dict:
    preset, side, _, batches = SIZES[tiny][family]
    dev, dtype = _device(tiny)
    grad_ckpt = method.endswith("_ckpt")
    method = method.removesuffix("_ckpt")
    precision = "fp16" if dtype == torch.float16 else "fp32"
    frozen = "fp32" if method == "full" else precision  # full fine-tuning trains the base: fp32 weights
    rows = []
    for batch in batches:
        args = argparse.Namespace(
            method=method,
            preset=preset,
            res=side,
            batch=batch,
            steps=1 if tiny else 3,
            grad_ckpt=grad_ckpt,
            precision=precision,
            frozen_dtype=frozen,
        )
        rows.append(bench_train.train_one(args))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"preset": preset, "side": side, "grad_ckpt": grad_ckpt, "rows": rows}


def smoke_cli(tiny: bool) -> dict:
    """What users run, on the device, with the embedded toy model: tools/txt2img.py in autocast and in full
    precision (their images compared), a 10-step SC-Tuner training run with tools/train.py in fp16 (a checkpoint
    at step 5, a validation grid at the end; its tuner then sampled with --tuner), each command in its own
    process. Never reads a real checkpoint."""
    import tempfile

    import numpy as np
    from PIL import Image

    dev, _ = _device(tiny)
    tools = Path(__file__).resolve().parent
    out: dict = {}

    def run(script: str, *args) -> float:
        start = time.perf_counter()
        r = subprocess.run([sys.executable, str(tools / script), *map(str, args)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{script} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        steps = 4 if tiny else 20
        common = ["--prompt", "a red circle", "--n_samples", 2, "--ddim_steps", steps, "--device", dev.type, "--quiet"]
        for precision in ("autocast", "full"):
            out[f"txt2img_{precision}_seconds"] = run(
                "txt2img.py", *common, "--precision", precision, "--outdir", tmp / precision
            )
        pixels = [np.asarray(Image.open(tmp / p / "samples" / "00000.png"), dtype=int) for p in ("autocast", "full")]
        out["txt2img_autocast_vs_full_max_pixel_diff"] = int(np.abs(pixels[0] - pixels[1]).max())
        out["txt2img_autocast_vs_full_mean_pixel_diff"] = float(np.abs(pixels[0] - pixels[1]).mean())
        data = tmp / "data"
        data.mkdir()
        rng = np.random.default_rng(0)
        for k in range(8):
            img = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 255, 3)))
            img.paste((220, 30, 30), tuple(int(v) for v in [*rng.integers(0, 30, 2), *rng.integers(34, 64, 2)]))
            img.save(data / f"{k}.png")
            (data / f"{k}.txt").write_text("a red square zqx style")
        run_dir = tmp / "train"
        config = {
            "model": {"ckpt": str(tools.parent / "weights" / "toy-shapes.safetensors")},
            "method": {"name": "sc"},
            "data": {"path": str(data), "resolution": 64},
            "optim": {"lr": 1e-3, "batch_size": 4, "max_steps": 10},
            "precision": "fp16",
            "output_dir": str(run_dir),
            "log_every": 1,
            "save_every": 5,  # a checkpoint written mid-run
            "validation": {"prompts": ["a red square zqx style"], "steps": 4},  # sampled at the end
        }
        (tmp / "train.yaml").write_text(json.dumps(config))  # JSON is YAML
        out["train_seconds"] = run("train.py", "--base", tmp / "train.yaml")
        rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        out["train_losses"] = [round(r["loss"], 4) for r in steps]
        out["train_step_seconds_median"] = statistics.median(r["step_time"] for r in steps[1:])
        out["train_cuda_max_mb"] = steps[-1].get("cuda_max_mb")
        out["train_outputs"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*.*") if p.is_file())
        tuner = run_dir / "sc_tuner.safetensors"
        out["txt2img_with_tuner_seconds"] = run("txt2img.py", *common, "--tuner", tuner, "--outdir", tmp / "tuned")
    out["device"] = dev.type
    return out


def run_job(name: str, tiny: bool) -> dict:
    if name == "smoke_cli":
        return smoke_cli(tiny)
    kind, family, *method = name.split("_", 2)
    return infer(family, tiny) if kind == "infer" else train(family, method[0], tiny)


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for name in args.jobs.split(",") if args.jobs else JOBS:
        left = args.budget - (time.perf_counter() - start)
        if left < 5:
            results[name] = {"skipped": f"the {args.budget:.0f} s budget was spent"}
            continue
        cmd = [sys.executable, str(Path(__file__).with_name("bench.py")), "gpu-one", "--job", name]
        try:
            r = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True, timeout=left)
            results[name] = (
                json.loads(r.stdout.strip().splitlines()[-1])
                if r.returncode == 0
                else {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
            )
        except subprocess.TimeoutExpired:
            results[name] = {"timeout": f"stopped after {left:.0f} s, at the end of the budget"}
        results[name]["wall_seconds"] = round(time.perf_counter() - start, 1)
        print(f"{name}: {json.dumps(results[name])[:300]}", flush=True)
    report = {
        "machine": bench.machine(),
        "tiny": args.tiny,
        "budget_seconds": args.budget,
        "total_seconds": time.perf_counter() - start,
        "jobs": results,
        "summary": summary(results),
    }
    text = markdown(report)
    print(text)
    for path, content in ((args.json, json.dumps(report, indent=1)), (args.md, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)


def _train_row(results: dict, job: str, batch: int) -> dict | None:
    rows = results.get(job, {}).get("rows", [])
    return next((r for r in rows if r["batch"] == batch and "error" not in r), None)


def summary(results: dict) -> dict:
    """The issue's targets: sampling <= 0.9x diffusers; SC-Tuner training overhead at batch 8 <= 0.45x peft
    LoRA's; SC-Tuner step time <= 0.6x peft LoRA's (the largest batch measured)."""
    out = {}
    for job in ("infer_sd15", "infer_sdxl"):
        ratio = results.get(job, {}).get("ratios", {}).get("ldm_sce / diffusers")
        if ratio is not None:
            out[f"{job}: ldm_sce / diffusers time (target <= 0.9)"] = ratio
    batches = [r["batch"] for r in results.get("train_sd15_sc", {}).get("rows", [])]
    for batch in batches[-1:]:
        sc, lora = _train_row(results, "train_sd15_sc", batch), _train_row(results, "train_sd15_lora_peft", batch)
        if sc and lora:
            out[f"sd15 B={batch}: sc / lora_peft overhead (target <= 0.45)"] = sc["overhead_mb"] / lora["overhead_mb"]
            out[f"sd15 B={batch}: sc / lora_peft step time (target <= 0.6)"] = (
                sc["step_seconds_median"] / lora["step_seconds_median"]
            )
    return out


def markdown(report: dict) -> str:
    lines = [
        f"GPU benchmark{' (tiny dry run)' if report['tiny'] else ''} on {report['machine']['device']}, "
        f"torch {report['machine']['torch']}, {report['total_seconds']:.0f} s of a {report['budget_seconds']:.0f} s "
        "budget",
        "",
        "| job | what | ldm_sce | peer | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in report["jobs"].items():
        if "rows" in r:
            for row in r["rows"]:
                lines.append(
                    f"| {name} | B={row['batch']} peak MB / overhead MB / step s | {row['peak_mb']:.0f} / "
                    f"{row['overhead_mb']:.0f} / {row['step_seconds_median']:.3f} | | |"
                )
        elif "seconds_per_image" in r:
            med = r["seconds_per_image"]
            for ours, peer in (
                ("ldm_sce", "diffusers"),
                ("ldm_sce+sc", None),
                ("ldm_sce+sc+csc1", "diffusers+controlnet"),
            ):
                if ours in med:
                    theirs = med.get(peer) if peer else None
                    ratio = f"{med[ours] / theirs:.3f}" if theirs else ""
                    lines.append(
                        f"| {name} | {ours} s per image | {med[ours]:.3f} | "
                        f"{'' if theirs is None else f'{theirs:.3f}'} | {ratio} |"
                    )
        else:
            lines.append(f"| {name} | {', '.join(f'{k}: {v}' for k, v in r.items())} | | | |")
    lines += ["", *(f"- {k}: {v:.3f}" for k, v in report["summary"].items())]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a dry run of the same code")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    p.add_argument("--jobs", help=f"comma-separated subset of {','.join(JOBS)}")
    p.add_argument("--json", type=Path, default=Path("outputs/bench_gpu.json"))
    p.add_argument("--md", type=Path, default=Path("outputs/bench_gpu.md"))
