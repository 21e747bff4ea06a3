"""Every tools/bench.py subcommand, run as users run it, on a tiny config: it finishes, prints its table, and
its JSON holds the right structure and the values that do not depend on timing (parameter counts, parity)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_path, *args, preset="tiny-sd1"):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), *map(str, args), "--preset", preset, "--json", out],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_unet(tmp_path):
    result, stdout = bench(tmp_path, "unet", "--latent", 8, "--runs", 1, "--batch", 1)
    assert set(result["seconds_median"]) == {"ldm_sce", "diffusers"} and "ratio ldm_sce / diffusers" in stdout
    assert result["max_abs_diff"] < 1e-5  # the same random weights in both: parity, outputs ~1
    assert "overhead_vs_own_base" not in result


@pytest.mark.slow
def test_infer_with_peers(tmp_path):
    result, _ = bench(tmp_path, "infer", "--latent", 8, "--runs", 1, "--batch", 1, "--peers", "--lora-rank", 2)
    names = {"base", "sc", "csc1", "csc3", "sc+csc1", "diffusers", "diffusers+controlnet", "lora2", "sc+lora2", "sc_x2"}
    assert set(result["seconds_median"]) == names
    assert {"lora2", "sc_x2"} <= set(result["isolated_edit_seconds"])
    assert result["overhead_vs_base"]["base"] == 0.0 and result["isolated_edit_seconds"]["base"] >= 0
    assert set(result["hint_seconds_once_per_image"]) == {"csc1", "csc3"}


@pytest.mark.slow
def test_step_with_scedit(tmp_path):
    result, _ = bench(tmp_path, "step", "--latent", 8, "--runs", 1, "--steps", 2, "--scedit")
    tuned = {"ldm_sce+sc", "ldm_sce+sc+csc1", "diffusers+controlnet"}
    assert set(result["seconds_per_step_median"]) == {"ldm_sce", "diffusers"} | tuned
    assert set(result["overhead_vs_own_base"]) == tuned
    assert result["max_abs_diff"] < 1e-4  # our DDIM loop vs diffusers' pipeline on the same UNet


@pytest.mark.slow
def test_train_every_method(tmp_path):
    """`bench.py train` on the methods the GPU suite's dry run does not train (csc1, controlnet and full: there,
    with their parameter counts checked), plus sc and lora_peft for the ratios."""
    methods = "sc,sc_hires,csc3,lora,lora_peft"
    result, stdout = bench(tmp_path, "train", "--res", 16, "--steps", 1, "--methods", methods)  # an 8x8 latent
    rows = {r["method"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r], rows
    params = {name: r["trainable_params"] for name, r in rows.items()}
    # tiny-sd1: SC-Tuners d -> d on 9 skips (4 x 32 + 5 x 64 channels), 3 of them at full resolution; a
    # kernel-3 controller; rank-64 LoRA (ours = peft's)
    assert params["sc"] == 4 * (2 * 32 * 32 + 32 + 32) + 5 * (2 * 64 * 64 + 64 + 64) == 50_048
    assert params["sc_hires"] == 3 * (2 * 32 * 32 + 32 + 32) == 6_336
    assert params["csc3"] == 666_640
    assert params["lora"] == params["lora_peft"] == 1_019_904
    assert {"sc/lora_peft overhead", "sc/lora_peft time", "sc_hires/lora_peft overhead"} <= set(result["ratios"])
    assert "sc_hires" in stdout


@pytest.mark.slow
def test_sdxl_unet_in_separate_processes_and_training_methods(tmp_path):
    result, stdout = bench(tmp_path, "unet", "--latent", 8, "--runs", 1, "--batch", 1, "--separate", preset="tiny-sdxl")
    assert result["separate_processes"] and result["max_abs_diff"] is None and "own weights" in stdout
    result, _ = bench(
        tmp_path, "train", "--res", 16, "--steps", 1, "--methods", "sc,lora,lora_peft", preset="tiny-sdxl"
    )
    params = {r["method"]: r["trainable_params"] for r in result["rows"]}
    # tiny-sdxl has tiny-sd1's skip channels; ours and peft's LoRA put rank 64 on the same linears
    assert params["sc"] == 50_048 and params["lora"] == params["lora_peft"] > 0


@pytest.mark.slow
def test_gpu_suite_dry_run_on_tiny_configs(tmp_path):
    """`bench.py gpu --tiny`: every job of the GPU benchmark, on the CPU in the GPU run's fp16, ends with
    figures (no error, no timeout) within its budget, and the markdown table carries the targets' ratios."""
    md, out = tmp_path / "gpu.md", tmp_path / "gpu.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "gpu",
            "--tiny",
            "--budget",
            "400",
            "--json",
            str(out),
            "--md",
            str(md),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    from bench_gpu import JOBS

    assert list(report["jobs"]) == JOBS and report["total_seconds"] < 400
    bad = {k: v for k, v in report["jobs"].items() if {"error", "timeout", "skipped"} & set(v)}
    assert not bad, bad
    for job in ("infer_sd15", "infer_sdxl"):  # ours against diffusers' pipelines on the same weights, in fp16
        result = report["jobs"][job]
        assert result["dtype"] == "torch.float16"  # the GPU run's dtype paths, taken on the CPU
        assert result["max_abs_diff"] <= 4e-3 * result["max_abs"]  # 4 fp16 ulps of the largest value
    smoke = report["jobs"]["smoke_cli"]  # txt2img, fp16 training over the fp32 base, its tuner sampled
    assert len(smoke["train_losses"]) == 10 and smoke["txt2img_with_tuner_seconds"] > 0
    assert {"checkpoints/step-000005.pt", "sc_tuner.safetensors", "validation/step-000010.png"} <= set(
        smoke["train_outputs"]
    )
    rows = [row for job in report["jobs"].values() for row in job.get("rows", [])]
    params = {
        (row["method"], job): row["trainable_params"] for job, r in report["jobs"].items() for row in r.get("rows", [])
    }
    # tiny-sd1: a kernel-1 controller, diffusers' ControlNet, the whole UNet (bench.py train checks the others)
    assert params["csc1", "train_sd15_csc1"] == 429_072 and params["full", "train_sd15_full"] == 2_164_452
    assert params["controlnet", "train_sd15_controlnet"] > params["csc1", "train_sd15_csc1"]
    assert {(row["method"], row["precision"], row["frozen_dtype"]) for row in rows} == {
        *((m, "fp16", "fp16") for m in ("sc", "lora_peft", "csc1", "controlnet")),
        ("full", "fp16", "fp32"),  # fp16 autocast over the fp32 weights it trains
    }
    batches = {r["batch"] for r in report["jobs"]["train_sd15_sc"]["rows"]}
    assert batches == {1, 2} and "sc / lora_peft overhead" in md.read_text()


@pytest.mark.slow
def test_stream(tmp_path):
    """`bench.py stream`: shards written, a streamed toy training per dataset size, its figures recorded."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "stream", "--samples", "30,90", "--per-shard", "20"]
    r = subprocess.run([*cmd, "--steps", "2", "--batch", "2", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["samples"], row["shards"]) for row in rows] == [(30, 2), (90, 5)]
    assert all(row["peak_rss_mb"] > 0 and row["median_step_seconds"] > 0 for row in rows)
