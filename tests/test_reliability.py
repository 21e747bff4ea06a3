"""Hostile and damaged inputs on every input path (checkpoint, tuner file, model and training config, dataset,
condition and init images, every CLI argument): each gets the project's own error naming the problem, never
a traceback, a black image or an overwritten file."""

import importlib.util
import io
import json
import logging
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import train_config
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm_sce import PRESETS, CheckpointError, ConfigError, load_model, sample
from ldm_sce.cli import DEFAULT_CKPT, UsageError
from ldm_sce.images import ImageError, NonFiniteError, load_image, next_index, save_png, to_pil
from ldm_sce.training import Trainer, TrainingError, load_train_config
from ldm_sce.tuner_files import csc_tuner_file, load_tuner, read_tuner_file, save_tuner_file, sc_tuner_file
from ldm_sce.tuners import CSCTuner

ROOT = Path(__file__).resolve().parents[1]
PROJECT_ERRORS = (UsageError, CheckpointError, ConfigError, ImageError, NonFiniteError)  # what run_cli prints


def tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TXT2IMG, IMG2IMG = tool("txt2img"), tool("img2img")


def cli_error(module, argv, outdir) -> str:
    """Run a CLI in-process with argv; it must stop with one of the errors run_cli prints as one line (exit
    2), having written no PNG. Returns the message."""
    args = module.parser().parse_args([*map(str, argv), "--outdir", str(outdir), "--quiet"])
    with pytest.raises(PROJECT_ERRORS) as e:
        module.main(args)
    assert not list(Path(outdir).glob("samples/*.png"))
    return str(e.value)


@pytest.fixture(scope="module")
def tiny(tiny_ckpts):
    return tiny_ckpts["sd1"][1]


TINY = ["--config", "tiny-sd1", "--H", 16, "--W", 16, "--ddim_steps", 2]


# -- numbers ---------------------------------------------------------------------------------------------


def test_a_bf16_file_samples_as_its_fp32_original(tiny_ckpts, tmp_path):
    """The schedule stored in a bf16 file rounds alphas_cumprod[:4] to (1, 1, 0.996, 0.996); the loader
    computes it from the config instead, so the model samples as the fp32 file does."""
    model, path, preset = tiny_ckpts["sd1"]
    half = tmp_path / "bf16.safetensors"
    sd = model.state_dict()
    save_file(
        {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, str(half)
    )
    stored = load_file(half)["alphas_cumprod"]
    assert stored[0] == 1.0  # the bug's cause, as stored
    loaded = load_model(half, config=preset)
    assert loaded.alphas_cumprod.dtype == torch.float32 and torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)
    c = loaded.get_learned_conditioning(["a red square"])
    uc = loaded.get_learned_conditioning([""])
    with torch.no_grad():
        z_bf16 = sample(loaded, c, uc, steps=5, seed=1, shape=(8, 8))
        z_fp32 = sample(load_model(path, config=preset), c, uc, steps=5, seed=1, shape=(8, 8))
    assert torch.isfinite(z_bf16).all() and (z_bf16 - z_fp32).abs().max() < 0.1 * z_fp32.abs().max()


def test_a_stored_schedule_other_than_the_configs_is_named(tiny_ckpts, tmp_path, caplog):
    model, _, preset = tiny_ckpts["sd1"]
    sd = dict(model.state_dict())
    sd["alphas_cumprod"] = sd["alphas_cumprod"] * 0.9
    path = tmp_path / "other-schedule.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with caplog.at_level(logging.WARNING):
        loaded = load_model(path, config=preset)
    assert "differs from its config" in caplog.text and torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)


def test_nan_weights_are_refused_at_load(tiny_ckpts, tmp_path):
    model, _, preset = tiny_ckpts["sd1"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["model.diffusion_model.middle_block.1.proj_in.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"NaN or inf.*middle_block\.1\.proj_in"):
        load_model(path, config=preset)


def test_non_finite_latents_stop_with_their_cause(tiny_ckpts):
    _, path, preset = tiny_ckpts["sd1"]
    model = load_model(path, config=preset)
    c, uc = model.get_learned_conditioning(["a"]), model.get_learned_conditioning([""])
    unet = model.model.diffusion_model

    def cause(**kw):
        with pytest.raises(NonFiniteError) as e, torch.no_grad():
            sample(model, c, uc, steps=2, seed=0, shape=(8, 8), **kw)
        return str(e.value)

    (tuner,) = unet.attach_sc_tuners(skips=[3])
    tuner.ln2.weight.data.fill_(float("nan"))  # as a diverged training would leave it (files are checked)
    assert "SC-Tuner weights hold NaN" in cause()
    unet.replace_tuners([type(unet.tuners[0])() for _ in unet.tuners])
    with torch.no_grad():
        unet.out[2].bias.fill_(3e38)  # finite weights whose output overflows
    assert "overflowed" in cause()
    assert "initial noise" in cause(x_T=torch.full((1, 4, 8, 8), float("inf")))
    for kw, message in (
        ({"scale": float("nan")}, "guidance scale"),
        ({"eta": 5.0}, "eta must be"),
        ({"steps": 0}, "steps must be"),
    ):
        with pytest.raises(ValueError, match=message):
            sample(model, c, uc, shape=(8, 8), **kw)


def test_non_finite_images_are_never_written_as_black():
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        to_pil(torch.tensor([[[[float("nan")]]] * 3]).view(1, 3, 1, 1))


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--scale", "nan"], "--scale must be a number in [0, 100]"),
        (["--ddim_eta", 1.5], "--ddim_eta must be a number in [0, 1]"),
        (["--ddim_steps", 0], "--ddim_steps must be an integer in 1..1000"),
        (["--ddim_steps", 1001], "--ddim_steps must be an integer in 1..1000"),
        (["--seed", -5], "--seed must be an integer in 0..4294967295"),
        (["--seed", 2**40], "--seed must be an integer"),
        (["--n_samples", 0], "--n_samples must be an integer in 1..256"),
        (["--tuner-scale", "inf"], "--tuner-scale must be a number"),
        (["--control-scale", -1], "--control-scale must be a number in [0, 10]"),
        (["--control-start", 0.8, "--control-end", 0.2], "is after --control-end"),
        (["--H", 20], "multiples of 8"),
        (["--W", 0], "--W must be an integer in 1..16384"),
        (["--device", "gpu"], "not a device name"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "xla"], "only cpu, cuda and mps"),
        (["--plms", "--ddim_eta", 0.5], "must be 0 with PLMS"),
        (["--zero-terminal-snr", "--sampler", "euler"], "--zero-terminal-snr samples with ddim only"),
        (["--from-file", "no-such-prompts.txt"], "cannot read prompts"),
        (["--config", "tiny-sd2"], "does not match"),
        (["--config", "no-such-preset"], "neither a preset"),
    ],
)
def test_every_numeric_and_named_argument_is_checked(tiny, tmp_path, argv, message):
    assert message in cli_error(TXT2IMG, ["--ckpt", tiny, *TINY, *argv], tmp_path / "out")


def test_outdir_that_is_a_file(tiny, tmp_path):
    (tmp_path / "file").write_text("x")
    assert "cannot create it" in cli_error(TXT2IMG, ["--ckpt", tiny, *TINY], tmp_path / "file")


def test_img2img_arguments(tiny, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (24, 24), (10, 200, 30)).save(init)
    common = ["--ckpt", tiny, "--config", "tiny-sd1", "--ddim_steps", 4, "--init-img", init]
    assert "--strength must be a number in [0, 1]" in cli_error(IMG2IMG, [*common, "--strength", 2], tmp_path / "a")
    assert "--strength must be in (0, 1]" in cli_error(IMG2IMG, [*common, "--strength", 0], tmp_path / "b")
    assert "supports --sampler ddim or plms" in cli_error(IMG2IMG, [*common, "--sampler", "euler"], tmp_path / "c")
    assert "at least 8px" in cli_error(IMG2IMG, [*common[:-1], _image(tmp_path, "tiny.png", (4, 4))], tmp_path / "d")


# -- files: images ---------------------------------------------------------------------------------------


def _image(folder, name, size=(16, 16), mode="RGB", value=(200, 30, 30)):
    path = folder / name
    Image.new(mode, size, value).save(path)
    return path


def test_every_pillow_mode_decodes_to_the_right_rgb(tmp_path):
    gradient = np.linspace(0, 65535, 64, dtype=np.float64).reshape(8, 8)
    Image.fromarray(gradient.astype(np.uint16)).save(tmp_path / "grey16.png")  # mode I;16, as depth maps
    got = np.asarray(load_image(tmp_path / "grey16.png"))
    assert got.shape == (8, 8, 3) and (got[..., 0] == np.rint(gradient * 255 / 65535)).all()  # not clipped white

    import cv2  # a 16-bit RGB PNG (Pillow reads it as 8-bit RGB)

    rgb16 = np.stack([gradient, 65535 - gradient, np.full_like(gradient, 32896)], -1).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])
    got = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got - rgb16 / 257).max() <= 1

    Image.fromarray((gradient / 65535).astype(np.float32)).save(tmp_path / "float.tif")  # mode F in [0, 1]
    assert np.abs(np.asarray(load_image(tmp_path / "float.tif"))[..., 0] - gradient * 255 / 65535).max() <= 0.5

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red: white, not red or black
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "alpha.png")
    got = np.asarray(load_image(tmp_path / "alpha.png"))
    assert tuple(got[0, 0]) == (0, 0, 255) and tuple(got[1, 1]) == (255, 255, 255)

    palette = Image.new("RGB", (4, 4), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.png")
    assert tuple(np.asarray(load_image(tmp_path / "palette.png"))[2, 2]) == (0, 128, 0)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg"))[2, 2].astype(int)
    assert r > 200 and g < 60 and b < 60

    Image.new("1", (4, 4), 1).save(tmp_path / "bits.png")
    assert (np.asarray(load_image(tmp_path / "bits.png")) == 255).all()

    tall = Image.new("RGB", (4, 8), (0, 0, 0))  # stored 4 wide, 8 high, with "rotate 90" in EXIF
    exif = Image.Exif()
    exif[0x0112] = 6
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (8, 4)


def test_unreadable_images_are_refused_by_name(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "big.tif")
    Image.fromarray(np.full((4, 4), 7.5, np.float32)).save(tmp_path / "depth.tif")
    Image.new("LAB", (4, 4)).save(tmp_path / "lab.tif")
    cases = {
        "text.png": "not an image",
        "big.tif": "outside 0..65535",
        "depth.tif": r"outside \[0, 1\]",
        "lab.tif": "mode 'LAB'",
        "missing.png": "not found",
    }
    for name, message in cases.items():
        with pytest.raises(ImageError, match=message):
            load_image(tmp_path / name)


def test_control_and_init_images_are_decoded_the_same_way(tiny_ckpts, tmp_path):
    """The CLI's control and init images and the trainer's images all go through load_image."""
    from ldm_sce.data import Item, TrainDataset

    gradient = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    Image.fromarray(gradient).save(tmp_path / "grey16.png")
    item = TrainDataset([Item(tmp_path / "grey16.png", "x")], 8)[0, 0]
    expected = np.rint(gradient.astype(np.float64) * 255 / 65535) / 127.5 - 1
    assert np.abs(item["image"][0].numpy() - expected).max() < 0.05  # not white (it was all 1.0)


# -- files: outputs never overwrite ----------------------------------------------------------------------


def test_numbering_goes_after_the_highest_existing_file(tiny, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    for n in ("00000", "00002"):
        Image.new("RGB", (16, 16)).save(out / "samples" / f"{n}.png")
    before = (out / "samples" / "00002.png").read_bytes()
    args = TXT2IMG.parser().parse_args(["--ckpt", str(tiny), *map(str, TINY), "--outdir", str(out), "--quiet"])
    TXT2IMG.main(args)
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["00000.png", "00002.png", "00003.png"]
    assert (out / "samples" / "00002.png").read_bytes() == before
    assert next_index(out / "samples", "[0-9][0-9][0-9][0-9][0-9].png", 5) == 4


def test_save_png_never_replaces_a_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        save_png(Image.new("RGB", (2, 2)), path)
    assert path.read_bytes() == b"mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_converted_tuner_is_not_written_over_an_existing_file(tiny_ckpts, tmp_path):
    model = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")
    model.model.diffusion_model.attach_sc_tuners()
    path = tmp_path / "t.safetensors"
    save_tuner_file(sc_tuner_file(model), path)
    with pytest.raises(FileExistsError):
        save_tuner_file(sc_tuner_file(model), path)


# -- files: checkpoints ----------------------------------------------------------------------------------


def _zip_with_pickle(path: Path, payload: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


class _PidPickler(pickle.Pickler):
    """Writes a tensor as the persistent id `pid` (to forge torch's storage records)."""

    def __init__(self, file, pid):
        super().__init__(file, protocol=2)
        self.pid = pid

    def persistent_id(self, obj):
        return self.pid if obj == "STORAGE" else None


def _forged(pid, size=(4,), stride=(1,), offset=0) -> bytes:
    import torch._utils

    buf = io.BytesIO()

    class Rebuild:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, ("STORAGE", offset, size, stride, False, {}))

    _PidPickler(buf, pid).dump({"w": Rebuild()})
    return buf.getvalue()


@pytest.mark.parametrize(
    "pid,size,message",
    [
        (("storage", torch.float32, "0", "cpu", 4), (100,), r"a tensor \[100\] .* does not fit its storage of 4"),
        (("storage", torch.float32, "0", "cpu", 4), (-1,), "negative size"),
        (("bogus",), (4,), "unsupported persistent id"),
        (("storage", "float", "0", "cpu", 4), (4,), "unsupported storage record"),
        (("storage", torch.float32, "missing", "cpu", 4), (4,), "truncated or corrupt"),
    ],
)
def test_malformed_pickles(tmp_path, pid, size, message):
    path = _zip_with_pickle(tmp_path / "bad.ckpt", _forged(pid, size), {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=message):
        load_model(path, config="tiny-sd1")


def test_other_damaged_checkpoint_files(tmp_path):
    cases = {
        "random.ckpt": b"\x00" + np.random.default_rng(0).bytes(1000),
        "legacy.ckpt": pickle.dumps({"a": 1}, protocol=2),
        "empty.safetensors": b"",
        "header.safetensors": (10**6).to_bytes(8, "little") + b"{garbage",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    _zip_with_pickle(tmp_path / "nodata.ckpt", b"")
    (tmp_path / "nopkl.ckpt").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "nopkl.ckpt", "w") as z:
        z.writestr("readme.txt", "hi")
    messages = {
        "random.ckpt": "not a checkpoint",
        "legacy.ckpt": "legacy",
        "empty.safetensors": "truncated or corrupt",
        "header.safetensors": "truncated or corrupt",
        "nodata.ckpt": "truncated or corrupt",
        "nopkl.ckpt": "no data.pkl",
    }
    for name, message in messages.items():
        with pytest.raises(CheckpointError, match=message):
            load_model(tmp_path / name, config="tiny-sd1")


def test_a_pickle_that_nests_itself(tmp_path):
    d = {}
    d["state_dict"] = d
    path = tmp_path / "cycle.ckpt"
    torch.save(d, path)
    with pytest.raises(CheckpointError):
        load_model(path, config="tiny-sd1")


def test_a_safetensors_file_named_ckpt_is_read_by_its_content(tiny_ckpts, tmp_path):
    model, _, preset = tiny_ckpts["sd1"]
    path = tmp_path / "really-safetensors.ckpt"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert torch.equal(load_model(path, config=preset).betas, model.betas)


# -- kinds: a file in the wrong role is named as what it is ----------------------------------------------


@pytest.fixture(scope="module")
def tuner_files(tiny_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuners")
    model = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")
    unet = model.model.diffusion_model
    unet.attach_sc_tuners()
    ctrl = unet.attach_controller(CSCTuner(model.cfg.unet))
    save_tuner_file(sc_tuner_file(model), root / "sc.safetensors")
    save_tuner_file(csc_tuner_file(model, ctrl, "canny"), root / "csc.safetensors")
    save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)},
        str(root / "lora.safetensors"),
    )
    return root


def test_files_in_the_wrong_role(tiny, tuner_files, tmp_path):
    cond = _image(tmp_path, "cond.png")
    cases = [
        (["--tuner", tuner_files / "csc.safetensors"], "is a CSC-Tuner controller (pass it with --control"),
        (
            ["--control", tuner_files / "sc.safetensors", "--control-image", cond],
            "is an SC-Tuner file (pass it with --tuner)",
        ),
        (["--tuner", tiny], "is a Stable Diffusion checkpoint (pass it with --ckpt)"),
        (["--tuner", tuner_files / "lora.safetensors"], "is a LoRA file"),
        (["--tuner", tmp_path / "nothing.safetensors"], "--tuner"),
    ]
    for k, (argv, message) in enumerate(cases):
        assert message in cli_error(TXT2IMG, ["--ckpt", tiny, *TINY, *argv], tmp_path / str(k))
    for name, message in (("sc", "is an SC-Tuner file"), ("csc", "is a CSC-Tuner controller"), ("lora", "LoRA")):
        with pytest.raises(CheckpointError, match=message):
            load_model(tuner_files / f"{name}.safetensors")


# -- tuner metadata: a schema with clear messages --------------------------------------------------------


def _with_metadata(src: Path, dst: Path, meta: str) -> Path:
    save_file(load_file(src), str(dst), metadata={"ldm_sce.tuner": meta})
    return dst


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: "{not json", "is not valid JSON"),
        (lambda m: json.dumps([1, 2]), "not a JSON object"),
        (lambda m: json.dumps({**m, "norm": "layer"}), r"unknown field\(s\) \['norm'\].*newer ldm-sce"),
        (lambda m: json.dumps({**m, "format": 2}), "format 2, written by a newer ldm-sce"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "skips"}), r"lacks the field\(s\) \['skips'\]"),
        (lambda m: json.dumps({**m, "kind": "lora"}), "field 'kind' is 'lora'"),
        (lambda m: json.dumps({**m, "down_ratio": -1}), "field 'down_ratio'"),
        (lambda m: json.dumps({**m, "skips": [0, 0]}), "do not index"),
        (lambda m: json.dumps({**m, "skips": [99]}), "do not index"),
        (lambda m: json.dumps({**m, "skip_dims": "64"}), "field 'skip_dims'"),
    ],
)
def test_malformed_tuner_metadata(tuner_files, tmp_path, edit, message):
    from safetensors import safe_open

    with safe_open(str(tuner_files / "sc.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["ldm_sce.tuner"])
    assert meta["format"] == 1
    path = _with_metadata(tuner_files / "sc.safetensors", tmp_path / "bad.safetensors", edit(meta))
    with pytest.raises(CheckpointError, match=message):
        read_tuner_file(path)


def test_tuner_files_of_earlier_versions_still_load(tiny_ckpts, tuner_files, tmp_path):
    from safetensors import safe_open

    with safe_open(str(tuner_files / "sc.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["ldm_sce.tuner"])
    del meta["format"]  # as this project wrote them before the field existed (e.g. weights/toy-*.safetensors)
    path = _with_metadata(tuner_files / "sc.safetensors", tmp_path / "old.safetensors", json.dumps(meta))
    assert read_tuner_file(path).kind == "sc"


def test_nan_tuner_and_stray_keys_are_refused_before_the_model_changes(tiny_ckpts, tuner_files, tmp_path):
    tensors = load_file(tuner_files / "sc.safetensors")
    from safetensors import safe_open

    with safe_open(str(tuner_files / "sc.safetensors"), "pt") as f:
        meta = f.metadata()
    bad = dict(tensors)
    bad["tuners.0.ln2.weight"] = torch.full_like(bad["tuners.0.ln2.weight"], float("nan"))
    save_file(bad, str(tmp_path / "nan.safetensors"), metadata=meta)
    stray = {**tensors, "tuners.x.ln1.weight": torch.zeros(1)}
    save_file(stray, str(tmp_path / "stray.safetensors"), metadata=meta)
    model = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")
    for name, message in (("nan", "NaN or inf"), ("stray", "not SC-Tuner weights")):
        with pytest.raises(CheckpointError, match=message):
            load_tuner(model, tmp_path / f"{name}.safetensors")
    assert not list(model.model.diffusion_model.tuners.parameters())  # nothing was attached


# -- configs ---------------------------------------------------------------------------------------------


def test_model_config_yaml_errors(tmp_path):
    from ldm_sce import load_config

    cases = {
        "syntax.yaml": ("preset: sd-v1\nunet: [unclosed\n", "not valid YAML"),
        "type.yaml": ("preset: sd-v1\nscale_factor: fast\n", "scale_factor: expected a number"),
        "null.yaml": ("preset: sd-v1\ntimesteps: null\n", "timesteps: expected an integer, got null"),
        "list.yaml": ("preset: sd-v1\nunet: {channel_mult: [1, two]}\n", r"channel_mult\[1\]: expected an integer"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / name)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["log_every=0"], "log_every must be an integer at least 1, got 0"),
        (["optim.lr=nan"], r"optim.lr must be a number in \(0, 1\]"),
        (["optim.lr=-1"], "optim.lr must be a number"),
        (["data.caption_dropout=1.5"], r"data.caption_dropout must be a number in \[0, 1\]"),
        (["keep_last=0"], "keep_last must be an integer at least 1"),
        (["validation.steps=0"], r"validation.steps must be an integer in 1..1000"),
        (["validation.seeds=[-1]"], "validation.seeds must be an integer"),
        (["seed=1.5"], "seed: expected an integer"),
        (["data.path=[1]"], "data.path: expected a string"),
        (["method.name=csc", "method.condition=depth"], "method.condition must be one of"),
        (["precision=fp8"], "precision must be one of fp32, bf16, fp16"),
        (["optim=3"], "optim: expected a mapping"),
        (["optim.lr.x=1"], "lr is not a section"),
        (["noequals"], "is not key=value"),
        (["data.trigger=[unclosed"], "not valid YAML"),
    ],
)
def test_training_config_values_are_checked(tiny, dataset, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(train_config(tmp_path, tiny, dataset), overrides)


def test_training_config_file_errors(tmp_path):
    (tmp_path / "syntax.yaml").write_text("model: {ckpt: [\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    for name, message in (
        ("syntax.yaml", "not valid YAML"),
        ("list.yaml", "must be a mapping"),
        ("missing.yaml", "cannot read the training config"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_train_config(tmp_path / name)


# -- training --------------------------------------------------------------------------------------------


def test_files_the_config_names_are_checked_before_training(tiny, dataset, tmp_path):
    def trainer(**sections):
        return Trainer(load_train_config(train_config(tmp_path, tiny, dataset, **sections)))

    cases = [
        (
            {"validation": {"prompts": ["a"], "control_images": [str(tmp_path / "nope.png")]}},
            r"validation.control_images\[0\]: image not found",
        ),
        ({"model": {"ckpt": str(tmp_path / "no.ckpt")}}, "model.ckpt .* not found"),
        ({"data": {"path": str(tmp_path / "nodata")}}, "training data not found"),
        (
            {"method": {"name": "csc", "condition": "raw"}, "data": {"condition_dir": str(tmp_path / "nomaps")}},
            "is not a folder",
        ),
        ({"data": {"resolution": 12}}, "data.resolution 12: this model takes multiples of 8"),
    ]
    for sections, message in cases:
        with pytest.raises(ConfigError, match=message):
            trainer(**sections)
    maps = tmp_path / "maps"
    maps.mkdir()
    with pytest.raises(ConfigError, match="lacks the condition map of 8 image"):
        trainer(method={"name": "csc"}, data={"condition_dir": str(maps)})
    assert not (tmp_path / "out").exists()  # nothing was started


def test_a_dataset_with_no_readable_image_stops_before_step_one(tiny, tmp_path):
    data = tmp_path / "broken"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match="none of its 3 image"):
        Trainer(load_train_config(train_config(tmp_path, tiny, data)))
    assert not (tmp_path / "out").exists()


def test_a_non_finite_loss_stops_the_run_and_exports_nothing(tiny, dataset, tmp_path):
    cfg = load_train_config(train_config(tmp_path, tiny, dataset, optim={"max_steps": 4}, save_every=1))
    trainer = Trainer(cfg)
    prepare = trainer._prepare

    def diverging(micro):  # the second step's batch gives a NaN loss, as a diverged run would
        batch = prepare(micro)
        if micro == 1:
            batch["target"] = batch["target"] * float("nan")
        return batch

    trainer._prepare = diverging
    with pytest.raises(TrainingError, match="step 2: the loss is nan.*exports nothing"):
        trainer.train()
    out = tmp_path / "out"
    assert not list(out.glob("*.safetensors"))
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["step-000001.pt"]  # the good step is kept
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # strict JSON lines
    assert [r["step"] for r in rows] == [1] and isinstance(rows[0]["loss"], float)


def test_the_tuner_is_exported_before_the_final_validation(tiny, dataset, tmp_path, monkeypatch):
    cfg = load_train_config(
        train_config(tmp_path, tiny, dataset, optim={"max_steps": 1}, validation={"prompts": ["a"], "steps": 2})
    )

    def broken(self):
        raise NonFiniteError("validation failed")

    monkeypatch.setattr(Trainer, "sample_validation", broken)
    with pytest.raises(NonFiniteError):
        Trainer(cfg).train()
    assert (tmp_path / "out" / "sc_tuner.safetensors").is_file()


def test_csc_training_from_precomputed_conditions(tiny, dataset, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    for p in dataset.glob("*.png"):
        Image.fromarray(255 - np.asarray(Image.open(p))).save(maps / p.name)
    cfg = load_train_config(
        train_config(
            tmp_path,
            tiny,
            dataset,
            method={"name": "csc"},
            data={"condition_dir": str(maps)},
            optim={"max_steps": 2},
            validation={"prompts": ["a"], "steps": 2, "control_images": [str(maps / "00.png")]},
        )
    )
    path = Trainer(cfg).train()
    assert path.name == "csc_raw.safetensors" and read_tuner_file(path).condition == "raw"
    assert (tmp_path / "out" / "validation" / "step-000002.png").is_file()


def test_a_fresh_run_does_not_write_over_an_earlier_one(tiny, dataset, tmp_path):
    cfg = load_train_config(train_config(tmp_path, tiny, dataset, optim={"max_steps": 2}, save_every=1))
    Trainer(cfg).train()
    exported = (tmp_path / "out" / "sc_tuner.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="holds the checkpoints of an earlier run.*--resume latest"):
        Trainer(cfg)
    assert (tmp_path / "out" / "sc_tuner.safetensors").read_bytes() == exported


def test_resume_states_what_changed_and_refuses_what_breaks_exactness(tiny, dataset, tmp_path, caplog):
    path = train_config(tmp_path, tiny, dataset, optim={"max_steps": 2}, save_every=1)
    Trainer(load_train_config(path)).train()
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.01.*--resume-force"):
        Trainer(load_train_config(path, ["optim.lr=1e-2", "optim.max_steps=3"]), resume="latest")
    with pytest.raises(ConfigError, match=r"data.path: .* -> .*other"):
        Trainer(load_train_config(path, [f"data.path={dataset}/../other", "optim.max_steps=3"]), resume="latest")
    with caplog.at_level(logging.INFO):
        forced = Trainer(load_train_config(path, ["optim.lr=1e-2", "optim.max_steps=3"]), "latest", resume_force=True)
    assert forced.step == 2 and "forced" in caplog.text
    extended = Trainer(load_train_config(path, ["optim.max_steps=3", "log_every=2"]), resume="latest")
    assert extended.step == 2  # where the run ends, and how often it logs, may change


def test_a_corrupt_resume_checkpoint_is_named(tiny, dataset, tmp_path):
    path = train_config(tmp_path, tiny, dataset, optim={"max_steps": 2}, save_every=1)
    Trainer(load_train_config(path)).train()
    latest = sorted((tmp_path / "out" / "checkpoints").glob("step-*.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*earlier one"):
        Trainer(load_train_config(path), resume="latest")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer(load_train_config(path), resume=str(tmp_path / "nope.pt"))


def test_train_cli_gives_one_line(tiny, dataset, tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"ckpt": str(tiny)}, "data": {"path": str(dataset)}, "log_every": 0}))
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--base", str(bad)], capture_output=True, text=True
    )
    assert r.returncode == 2 and "log_every must be an integer at least 1" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# -- defaults come from the model, not the file name ------------------------------------------------------


def test_the_default_size_comes_from_the_models_config(tmp_path):
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(DEFAULT_CKPT.read_bytes())
    out = tmp_path / "out"
    args = TXT2IMG.parser().parse_args(["--ckpt", str(renamed), "--ddim_steps", "2", "--outdir", str(out), "--quiet"])
    TXT2IMG.main(args)
    assert Image.open(out / "samples" / "00000.png").size == (64, 64)
    assert PRESETS["sd-v2-v"].native_size == 768 and PRESETS["sd-v1"].native_size == 512


def test_long_prompts_are_cut_with_a_warning(caplog):
    from ldm_sce.text_encoders import tokenize

    with caplog.at_level(logging.WARNING):
        tokens = tokenize(["a red square " * 40])
    assert tokens.shape == (1, 77) and "120 tokens" in caplog.text and "first 75" in caplog.text
    caplog.clear()
    tokenize(["a red square"])
    assert not caplog.text


def test_the_cli_prints_one_line_for_a_project_error(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "txt2img.py"), "--scale", "nan", "--outdir", str(tmp_path), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip() == "txt2img.py: error: --scale must be a number in [0, 100], got nan"


def test_condition_images_and_masks(tiny, tuner_files, tmp_path):
    grey16 = tmp_path / "depth16.png"
    Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)).save(grey16)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    control = ["--control", tuner_files / "csc.safetensors", "--control-type", "raw"]
    out = tmp_path / "ok"
    args = TXT2IMG.parser().parse_args(
        [*map(str, ["--ckpt", tiny, *TINY, *control, "--control-image", grey16]), "--outdir", str(out), "--quiet"]
    )
    TXT2IMG.main(args)  # a 16-bit depth map is a usable condition (8x the 8x8 latent): the scaled ramp
    saved = np.asarray(Image.open(out / "control-0-raw.png"))
    assert saved.shape == (64, 64, 3) and saved.min() < 5 and saved.max() > 245 and len(np.unique(saved)) > 100
    for k, extra in enumerate(
        [
            ["--control-image", tmp_path / "broken.png"],
            ["--control-image", grey16, "--control-mask", tmp_path / "none.png"],
            ["--control-image", grey16, "--control-weight", 0.5, "--control-weight", 0.5],
        ]
    ):
        message = cli_error(TXT2IMG, ["--ckpt", tiny, *TINY, *control, *extra], tmp_path / f"bad{k}")
        assert ("not an image" in message, "not found" in message, "given 2 times for 1" in message)[k], message


def test_dataset_layout_errors(tmp_path):
    from ldm_sce.data import scan

    def folder(name, files):
        d = tmp_path / name
        d.mkdir()
        for fname, data in files.items():
            (d / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
        return d

    cases = {
        "csv": ({"train.csv": "Target:FILE,Prompt\na.png\n"}, "do not have a file and a prompt"),
        "csvhead": ({"train.csv": "file,text\na.png,x\n"}, "expected the header"),
        "jsonl": ({"metadata.jsonl": '{"file_name": "a.png"}\n[1, 2]\n'}, r"metadata.jsonl:2: expected"),
        "jsonltext": ({"metadata.jsonl": '{"file_name": "a.png", "text": 5}\n'}, "expected"),
        "latin1": ({"a.png": b"", "a.txt": "caf\xe9".encode("latin-1")}, "not UTF-8 text"),
        "empty": ({"notes.md": "x"}, "no images"),
    }
    for name, (files, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            scan(folder(name, files))
    with pytest.raises(ConfigError, match="training data not found"):
        scan(tmp_path / "nowhere")


def test_a_view_larger_than_its_storage_is_refused(tmp_path):
    """A zero-stride record can claim 10^12 elements from 4 values: refused before anything is allocated."""
    pid = ("storage", torch.float32, "0", "cpu", 4)
    payload = _forged(pid, size=(10**12,), stride=(0,))
    path = _zip_with_pickle(tmp_path / "bomb.ckpt", payload, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match="does not fit its storage"):
        load_model(path, config="tiny-sd1")


def test_the_schedule_stays_float32_when_the_model_is_cast():
    from ldm_sce import LatentDiffusion
    from ldm_sce.diffusion import make_schedule

    model = LatentDiffusion(PRESETS["tiny-sd1"]).to(torch.bfloat16)
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.equal(model.alphas_cumprod, make_schedule(0.00085, 0.012, 1000)["alphas_cumprod"])
    assert model.half().alphas_cumprod[:4].tolist() != [1.0, 1.0, 0.99609375, 0.99609375]  # as bf16 rounds them
