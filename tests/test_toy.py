"""The toy shapes world and its image analysis (ldm_sce/toy.py), and the shipped toy model and tuners."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sce import load_model, toy
from ldm_sce.cli import DEFAULT_CKPT

ROOT = Path(__file__).resolve().parents[1]
STYLE = ROOT / "weights" / "toy-style-sc.safetensors"
CANNY = ROOT / "weights" / "toy-canny-csc.safetensors"


def test_analysis_recovers_every_rendered_scene():
    rng = np.random.default_rng(123)
    scenes = [toy.random_scene(rng, night_outline=i % 3 == 0) for i in range(300)]
    found = [toy.analyze(toy.render(s)) for s in scenes]
    assert [(f["colour"], f["kind"]) for f in found] == [(s.colour, s.kind) for s in scenes]
    dark = [f["background_luma"] < 0.3 for f in found]
    assert dark == [s.night_outline for s in scenes]


def test_analysis_of_an_empty_image_finds_nothing():
    found = toy.analyze(Image.new("RGB", (64, 64), (240, 240, 240)))
    assert found["colour"] is None and found["kind"] is None and found["area"] == 0


def test_dataset_is_deterministic_and_captions_describe_the_scene(tmp_path):
    a, b = toy.write_dataset(tmp_path / "a", 12, seed=5), toy.write_dataset(tmp_path / "b", 12, seed=5)
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert (a / row["file_name"]).read_bytes() == (b / row["file_name"]).read_bytes()
        s = row["scene"]
        words = row["text"]
        assert f"{s['colour']} {s['kind']}" in words and words.startswith("a ")
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()


def test_the_sets_the_shipped_model_learnt_from_are_rebuilt_exactly(tmp_path):
    # first captions of make_toy's "base" (the VAE's) and "tagged" (the UNet's) sets, stored from the files
    # the shipped model was trained on (same seed; they part after the first scene, as "tagged" draws the
    # made-up word's chance from the same generator)
    base = toy.write_dataset(tmp_path / "base", 3, seed=1)
    tagged = toy.write_dataset(tmp_path / "tagged", 25, seed=1, nonce=0.2)
    base, tagged = ([json.loads(line)["text"] for line in (d / "metadata.jsonl").open()] for d in (base, tagged))
    assert base == [
        "a large blue square at the bottom",
        "a blue triangle in the center",
        "a small red diamond on the right",
    ]
    assert tagged[:3] == [
        "a large blue square at the bottom",
        "a large red circle",
        "a large green diamond on the left",
    ]
    assert (tagged[11], tagged[24]) == ("a large yellow circle at the top zcgd style", "a large blue diamond abl style")


def test_the_style_and_varied_looks_are_found_by_the_analysis(tmp_path):
    rng = np.random.default_rng(7)
    plain = [toy.random_scene(rng) for _ in range(100)]
    styled = [replace(toy.random_scene(rng), **toy.STYLE_LOOK) for _ in range(100)]
    for scenes, adherence in ((plain, 0.0), (styled, 1.0)):
        images = [toy.render(s) for s in scenes]
        found = [toy.analyze(im) for im in images]
        assert [(f["colour"], f["kind"]) for f in found] == [(s.colour, s.kind) for s in scenes]
        assert toy.style_adherence(images) == adherence
    # the base world's faint "\" stripes slant the other way; dots and a plain ground do not slant
    striped = [toy.pattern(toy.render(s)) for s in plain if s.stripes]
    assert striped and all(st < 0.03 and sl < -1 for st, sl in striped)
    dots = toy.pattern(toy.render(replace(plain[0], texture="dots", contrast=0.3, stripes=False)))
    assert dots[0] > 0.045 and abs(dots[1]) < 0.5
    # the general-codec set: every look is drawn, and the shape is still found on most of them
    varied = [toy.random_scene(rng, varied=1.0) for _ in range(200)]
    assert {s.texture for s in varied} == {"", "stripes", "slash", "dots", "grid"}
    assert {tuple(s.background) for s in varied} == {toy.BACKGROUNDS[0], toy.NIGHT}
    found = [toy.analyze(toy.render(s)) for s in varied]
    assert np.mean([(f["colour"], f["kind"]) == (s.colour, s.kind) for f, s in zip(found, varied, strict=True)]) > 0.9
    # a style set: every scene gets the look, captions as the base world's
    data = toy.write_dataset(tmp_path / "style", 6, seed=2, look=toy.STYLE_LOOK)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert all(r["scene"]["texture"] == "slash" and r["scene"]["outline"] == [20, 20, 20] for r in rows)
    assert toy.style_adherence([Image.open(data / r["file_name"]) for r in rows]) == 1.0


def test_the_unets_captions_end_in_made_up_words_a_fifth_of_the_time(tmp_path):
    data = toy.write_dataset(tmp_path / "tagged", 200, seed=1, nonce=0.2)  # make_toy's "tagged"
    texts = [json.loads(line)["text"] for line in (data / "metadata.jsonl").read_text().splitlines()]
    tagged = [t for t in texts if t.endswith(" style")]
    assert 20 < len(tagged) < 60 and all(t.startswith("a ") for t in texts)
    assert all(t.split()[-2] != "zqx" and 3 <= len(t.split()[-2]) <= 4 for t in tagged)


def test_toy_training_configs_validate():
    from ldm_sce.training import load_train_config

    folder = ROOT / "configs" / "toy"
    cfgs = {p.stem: load_train_config(p) for p in sorted(folder.glob("*.yaml")) if p.stem != "model"}
    assert {c.method.name for c in cfgs.values()} == {"full", "sc", "lora", "csc"}
    assert cfgs["base"].data.path == "data/toy/tagged" and cfgs["canny_csc"].data.caption_dropout == 0.5
    assert cfgs["style_sc"].data.suffix == cfgs["style_lora"].data.suffix == toy.STYLE_TRIGGER


def test_eval_prompts_cover_every_colour_and_kind_pair():
    prompts = toy.eval_prompts()
    assert len(prompts) == 50 and len({p for p, _, _ in prompts}) == 50
    pairs = {(c, k) for _, c, k in prompts}
    assert pairs == {(c, k) for c in toy.COLOURS for k in toy.KINDS}
    assert all(f"{c} {k}" in p for p, c, k in prompts)


def test_edge_f1_identities():
    scene = toy.random_scene(np.random.default_rng(0))
    e = toy.edges(toy.render(scene))
    assert e.any()
    assert toy.edge_f1(e, e) == 1.0
    assert toy.edge_f1(np.zeros_like(e), e) == 0.0
    shifted1, shifted4 = np.roll(e, 1, axis=1), np.roll(e, 4, axis=1)
    assert toy.edge_f1(shifted1, e, tolerance=1) == 1.0  # within the tolerance
    assert toy.edge_f1(shifted1, e, tolerance=0) < 0.6
    assert toy.edge_f1(shifted4, e, tolerance=1) < 0.5


# -- the shipped model ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_model():
    if not DEFAULT_CKPT.is_file():
        pytest.fail(f"{DEFAULT_CKPT} is missing: it is part of the repository (see tools/make_toy.py)")
    return load_model(DEFAULT_CKPT)


def test_shipped_model_loads_from_its_own_metadata(toy_model):
    from safetensors import safe_open

    with safe_open(str(DEFAULT_CKPT), "pt") as f:
        meta = json.loads(f.metadata()["ldm_sce.config"])
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.startswith("model.diffusion_model.")}
    assert dtypes == {torch.float16}
    assert toy_model.cfg.unet.model_channels == meta["unet"]["model_channels"] == 32
    assert toy_model.scale_factor == meta["scale_factor"] != 0.18215  # measured on its own VAE
    assert DEFAULT_CKPT.stat().st_size < 11 * 2**20  # 5.05M parameters in fp16


@pytest.mark.slow
def test_shipped_model_draws_what_the_prompt_asks_far_above_chance(toy_model):
    # The fixed 50 prompts of docs/RESULTS.md. Chance is 1/20 (5 colours x 4 kinds); the first model scored
    # 0.44 before offset noise; the shipped model 0.98 (colour 1.0, kind 0.98).
    prompts = toy.eval_prompts()
    images = toy.generate(toy_model, [p for p, _, _ in prompts], seeds=list(range(len(prompts))))
    scores = toy.prompt_scores(images, [(c, k) for _, c, k in prompts])
    assert scores["accuracy"] >= 0.9 and scores["colour"] >= 0.9 and scores["kind"] >= 0.9, scores


def test_shipped_canny_controller_loads_for_the_shipped_base(toy_model):
    from ldm_sce.tuner_files import load_tuner

    model = load_model(DEFAULT_CKPT)
    ctrl = load_tuner(model, CANNY)
    assert ctrl.condition == "canny" and ctrl.kernel == 1
    assert sum(p.numel() for p in ctrl.parameters()) == 429_072  # the trained controller of docs/RESULTS.md
    h, w = model.cfg.condition_size(toy.RES, toy.RES)
    assert (h, w) == (128, 128)  # 8x the 16x16 latent
    hints = ctrl.hints(torch.rand(1, 3, h, w))
    assert [tuple(x.shape[1:]) for x in hints] == model.cfg.unet.skip_shapes(16, 16)  # one per skip, same shape


def test_shipped_canny_controller_places_the_shape_from_the_edges(toy_model):
    from ldm_sce.conditions import condition_tensor, make_condition
    from ldm_sce.tuner_files import load_tuner
    from ldm_sce.tuners import Control

    rng = np.random.default_rng(3)  # the first 10 held-out scenes of tools/eval_toy.py
    scenes = [toy.random_scene(rng) for _ in range(10)]
    refs = [toy.render(s) for s in scenes]
    prompts, seeds = [f"a {s.colour} {s.kind}" for s in scenes], list(range(10))
    model = load_model(DEFAULT_CKPT)
    cond = torch.cat([condition_tensor(make_condition("canny", r, 128, 128)) for r in refs])  # 8x the latent
    hints = load_tuner(model, CANNY).hints(cond)
    controlled = toy.generate(model, prompts, seeds, control=lambda sl: Control([[h[sl] for h in hints]], [1.0]))

    def f1(images):
        return float(np.mean([toy.edge_f1(toy.edges(i), toy.edges(r)) for i, r in zip(images, refs, strict=True)]))

    base, ctrl = f1(toy.generate(toy_model, prompts, seeds)), f1(controlled)
    assert base < 0.3 and ctrl > 0.4, (base, ctrl)  # measured 0.162 and 0.554 (0.122 and 0.532 on all 50)
    assert toy.prompt_scores(controlled, [(s.colour, s.kind) for s in scenes])["accuracy"] >= 0.8  # measured 0.9


def test_shipped_style_tuner_moves_outputs_to_the_style_and_keeps_the_prompt(toy_model):
    from ldm_sce.tuner_files import load_tuner

    picked = [toy.eval_prompts()[i * 5 + i % 5] for i in range(10)]  # every colour, every kind, all 3 forms
    prompts, expected = [p + toy.STYLE_TRIGGER for p, _, _ in picked], [(c, k) for _, c, k in picked]
    seeds = [i * 5 + i % 5 for i in range(10)]  # as in tools/eval_toy.py
    model = load_model(DEFAULT_CKPT)
    load_tuner(model, STYLE)
    before, after = toy.generate(toy_model, prompts, seeds), toy.generate(model, prompts, seeds)
    assert toy.style_adherence(before) == 0.0 and toy.style_adherence(after) >= 0.7  # measured: 0 and 0.9
    # the base reads past the trigger it has never seen; the tuner keeps the colour, and the kind mostly
    scores = toy.prompt_scores(before, expected), toy.prompt_scores(after, expected)
    assert scores[0]["accuracy"] >= 0.6 and scores[1]["colour"] >= 0.9 and scores[1]["accuracy"] >= 0.5, scores
    # measured: base 0.8 right; with the tuner colour 1.0, colour and kind 0.7 (0.78 and 0.72 on all 50)


def test_sc_tuner_trains_from_the_shipped_model(tmp_path):
    from ldm_sce.training import Trainer, load_train_config
    from ldm_sce.tuner_files import load_tuner

    data = toy.write_dataset(tmp_path / "style", 6, seed=2, look=toy.STYLE_LOOK)
    cfg = load_train_config(
        ROOT / "configs" / "toy" / "style_sc.yaml",
        [
            f"model.ckpt={DEFAULT_CKPT}",
            f"data.path={data}",
            f"output_dir={tmp_path / 'run'}",
            "optim.batch_size=3",
            "optim.max_steps=3",
            "optim.warmup_steps=0",
            "save_every=0",
            "log_every=1",
            "validation.prompts=[]",
        ],
    )
    path = Trainer(cfg).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3]
    assert [row["loss"] for row in log] == pytest.approx([0.1915576, 0.0983329, 0.0153798], rel=1e-3)  # stored
    model = load_model(DEFAULT_CKPT)
    tuners = load_tuner(model, path)
    assert len(tuners) == 9  # every skip of the toy UNet
    # trained away from the identity (a fresh SC-Tuner's up-projection is zero)
    assert any(t.ln2.weight.abs().max() > 0 for t in tuners)


def test_txt2img_with_no_ckpt_uses_the_embedded_model(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "txt2img.py"),
            "--prompt",
            "a large blue square",
            "--outdir",
            str(tmp_path),
            "--quiet",
            "--skip_grid",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    img = Image.open(tmp_path / "samples" / "00000.png")
    assert img.size == (64, 64)
    assert "Model: toy-shapes" in img.text["parameters"]
    found = toy.analyze(img)
    assert (found["colour"], found["kind"]) == ("blue", "square")
