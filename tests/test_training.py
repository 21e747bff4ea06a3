"""tools/train.py and ldm_sce.training on a tiny checkpoint and images the tests make."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import train_config as write_config
from PIL import Image
from safetensors.torch import load_file

from ldm_sce import ConfigError
from ldm_sce.training import Trainer, load_train_config

ROOT = Path(__file__).resolve().parents[1]


def run_train(*args, env=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), *map(str, args)], capture_output=True, text=True, env=env
    )


def losses(out):
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def fixed_batch_loss(trainer, micro=10_000):
    """Loss on one fixed batch (its images, timesteps and noise are fixed by the micro-batch index)."""
    batch = trainer._prepare(micro)
    with torch.no_grad():
        return trainer.step_module(batch["x_t"], batch["t"], batch["c"], batch["target"], batch.get("cond")).item()


@pytest.mark.slow
def test_sc_training_lowers_the_loss(tiny_ckpts, dataset, tmp_path):
    cfg = load_train_config(write_config(tmp_path, tiny_ckpts["sd1"][1], dataset, optim={"max_steps": 100, "lr": 1e-2}))
    trainer = Trainer(cfg)
    before = fixed_batch_loss(trainer)
    trainer.train()
    after = fixed_batch_loss(trainer)
    assert after < 0.9 * before, (before, after)  # measured: 1.008 -> 0.842


@pytest.mark.slow
def test_train_cli_exports_a_tuner_txt2img_loads(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    cfg = write_config(
        tmp_path,
        ckpt,
        dataset,
        optim={"max_steps": 4},
        validation={"every": 2, "prompts": ["<sce> a red square"], "seeds": [0, 1], "steps": 3},
    )
    r = run_train("--base", cfg)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert losses(out)[:2] == pytest.approx([1.0159438, 1.0278202], rel=1e-4)  # as tests/test_methods.py
    assert Image.open(out / "validation" / "step-000004.png").size == (2 * 16, 16)
    assert (out / "validation" / "step-000002.png").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["step-000004.pt"]
    tuner = out / "sc_tuner.safetensors"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "txt2img.py"),
            "--ckpt",
            str(ckpt),
            "--config",
            "tiny-sd1",
            "--tuner",
            str(tuner),
            "--H",
            "16",
            "--W",
            "16",
            "--ddim_steps",
            "2",
            "--outdir",
            str(tmp_path / "gen"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "SC-Tuner: sc_tuner" in Image.open(tmp_path / "gen" / "samples" / "00000.png").text["parameters"]


def test_resume_is_bitwise_exact(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    straight = tmp_path / "a"
    straight.mkdir()
    cfg = load_train_config(write_config(straight, ckpt, dataset, optim={"max_steps": 6}, save_every=3))
    Trainer(cfg).train()
    resumed = tmp_path / "b"
    resumed.mkdir()
    cfg_b = load_train_config(write_config(resumed, ckpt, dataset, optim={"max_steps": 3}, save_every=3))
    Trainer(cfg_b).train()  # stops at step 3 (as if interrupted after its checkpoint)
    cfg_b.optim.max_steps = 6
    Trainer(cfg_b, resume="latest").train()
    a = load_file(straight / "out" / "sc_tuner.safetensors")
    b = load_file(resumed / "out" / "sc_tuner.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "ln2" in k)  # it did train


def test_cache_gives_the_same_training(tiny_ckpts, dataset, tmp_path):
    results = []
    for cache in (False, True):
        run_dir = tmp_path / str(cache)
        run_dir.mkdir()
        cfg = load_train_config(
            write_config(
                run_dir,
                tiny_ckpts["sd1"][1],
                dataset,
                optim={"max_steps": 4},
                data={"cache": cache, "caption_dropout": 0.3},
            )
        )
        trainer = Trainer(cfg)
        results.append(load_file(trainer.train()))
        assert len(trainer._posteriors) == (8 if cache else 0)
    for k in results[0]:  # text features batched vs one by one: round-off only
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-6)


def test_corrupt_image_is_skipped_and_counted(tiny_ckpts, dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in dataset.iterdir():
        (data / p.name).write_bytes(p.read_bytes())
    (data / "99.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "99.txt").write_text("broken")
    cfg = load_train_config(write_config(tmp_path, tiny_ckpts["sd1"][1], data, optim={"batch_size": 9, "max_steps": 2}))
    trainer = Trainer(cfg)
    trainer.train()
    assert [p.name for p in trainer.data.bad] == ["99.png"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    # the 8 readable images of each 9-slot batch, weighted 8/9 (stored values of this run)
    assert [r["bad_images"] for r in rows] == [1, 1]
    assert [r["loss"] for r in rows] == pytest.approx([0.8575647, 0.9121362], rel=1e-4)


def test_shipped_training_configs_validate(tiny_ckpts, dataset, tmp_path):
    # the paper's settings (tab. 4): AdamW lr 5e-5, fp16; few-shot t2i batch 8 for 1,500 steps (SDXL: scepter's); controllers
    # kernel 3 (the released ones), batch 64 for 100k steps
    expected = {
        "sd15_512_sce_t2i": ("sc", 512, 8, 1500, None),
        "sd21_768_sce_t2i": ("sc", 768, 8, 1500, None),
        "sd15_512_sce_ctr_hed": ("csc", 512, 64, 100_000, "raw"),
        "sd21_768_sce_ctr_canny": ("csc", 768, 64, 100_000, "canny"),
        "sdxl_1024_sce_t2i": ("sc", 1024, 1, 2000, None),  # scepter's SDXL style run: batch 1, 2,000 steps
        "sdxl_1024_sce_ctr_canny": ("csc", 1024, 64, 100_000, "canny"),
    }
    for name, (method, res, batch, steps, condition) in expected.items():
        cfg = load_train_config(ROOT / "configs" / "train" / f"{name}.yaml")
        assert (cfg.method.name, cfg.data.resolution, cfg.optim.batch_size, cfg.optim.max_steps) == (
            method,
            res,
            batch,
            steps,
        )
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.precision, cfg.method.condition) == (
            5e-5,
            0.01,
            "fp16",
            condition,
        )
        assert cfg.method.kernel == (3 if method == "csc" else 1)
    photos = load_train_config(ROOT / "configs" / "train" / "sd15_512_photos_text_sce.yaml")  # the photo-set example
    assert (photos.method.text_lora_rank, photos.min_snr_gamma, photos.ema.decay, photos.data.keep_tokens) == (
        256,
        5.0,
        0.999,
        1,
    )
    assert {p.stem for p in (ROOT / "configs" / "train").glob("*.yaml")} == {
        *expected,
        "tiny_sc",
        photos.output_dir.split("/")[-1],
    }
    tiny = load_train_config(
        ROOT / "configs" / "train" / "tiny_sc.yaml",
        [
            f"model.ckpt={tiny_ckpts['sd1'][1]}",
            f"data.path={dataset}",
            f"output_dir={tmp_path / 'out'}",
            "optim.max_steps=2",
        ],
    )
    assert Trainer(tiny).train().name == "sc_tuner.safetensors"


def test_config_errors_name_the_problem(tiny_ckpts, dataset, tmp_path):
    path = write_config(tmp_path, tiny_ckpts["sd1"][1], dataset)
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(path, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="method.name"):
        load_train_config(path, ["method.name=dreambooth"])
    with pytest.raises(ConfigError, match="needs method.condition"):
        load_train_config(path, ["method.name=csc"])
    assert load_train_config(path, ["optim.lr=1e-4"]).optim.lr == 1e-4
    assert load_train_config(path, ["data.trigger="]).data.trigger == ""
    r = run_train("--base", path, "optim.batch_sise=2")
    assert r.returncode == 2 and "batch_sise" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    results = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        run_dir.mkdir()
        # Adam's step is ~lr * sign(g): where g is 0 up to round-off (the all-reduce changes it), the sign is
        # a coin flip. With eps >> |g| the update is linear in g, so round-off stays round-off.
        cfg = write_config(run_dir, ckpt, dataset, optim={"max_steps": 3, "batch_size": 4, "eps": 1.0, "lr": 0.5})
        if n == 1:  # one process is no DDP at all: the trainer in this process
            Trainer(load_train_config(cfg)).train()
            results[1] = load_file(run_dir / "out" / "sc_tuner.safetensors")
            continue
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={n}",
                str(ROOT / "tools" / "train.py"),
                "--base",
                str(cfg),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        results[n] = load_file(run_dir / "out" / "sc_tuner.safetensors")
        if n == 2:
            rows = [json.loads(x) for x in (run_dir / "out" / "log.jsonl").read_text().splitlines()]
            assert any(row.get("ranks_agree") and row["world_size"] == 2 for row in rows)
    moved = {k: results[1][k].abs().max().item() for k in results[1] if "ln2" in k}
    assert min(moved.values()) > 0 and max(moved.values()) > 1e-3, moved  # the tuners did train
    for k in results[1]:
        torch.testing.assert_close(results[2][k], results[1][k], rtol=1e-5, atol=1e-7)


def test_lr_schedule_warmup_then_cosine_to_zero():
    from ldm_sce.training import OptimSection, lr_factor

    o = OptimSection(warmup_steps=4, max_steps=104, lr_schedule="cosine")
    assert [lr_factor(s, o) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, o) == 1.0
    assert lr_factor(54, o) == pytest.approx(0.5)
    assert lr_factor(104, o) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, OptimSection(warmup_steps=4, max_steps=104)) == 1.0  # constant


def test_noise_offset_adds_one_normal_draw_per_image_and_channel(tiny_ckpts, dataset, tmp_path):
    """Offset noise: the noise (the eps target) moves by offset * N(0, 1), constant over each image's channel,
    and x_t by sqrt(1 - alphas_cumprod[t]) times that; everything else is the same draw."""
    path = write_config(tmp_path, tiny_ckpts["sd1"][1], dataset)
    plain = Trainer(load_train_config(path))._prepare(3)
    offset = Trainer(load_train_config(path, ["noise_offset=0.1"]))._prepare(3)
    torch.testing.assert_close(offset["t"], plain["t"], rtol=0, atol=0)
    shift = offset["target"] - plain["target"]
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert 0.01 < shift[:, :, 0, 0].abs().mean() < 0.3
    ac = Trainer(load_train_config(path)).model.alphas_cumprod[plain["t"]].view(-1, 1, 1, 1)
    torch.testing.assert_close(offset["x_t"] - plain["x_t"], (1 - ac).sqrt() * shift, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="noise_offset"):
        load_train_config(path, ["noise_offset=-1"])


def test_a_half_precision_frozen_base_trains_fp32_tuners(tiny_ckpts, dataset, tmp_path):
    """model.dtype bf16 (what a small GPU needs for SDXL): the frozen UNet and text encoder in bf16, the VAE and
    the SC-Tuners in fp32, under bf16 autocast; the first step's loss within 2% of the fp32 run's."""
    ckpt = tiny_ckpts["sd1"][1]
    for sub in "abc":
        (tmp_path / sub).mkdir()
    fp32 = Trainer(load_train_config(write_config(tmp_path / "a", ckpt, dataset, optim={"max_steps": 1})))
    cfg = load_train_config(
        write_config(tmp_path / "b", ckpt, dataset, optim={"max_steps": 1}, model={"dtype": "bf16"}, precision="bf16")
    )
    half = Trainer(cfg)
    unet = half.model.model.diffusion_model
    assert (
        unet.out[2].weight.dtype == torch.bfloat16
        and half.model.first_stage_model.encoder.conv_in.weight.dtype == torch.float32
    )
    assert {p.dtype for p in half.params} == {torch.float32}
    fp32.train()
    half.train()
    (a,), (b,) = losses(tmp_path / "a" / "out"), losses(tmp_path / "b" / "out")
    assert abs(a - b) < 0.02 * a
    with pytest.raises(ConfigError, match="needs precision fp16 or bf16"):
        load_train_config(write_config(tmp_path / "c", ckpt, dataset, model={"dtype": "fp16"}))


@pytest.mark.parametrize("method", ["sc", "csc"])
def test_fp16_autocast_over_an_fp32_base_trains(tiny_ckpts, dataset, tmp_path, method):
    """precision fp16 with the base kept in fp32 (the usual GPU setting; the gradient scaler on): the frozen
    convolutions' backward meets fp16 gradients and fp32 weights. Two steps run, the losses within 2% of
    the fp32 run's first, the tuner exported in fp32."""
    ckpt = tiny_ckpts["sd1"][1]
    extra = {"method": {"name": "csc", "condition": "canny"}} if method == "csc" else {}
    runs = {}
    for precision in ("fp32", "fp16"):
        (tmp_path / precision).mkdir()
        path = write_config(tmp_path / precision, ckpt, dataset, optim={"max_steps": 2}, precision=precision, **extra)
        trainer = Trainer(load_train_config(path))
        runs[precision] = (trainer.train(), losses(tmp_path / precision / "out"))
    (final, half), (_, full) = runs["fp16"], runs["fp32"]
    assert len(half) == 2 and abs(half[0] - full[0]) < 0.02 * full[0]
    assert {t.dtype for t in load_file(final).values()} == {torch.float32}
