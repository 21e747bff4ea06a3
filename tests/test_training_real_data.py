"""Training options for real photo sets (kohya's and diffusers' scripts have them): min-SNR-gamma loss
weighting, an EMA of the trainable weights, kohya's caption handling and folder repeats, and scepter Studio's
TEXT_SCE (a text-encoder LoRA trained with the SC-Tuners, one exported file)."""

import json

import numpy as np
import pytest
import torch
from helpers import train_config as write_config
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_sce import ConfigError, load_model
from ldm_sce.data import process_caption, scan
from ldm_sce.training import Trainer, load_train_config, min_snr_weights
from ldm_sce.tuner_files import load_tuner, read_tuner_file


def schedule(n=1000, start=0.00085, end=0.012):
    """alphas_cumprod of SD's scaled-linear schedule, computed here in numpy."""
    betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_weights_are_the_formula(tiny_ckpts, parameterization):
    model = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1", parameterization=parameterization)
    t = torch.tensor([0, 10, 100, 400, 999])
    a = schedule()[t.numpy()]
    snr = a / (1 - a)
    expected = np.minimum(snr, 5.0) / (snr + 1 if parameterization == "v" else snr)
    np.testing.assert_allclose(min_snr_weights(model, t, 5.0).numpy(), expected, rtol=1e-4)  # fp32 schedule
    assert expected[0] < 0.01 and expected[-1] == pytest.approx(
        1.0 if parameterization == "eps" else snr[-1] / (snr[-1] + 1)
    )


def test_min_snr_loss_is_the_weighted_mean_of_per_sample_losses(tiny_ckpts, dataset, tmp_path):
    path = write_config(tmp_path, tiny_ckpts["sd1"][1], dataset, min_snr_gamma=5.0)
    trainer = Trainer(load_train_config(path))
    b = trainer._prepare(4)
    with torch.no_grad():
        loss = trainer.step_module(b["x_t"], b["t"], b["c"], b["target"]).item()
        out = trainer.model.apply_model(b["x_t"], b["t"], b["c"])
    per = ((out - b["target"]) ** 2).mean(dim=(1, 2, 3))
    assert loss == pytest.approx((min_snr_weights(trainer.model, b["t"], 5.0) * per).mean().item(), rel=1e-6)


def test_zero_terminal_snr_schedule_is_diffusers_and_trains_a_v_model(tiny_ckpts, dataset, tmp_path):
    """Lin et al.'s rescaled schedule = diffusers' `rescale_zero_terminal_snr` on the same betas; SNR 0 at
    t = T; a v model trains on it (min-SNR weight 0 there), samples with DDIM; an eps model is refused."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    from ldm_sce.sampling import sample

    model = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1", parameterization="v").set_zero_terminal_snr()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0).float()
    torch.testing.assert_close(model.alphas_cumprod, expected, rtol=1e-6, atol=1e-9)
    assert model.alphas_cumprod[-1] == 0 and model.sqrt_alphas_cumprod[0] == pytest.approx(schedule()[0] ** 0.5)
    assert min_snr_weights(model, torch.tensor([999]), 5.0).item() == 0.0
    c = model.get_learned_conditioning(["a red square"])
    z = sample(model, c, model.get_unconditional_conditioning(c), steps=4, seed=0, spacing="trailing")
    assert torch.isfinite(z).all()
    with pytest.raises(ValueError, match="samples with ddim: euler"):
        sample(model, c, None, sampler="euler", steps=4, seed=0)
    with pytest.raises(ValueError, match="needs a v-prediction model"):
        load_model(tiny_ckpts["sd1"][1], config="tiny-sd1").set_zero_terminal_snr()

    cfg = load_train_config(write_config(tmp_path, tiny_ckpts["sd1"][1], dataset, zero_terminal_snr=True))
    with pytest.raises(ConfigError, match="zero_terminal_snr: .*model.parameterization=v"):
        Trainer(cfg)
    cfg.model.parameterization, cfg.optim.max_steps = "v", 2
    cfg.validation.prompts = ["a red square"]
    trainer = Trainer(cfg)
    assert trainer.model.alphas_cumprod[-1] == 0
    assert read_tuner_file(trainer.train()).training["zero_terminal_snr"] is True


def test_ema_follows_its_recurrence_exports_and_resumes_exactly(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    ema = {"decay": 0.9, "start_step": 1, "export": True}
    a = tmp_path / "a"
    a.mkdir()
    cfg = load_train_config(write_config(a, ckpt, dataset, optim={"max_steps": 4}, save_every=1, keep_last=10, ema=ema))
    Trainer(cfg).train()
    steps = [torch.load(a / "out" / "checkpoints" / f"step-{s:06d}.pt", weights_only=True) for s in (1, 2, 3, 4)]
    expected = [p.clone() for p in steps[0]["params"]]  # step 1 <= start_step: the weights themselves
    for state in steps[1:]:
        expected = [0.9 * e + 0.1 * p for e, p in zip(expected, state["params"], strict=True)]
    for e, saved in zip(expected, steps[-1]["ema"], strict=True):
        torch.testing.assert_close(saved, e, rtol=1e-6, atol=1e-8)
    exported = load_file(a / "out" / "sc_tuner.safetensors")
    trained = steps[-1]["params"]
    assert not all(torch.equal(x, y) for x, y in zip(steps[-1]["ema"], trained, strict=True))
    assert len(exported) == len(trained)
    assert read_tuner_file(a / "out" / "sc_tuner.safetensors").training["ema"] == {
        "decay": 0.9,
        "start_step": 1,
        "exported": True,
    }
    # the exported tuner holds the EMA weights, in the order the trainer keeps its parameters
    ordered = [
        exported[k]
        for m in sorted({int(k.split(".")[1]) for k in exported})
        for k in (f"tuners.{m}.ln1.weight", f"tuners.{m}.ln1.bias", f"tuners.{m}.ln2.weight", f"tuners.{m}.ln2.bias")
    ]
    assert all(torch.equal(x, e) for x, e in zip(ordered, steps[-1]["ema"], strict=True))
    # resumed from step 2: the same EMA, bitwise
    b = tmp_path / "b"
    b.mkdir()
    cfg_b = load_train_config(write_config(b, ckpt, dataset, optim={"max_steps": 2}, save_every=2, ema=ema))
    Trainer(cfg_b).train()
    cfg_b.optim.max_steps = 4
    Trainer(cfg_b, resume="latest").train()
    ours, again = load_file(a / "out" / "sc_tuner.safetensors"), load_file(b / "out" / "sc_tuner.safetensors")
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_kohya_caption_handling():
    rng = np.random.default_rng(0)
    caption = "sks dog, outdoors, grass, sunny, smiling"
    assert process_caption(caption, rng, 1, 0.0, False) == caption  # nothing asked: unchanged
    shuffled = process_caption(caption, np.random.default_rng(1), 1, 0.0, True)
    assert shuffled.split(", ")[0] == "sks dog" and sorted(shuffled.split(", ")) == sorted(caption.split(", "))
    outs = {process_caption(caption, np.random.default_rng(s), 2, 0.0, True) for s in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks dog, outdoors, ") for o in outs)
    dropped = [process_caption(caption, np.random.default_rng(s), 1, 0.5, False) for s in range(200)]
    kept = np.mean([len(d.split(", ")) - 1 for d in dropped]) / 4
    assert all(d.startswith("sks dog") for d in dropped) and 0.4 < kept < 0.6  # each of the 4 others: p = 0.5
    assert process_caption(caption, np.random.default_rng(3), 1, 0.5, True) == process_caption(
        caption, np.random.default_rng(3), 1, 0.5, True
    )  # determined by the item's generator


def test_folder_repeats_and_caption_extension(tmp_path):
    for folder, n in (("", 1), ("3_dogs", 2), ("1_cats", 1)):
        d = tmp_path / folder
        d.mkdir(exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(d / f"{folder or 'top'}{i}.png")
            (d / f"{folder or 'top'}{i}.caption").write_text(f"{folder} {i}")
    items = scan(tmp_path, ".caption")
    assert len(items) == 1 + 3 * 2 + 1
    assert sum(1 for it in items if it.image.parent.name == "3_dogs") == 6
    assert {it.caption for it in items if it.image.parent.name == "3_dogs"} == {"3_dogs 0", "3_dogs 1"}
    assert scan(tmp_path)[0].caption == ""  # .txt asked: no caption files of that name
    (tmp_path / "0_none").mkdir()
    with pytest.raises(ConfigError, match="repeat count of 0"):
        scan(tmp_path)


def test_text_sce_training_exports_one_file_that_loads_back(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    path = write_config(tmp_path, ckpt, dataset, method={"name": "sc", "text_lora_rank": 4}, optim={"max_steps": 2})
    trainer = Trainer(load_train_config(path))
    out = trainer.train()
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["ldm_sce.tuner"])
    assert meta["text_lora"] == {"rank": 4, "alpha": 4.0}
    layers = trainer.model.cfg.text.layers
    assert sum(k.endswith("lora_up.weight") for k in keys) == 6 * layers
    assert all(load_file(out)[k].abs().max() > 0 for k in keys if k.endswith("lora_up.weight"))  # it trained
    fresh = load_model(ckpt, config="tiny-sd1")
    load_tuner(fresh, out)
    prompts = ["a red square", "a blue square"]
    with torch.no_grad():
        want = trainer.model.get_learned_conditioning(prompts)
        got = fresh.get_learned_conditioning(prompts)
        base = load_model(ckpt, config="tiny-sd1").get_learned_conditioning(prompts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - base).abs().max() > 1e-4


def test_text_lora_settings_are_checked(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    bad = write_config(tmp_path, ckpt, dataset, method={"text_lora_rank": -1})
    with pytest.raises(ConfigError, match="text_lora_rank"):
        load_train_config(bad)
    cached = write_config(tmp_path, ckpt, dataset, method={"text_lora_rank": 2}, data={"cache": True})
    with pytest.raises(ConfigError, match="data.cache"):
        Trainer(load_train_config(cached))
    sd2 = write_config(
        tmp_path, tiny_ckpts["sd2"][1], dataset, model={"config": "tiny-sd2"}, method={"text_lora_rank": 2}
    )
    with pytest.raises(ConfigError, match="not SD2"):
        Trainer(load_train_config(sd2))


def torchrun_1_and_2(tmp_path, make_config) -> dict:
    """The exported tuner of the same run in one process (here) and under torchrun with 2 processes. Adam's
    eps >> |g| and a large lr make the update linear in the gradient, so the all-reduce's round-off stays
    round-off (see test_training.py's DDP test)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from ldm_sce.training import Trainer, load_train_config

    root = Path(__file__).resolve().parents[1]
    results = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        run_dir.mkdir()
        cfg = make_config(run_dir)
        overrides = ["optim.eps=1.0", "optim.lr=0.5"]
        if n == 1:  # one process is no DDP at all: the trainer in this process
            Trainer(load_train_config(cfg, overrides)).train()
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
            r = subprocess.run(
                [*cmd, str(root / "tools" / "train.py"), "--base", str(cfg), *overrides],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            assert r.returncode == 0, r.stderr[-3000:]
        results[n] = load_file(run_dir / "out" / "sc_tuner.safetensors")
    for k in results[1]:
        torch.testing.assert_close(results[2][k], results[1][k], rtol=1e-5, atol=1e-7)
    return results


@pytest.mark.slow
def test_text_sce_under_torchrun_two_processes_match_one(tiny_ckpts, dataset, tmp_path):
    """DDP reduces the text LoRA's gradients too (they are made outside the UNet's forward)."""
    results = torchrun_1_and_2(
        tmp_path,
        lambda d: write_config(
            d, tiny_ckpts["sd1"][1], dataset, method={"text_lora_rank": 2}, optim={"max_steps": 2, "batch_size": 4}
        ),
    )
    assert any(k.startswith("lora_te") for k in results[1])


# ---------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets
# ---------------------------------------------------------------------------------------------------------


def test_buckets_are_kohyas():
    from ldm_sce.buckets import make_buckets

    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets and (640, 384) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert w * h <= 512 * 512
        if (w, h) != (512, 512):  # each side as large as the area allows for the other (or max_side)
            assert h == 1024 or w * (h + 64) > 512 * 512 or w == 1024 or (w + 64) * h > 512 * 512
    assert len(buckets) == len(set(buckets)) and all((h, w) in buckets for w, h in buckets)


def test_bucket_assignment_and_no_upscale():
    from ldm_sce.buckets import assign, make_buckets

    buckets = make_buckets(512, 256, 1024, 64)
    for size in ((1200, 800), (800, 1200), (3000, 1000), (512, 512), (4000, 3000)):
        best = min(buckets, key=lambda b: abs(b[0] / b[1] - size[0] / size[1]))
        assert assign(size, buckets, 512) == best
    assert assign((1200, 800), buckets, 512) == (640, 384)
    assert assign((300, 200), buckets, 512, no_upscale=True) == (256, 192)  # never larger than the image
    assert assign((300, 200), buckets, 512) == (640, 384)  # without: enlarged to a bucket
    assert assign((2000, 2000), buckets, 512, no_upscale=True) == (512, 512)  # too large: the usual buckets


def test_epoch_batches_use_every_image_in_batches_of_one_bucket():
    from ldm_sce.buckets import batches_per_epoch, epoch_batches

    sizes = [(64, 32)] * 5 + [(32, 64)] * 3 + [(48, 48)] * 8
    batches = epoch_batches(sizes, 4, seed=1, epoch=0)
    assert len(batches) == batches_per_epoch(sizes, 4) == 2 + 1 + 2
    assert all(len(b) == 4 and len({sizes[i] for i in b}) == 1 for b in batches)
    used = [i for b in batches for i in b]
    assert set(used) == set(range(len(sizes)))  # every image in every epoch
    extra = len(used) - len(sizes)
    assert extra == 3 + 1  # only the last batch of a bucket is filled up (5 -> 8, 3 -> 4)
    assert epoch_batches(sizes, 4, 1, 0) == batches and epoch_batches(sizes, 4, 1, 1) != batches


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Portrait, landscape and square images with captions."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k, (w, h) in enumerate([(64, 32)] * 3 + [(32, 64)] * 3 + [(40, 40)] * 2):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{k}.png")
        (root / f"{k}.txt").write_text(f"photo {k}, outdoors")
    return root


def bucket_config(tmp_path, ckpt, photos, cache_dir=None, **extra):
    data = {"path": str(photos), "resolution": 48, "buckets": True, "min_bucket_reso": 16, "max_bucket_reso": 64}
    data |= {"bucket_reso_steps": 16, "shuffle_caption": True, "cache_dir": cache_dir}
    return write_config(tmp_path, ckpt, photos, data=data, optim={"batch_size": 2, "max_steps": 4}, **extra)


def test_bucket_training_uses_each_bucket_shape_and_resumes_bitwise(tiny_ckpts, photos, tmp_path):
    """Buckets + EMA + caption shuffling, straight and resumed (the resumed run with the disk cache on)."""
    ckpt = tiny_ckpts["sd1"][1]
    ema = {"decay": 0.8, "start_step": 1}
    a = tmp_path / "a"
    a.mkdir()
    trainer = Trainer(load_train_config(bucket_config(a, ckpt, photos, ema=ema)))
    assert sorted(set(trainer.data.sizes)) == [(32, 64), (48, 48), (64, 32)]  # (w, h): portrait, square, landscape
    shapes = {tuple(trainer._prepare(m)["x_t"].shape[2:]) for m in range(8)}
    assert shapes == {(32, 16), (24, 24), (16, 32)}  # latents (h, w) at the VAE's factor 2
    trainer.train()
    b = tmp_path / "b"
    b.mkdir()
    cfg = load_train_config(bucket_config(b, ckpt, photos, cache_dir=str(tmp_path / "cache"), ema=ema, save_every=2))
    cfg.optim.max_steps = 2
    Trainer(cfg).train()
    cfg.optim.max_steps = 4
    resumed = Trainer(cfg, resume="latest")
    resumed.train()
    assert resumed.disk.hits > 0  # the resumed run read posteriors back
    x, y = load_file(a / "out" / "sc_tuner.safetensors"), load_file(b / "out" / "sc_tuner.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
def test_buckets_under_torchrun_two_processes_match_one(tiny_ckpts, photos, tmp_path):
    torchrun_1_and_2(tmp_path, lambda d: bucket_config(d, tiny_ckpts["sd1"][1], photos))


# ---------------------------------------------------------------------------------------------------------
# Disk cache
# ---------------------------------------------------------------------------------------------------------


def test_disk_cache_is_reused_across_runs_and_invalidated_by_a_changed_image(tiny_ckpts, dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    ckpt, cache = tiny_ckpts["sd1"][1], tmp_path / "cache"

    def run(name, monkey=None, cached=True):
        d = tmp_path / name
        d.mkdir()
        extra = {"data": {"path": str(data), "cache_dir": str(cache)}} if cached else {}
        trainer = Trainer(load_train_config(write_config(d, ckpt, data, optim={"max_steps": 3}, **extra)))
        calls = []
        encode = trainer.model.encode_first_stage
        trainer.model.encode_first_stage = lambda x: (calls.append(x.shape), encode(x))[1]
        trainer.train()
        return load_file(d / "out" / "sc_tuner.safetensors"), calls, trainer

    plain, plain_calls, _ = run("plain", cached=False)
    first, first_calls, t1 = run("first")
    assert len(plain_calls) == 12  # 3 steps x batch 4, every posterior computed
    assert len(first_calls) == 8  # with the cache: once per image (epoch 2's repeats are read back)
    assert len(list((cache / "latents").iterdir())) == 8 and len(list((cache / "text").iterdir())) > 0
    second, second_calls, t2 = run("second")
    assert second_calls == [] and t2.disk.misses == 0  # the VAE is not called: every posterior from the disk
    assert all(torch.equal(plain[k], first[k]) and torch.equal(first[k], second[k]) for k in plain)
    Image.new("RGB", (16, 16), (10, 200, 30)).save(data / "00.png")  # one image changes
    _, third_calls, t3 = run("third")
    assert len(third_calls) == 1 and len(list((cache / "latents").iterdir())) == 9  # only that image again


def test_data_workers_give_the_same_training(tiny_ckpts, photos, tmp_path):
    """Images decoded by worker threads: bitwise the same run (each item depends only on its key)."""
    out = []
    for workers in (0, 3):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        cfg = load_train_config(bucket_config(d, tiny_ckpts["sd1"][1], photos))
        cfg.data.workers = workers
        out.append(load_file(Trainer(cfg).train()))
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])
