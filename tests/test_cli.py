"""tools/txt2img.py and tools/img2img.py end to end on a tiny checkpoint, as a user runs them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sce import load_model
from ldm_sce.images import to_pil
from ldm_sce.sampling import sample

ROOT = Path(__file__).resolve().parents[1]


def run(tool, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / tool), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpts):
    return tiny_ckpts["sd1"][1]


@pytest.mark.slow
def test_txt2img_end_to_end(ckpt, tmp_path):
    out = tmp_path / "out"
    r = run(
        "txt2img.py",
        "--ckpt",
        ckpt,
        "--config",
        "tiny-sd1",
        "--prompt",
        "a red square",
        "--negative-prompt",
        "blurry",
        "--n_samples",
        2,
        "--n_iter",
        2,
        "--ddim_steps",
        3,
        "--H",
        16,
        "--W",
        24,
        "--seed",
        42,
        "--precision",
        "full",
        "--json",
        "--outdir",
        out,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in (out / "samples").glob("*.png"))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png"]
    grid = Image.open(out / "grid-0000.png")
    assert grid.size == (2 * 24, 2 * 16)
    for i, name in enumerate(files):
        img = Image.open(out / "samples" / name)
        assert img.size == (24, 16)
        text = img.text["parameters"]
        assert text.startswith("a red square\nNegative prompt: blurry\n")
        assert f"Seed: {42 + i}" in text and "Sampler: DDIM" in text and "Size: 24x16" in text
        meta = json.loads((out / "samples" / name).with_suffix(".json").read_text())
        assert meta["seed"] == 42 + i and meta["steps"] == 3

    # image 3 is exactly what the library makes for seed 45, alone
    model = load_model(ckpt, config="tiny-sd1")
    c = model.get_learned_conditioning(["a red square"])
    uc = model.get_learned_conditioning(["blurry"])
    with torch.no_grad():
        ref = to_pil(model.decode_first_stage(sample(model, c, uc, steps=3, seed=45, shape=(8, 12))))[0]
    diff = np.abs(np.asarray(ref, dtype=int) - np.asarray(Image.open(out / "samples" / "00003.png"), dtype=int))
    assert diff.max() <= 1  # a rounding flip at most (batched vs single matmuls)

    # a second run numbers on from the existing files
    r = run(
        "txt2img.py",
        "--ckpt",
        ckpt,
        "--config",
        "tiny-sd1",
        "--ddim_steps",
        2,
        "--H",
        16,
        "--W",
        16,
        "--outdir",
        out,
        "--skip_grid",
        "--quiet",
        "--sampler",
        "dpmpp_2m",
    )
    assert r.returncode == 0, r.stderr
    assert (out / "samples" / "00004.png").exists() and not (out / "grid-0001.png").exists()
    assert "Sampler: DPM++ 2M Karras" in Image.open(out / "samples" / "00004.png").text["parameters"]


@pytest.mark.parametrize(
    "override,message",
    [
        ({"--H": 20}, "multiples of 8"),
        ({"--ckpt": "missing.ckpt"}, "checkpoint not found"),
        ({"--from-file": "no-such-prompts.txt"}, "cannot read prompts"),
        ({"--plms": None, "--ddim_eta": 0.5}, "must be 0 with PLMS"),
        ({"--config": "tiny-sd2"}, "does not match"),
        ({"--freeu": "1.5,1.6"}, "B1,B2,S1,S2"),
    ],
)
def test_txt2img_bad_arguments_give_one_line(ckpt, tmp_path, override, message):
    opts = {"--ckpt": ckpt, "--config": "tiny-sd1", "--H": 16, "--W": 16, "--outdir": tmp_path, **override}
    argv = [x for k, v in opts.items() for x in ((k,) if v is None else (k, v))]
    r = run("txt2img.py", *argv, "--ddim_steps", 2, "--quiet")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_img2img_end_to_end(ckpt, tmp_path):
    init = tmp_path / "init.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 27, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    r = run(
        "img2img.py",
        "--ckpt",
        ckpt,
        "--config",
        "tiny-sd1",
        "--init-img",
        init,
        "--strength",
        0.5,
        "--ddim_steps",
        4,
        "--n_samples",
        2,
        "--outdir",
        out,
        "--precision",
        "full",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    imgs = sorted((out / "samples").glob("*.png"))
    assert len(imgs) == 2 and Image.open(imgs[0]).size == (24, 16)  # cropped down to multiples of 8
    assert "Denoising strength: 0.5" in Image.open(imgs[0]).text["parameters"]
    r = run("img2img.py", "--ckpt", ckpt, "--config", "tiny-sd1", "--init-img", init, "--strength", 0, "--quiet")
    assert r.returncode == 2 and "--strength" in r.stderr
    init.write_bytes(b"not a png")
    r = run("img2img.py", "--ckpt", ckpt, "--config", "tiny-sd1", "--init-img", init, "--quiet")
    assert r.returncode == 2 and "cannot read image" in r.stderr


@pytest.mark.slow
def test_txt2img_with_tuner_and_controllers(ckpt, tmp_path):
    from ldm_sce.tuner_files import csc_tuner_file, save_tuner_file, sc_tuner_file
    from ldm_sce.tuners import CSCTuner

    model = load_model(ckpt, config="tiny-sd1")
    unet = model.model.diffusion_model
    for tuner in unet.attach_sc_tuners():
        torch.nn.init.normal_(tuner.ln2.weight, std=0.05)
    ctrl = unet.attach_controller(CSCTuner(model.cfg.unet))
    torch.nn.init.normal_(ctrl.dense_hint_blocks[0][1].weight, std=0.05)
    save_tuner_file(sc_tuner_file(model), tmp_path / "style.safetensors")
    save_tuner_file(csc_tuner_file(model, ctrl, "canny"), tmp_path / "canny.safetensors")
    Image.new("RGB", (40, 40), (255, 255, 255)).save(tmp_path / "cond.png")
    common = ["--ckpt", ckpt, "--config", "tiny-sd1", "--ddim_steps", 2, "--H", 16, "--W", 16, "--quiet"]
    out = tmp_path / "tuned"
    r = run(
        "txt2img.py",
        *common,
        "--outdir",
        out,
        "--tuner",
        tmp_path / "style.safetensors",
        "--tuner-scale",
        0.7,
        "--control",
        tmp_path / "canny.safetensors",
        "--control-image",
        tmp_path / "cond.png",
        "--control",
        tmp_path / "canny.safetensors",
        "--control-image",
        tmp_path / "cond.png",
        "--control-type",
        "canny",
        "--control-type",
        "color",
        "--control-weight",
        0.6,
        "--control-weight",
        0.4,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "control-0-canny.png").exists() and (out / "control-1-color.png").exists()
    assert Image.open(out / "control-0-canny.png").size == (64, 64)  # 8x the latent
    text = Image.open(out / "samples" / "00000.png").text["parameters"]
    assert "SC-Tuner: style" in text and "Tuner scale: 0.7" in text and "Control weights: [0.6, 0.4]" in text
    base = tmp_path / "base"
    assert run("txt2img.py", *common, "--outdir", base).returncode == 0
    a = np.asarray(Image.open(out / "samples" / "00000.png"), dtype=int)
    b = np.asarray(Image.open(base / "samples" / "00000.png"), dtype=int)
    assert np.abs(a - b).max() > 0  # the tuners changed the image
    r = run("txt2img.py", *common, "--outdir", base, "--control", tmp_path / "canny.safetensors")
    assert r.returncode == 2 and "--control-image" in r.stderr


@pytest.mark.slow
def test_txt2img_with_loras_and_several_tuners_equals_the_library(ckpt, tmp_path):
    from helpers import write_kohya_lora

    from ldm_sce.lora import load_lora
    from ldm_sce.tuner_files import load_tuners, save_tuner_file, sc_tuner_file

    model = load_model(ckpt, config="tiny-sd1")
    unet = model.model.diffusion_model
    for k in range(2):
        for tuner in unet.attach_sc_tuners():
            torch.nn.init.normal_(tuner.ln2.weight, std=0.05 * (k + 1))
        save_tuner_file(sc_tuner_file(model), tmp_path / f"style{k}.safetensors")
    write_kohya_lora(model, tmp_path / "detail.safetensors", alpha=2.0, seed=1)
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--config", "tiny-sd1", "--ddim_steps", 3, "--H", 16, "--W", 16, "--seed", 7]
    args += ["--prompt", "a red square", "--negative-prompt", "blurry", "--n_samples", 1, "--precision", "full"]
    args += ["--outdir", out, "--quiet"]
    common = list(args)
    args += ["--lora", f"{tmp_path / 'detail.safetensors'}:0.5", "--tuner-compose", "sequential"]
    args += ["--tuner", tmp_path / "style0.safetensors", "--tuner-scale", 0.8]
    args += ["--tuner", tmp_path / "style1.safetensors", "--tuner-scale", 0.5]
    r = run("txt2img.py", *args)
    assert r.returncode == 0, r.stderr
    text = Image.open(out / "samples" / "00000.png").text["parameters"]
    assert "LoRA: ['detail:0.5']" in text and "SC-Tuners: ['style0', 'style1']" in text
    assert "Tuner scales: [0.8, 0.5]" in text and "Tuner compose: sequential" in text

    ref = load_model(ckpt, config="tiny-sd1")
    load_lora(ref, tmp_path / "detail.safetensors", weight=0.5)
    load_tuners(ref, [(tmp_path / "style0.safetensors", 0.8), (tmp_path / "style1.safetensors", 0.5)], "sequential")
    c, uc = ref.get_learned_conditioning(["a red square"]), ref.get_learned_conditioning(["blurry"])
    with torch.no_grad():
        img = to_pil(ref.decode_first_stage(sample(ref, c, uc, steps=3, seed=7, shape=(8, 8))))[0]
    diff = np.abs(np.asarray(img, dtype=int) - np.asarray(Image.open(out / "samples" / "00000.png"), dtype=int))
    assert diff.max() <= 1

    r = run("txt2img.py", *common, "--tuner", tmp_path / "style0.safetensors", "--skip-scales", "1,2")
    assert r.returncode == 2 and "--skip-scales: this model has 9 skips" in r.stderr
    r = run("txt2img.py", *common, "--lora", tmp_path / "style0.safetensors")
    assert r.returncode == 2 and "not a LoRA file" in r.stderr, r.stderr


@pytest.mark.slow
def test_txt2img_prompt_syntax_samplers_and_replay_from_png(ckpt, tmp_path):
    from PIL import PngImagePlugin

    from ldm_sce.prompts import encode_prompts, load_embedding

    torch.save(
        {"string_to_param": {"*": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}}, tmp_path / "zqx.pt"
    )
    common = ["--ckpt", ckpt, "--config", "tiny-sd1", "--ddim_steps", 4, "--H", 16, "--W", 16, "--quiet"]
    common += ["--precision", "full", "--embedding", tmp_path / "zqx.pt"]
    prompt = "a (red:1.3) square in zqx style BREAK on [grey]"
    out = tmp_path / "a"
    r = run(
        "txt2img.py",
        *common,
        "--outdir",
        out,
        "--prompt",
        prompt,
        "--negative-prompt",
        "blurry",
        "--seed",
        9,
        "--clip-skip",
        2,
        "--sampler",
        "DPM++ 2M SDE Karras",
        "--guidance-rescale",
        0.5,
        "--scale",
        6,
    )
    assert r.returncode == 0, r.stderr
    first = out / "samples" / "00000.png"
    text = Image.open(first).text["parameters"]
    assert text.startswith(prompt + "\nNegative prompt: blurry\n")
    for field in ("Sampler: DPM++ 2M SDE Karras", "Clip skip: 2", "CFG rescale: 0.5", "Seed: 9", "CFG scale: 6.0"):
        assert field in text, (field, text)

    # the library, with the same prompt handling, sampler and seed
    model = load_model(ckpt, config="tiny-sd1")
    c, uc = encode_prompts(model, [prompt], ["blurry"], clip_skip=2, embeddings=[load_embedding(tmp_path / "zqx.pt")])
    with torch.no_grad():
        z = sample(model, c, uc, sampler="dpmpp_2m_sde", steps=4, scale=6.0, seed=9, shape=(8, 8), guidance_rescale=0.5)
        ref = to_pil(model.decode_first_stage(z))[0]
    diff = np.abs(np.asarray(ref, dtype=int) - np.asarray(Image.open(first), dtype=int))
    assert diff.max() <= 1

    # replayed from the PNG: the same image (the embedding file is given again: files are not replayed)
    again = tmp_path / "b"
    r = run("txt2img.py", *common, "--outdir", again, "--from-png", first)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(again / "samples" / "00000.png")), np.asarray(Image.open(first)))
    assert "not replayed" in r.stderr and "Embeddings" in r.stderr

    # an AUTOMATIC1111 PNG: its prompt, sampler, scale and seed; flags given still win (steps and size here)
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a cat, (masterpiece:1.2)\nNegative prompt: lowres\nSteps: 3, Sampler: Euler a, "
        "Schedule type: Karras, CFG scale: 5, Seed: 77, Size: 512x768, Model hash: 6ce0161689, Model: v1-5",
    )
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    r = run("txt2img.py", *common[:-2], "--outdir", tmp_path / "c", "--from-png", tmp_path / "a1111.png")
    assert r.returncode == 0, r.stderr
    text = Image.open(tmp_path / "c" / "samples" / "00000.png").text["parameters"]
    assert text.startswith("a cat, (masterpiece:1.2)\nNegative prompt: lowres\nSteps: 4, Sampler: Euler a Karras")
    assert "Seed: 77" in text and "CFG scale: 5.0" in text and "Size: 16x16" in text
    r = run("txt2img.py", *common[:-2], "--outdir", tmp_path / "d", "--from-png", tmp_path / "zqx.pt")
    assert r.returncode == 2 and "--from-png" in r.stderr
