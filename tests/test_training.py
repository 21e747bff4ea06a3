"""tools/train.py and ldm_sce.training on a tiny checkpoint and images the tests make."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from ldm_sce import ConfigError
from ldm_sce.training import Trainer, load_train_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 images 16x16: a coloured square on grey, with captions; plus one corrupt file."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    for i in range(8):
        name, rgb = list(colors.items())[i % 4]
        arr = np.full((16, 16, 3), 128, np.uint8)
        x, y = rng.integers(0, 8, 2)
        arr[y : y + 8, x : x + 8] = rgb
        Image.fromarray(arr).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square")
    return root


def write_config(tmp_path, ckpt, data_path, **sections):
    cfg = {
        "model": {"ckpt": str(ckpt), "config": "tiny-sd1"},
        "method": {"name": "sc"},
        "data": {"path": str(data_path), "resolution": 16, "trigger": "<sce> "},
        "optim": {"lr": 3e-3, "batch_size": 4, "max_steps": 8},
        "output_dir": str(tmp_path / "out"),
        "save_every": 4,
        "log_every": 1,
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


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


def test_sc_training_lowers_the_loss(tiny_ckpts, dataset, tmp_path):
    cfg = load_train_config(write_config(tmp_path, tiny_ckpts["sd1"][1], dataset, optim={"max_steps": 100, "lr": 1e-2}))
    trainer = Trainer(cfg)
    before = fixed_batch_loss(trainer)
    trainer.train()
    after = fixed_batch_loss(trainer)
    assert after < 0.9 * before, (before, after)  # measured: 1.008 -> 0.842


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
    assert len(losses(out)) == 4 and all(np.isfinite(losses(out)))
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
    assert rows[-1]["bad_images"] == 1 and np.isfinite(rows[-1]["loss"])


def test_csc_lora_and_full_methods_train(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    methods = (
        {"name": "csc", "condition": "canny", "random_thresholds": True},
        {"name": "lora", "lora_rank": 4},
        {"name": "full"},
    )
    for method in methods:
        out = tmp_path / method["name"]
        out.mkdir()
        cfg = load_train_config(write_config(out, ckpt, dataset, method=method, optim={"max_steps": 2}))
        path = Trainer(cfg).train()
        tensors = load_file(path)
        assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert any(k.startswith("dense_hint_blocks") for k in load_file(tmp_path / "csc" / "out" / "csc_canny.safetensors"))
    from ldm_sce import load_model

    full = load_model(tmp_path / "full" / "out" / "model.safetensors")  # a whole model, config in its metadata
    base = load_model(ckpt, config="tiny-sd1")
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(full.state_dict()[w], base.state_dict()[w])  # the encoder trained too


def test_dataset_layouts(tmp_path):
    from ldm_sce.data import scan

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text('Target:FILE,Prompt\na.png,"a cat, sitting"\n')
    assert [(i.image.name, i.caption) for i in scan(tmp_path)] == [("a.png", "a cat, sitting")]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a dog"}\n')
    assert [(i.image.name, i.caption) for i in scan(tmp_path)] == [("a.png", "a dog")]  # jsonl first
    (tmp_path / "train.csv").unlink()
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "a.txt").write_text("a bird\n")
    assert [(i.image.name, i.caption) for i in scan(tmp_path)] == [("a.png", "a bird")]
    from ldm_sce.data import TrainDataset

    data = TrainDataset(scan(tmp_path), 8, trigger="sks ", suffix=", zqx style")
    assert data[0, 0]["caption"] == "sks a bird, zqx style"  # kohya's caption prefix / suffix


def test_shipped_training_configs_validate(tiny_ckpts, dataset, tmp_path):
    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        cfg = load_train_config(path)
        assert cfg.optim.weight_decay in (0.0, 0.01) and cfg.method.name in ("sc", "csc")
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


def test_torchrun_two_processes_match_one(tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    results = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        run_dir.mkdir()
        # Adam's step is ~lr * sign(g): where g is 0 up to round-off (the all-reduce changes it), the sign is
        # a coin flip. With eps >> |g| the update is linear in g, so round-off stays round-off.
        cfg = write_config(run_dir, ckpt, dataset, optim={"max_steps": 3, "batch_size": 4, "eps": 1.0, "lr": 0.5})
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


def test_lora_file_round_trip_gives_the_same_unet(tiny_ckpts):
    from safetensors.torch import save_file

    from ldm_sce import load_model
    from ldm_sce.methods import add_lora, load_lora

    ckpt = tiny_ckpts["sd1"][1]
    trained = load_model(ckpt, config="tiny-sd1")
    unet = trained.model.diffusion_model
    params = add_lora(unet, 4)
    torch.manual_seed(1)
    for p in params:
        p.data.normal_(0, 0.1)
    path = Path(tiny_ckpts["sd1"][1]).with_name("lora-test.safetensors")
    save_file({n: p.detach().contiguous() for n, p in unet.named_parameters() if ".lora_" in n}, str(path))  # as export

    fresh = load_model(ckpt, config="tiny-sd1")
    assert load_lora(fresh, path) == sum(p.numel() for p in params)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(x, t, c)
        assert not torch.equal(expected, load_model(ckpt, config="tiny-sd1").model.diffusion_model(x, t, c))
        assert torch.equal(fresh.model.diffusion_model(x, t, c), expected)


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
