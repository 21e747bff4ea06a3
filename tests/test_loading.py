"""Reading and strict loading of original-format checkpoints: safe unpickling, layouts, errors, EMA."""

import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from ldm_sce import CheckpointError, load_model, read_checkpoint
from ldm_sce.checkpoint_io import detect_family
from ldm_sce.config import PRESETS
from ldm_sce.diffusion import LatentDiffusion

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.fixture(scope="module")
def sd1(tiny_ckpts):
    model, path, preset = tiny_ckpts["sd1"]
    return model, path, preset, {k: v.contiguous().clone() for k, v in model.state_dict().items()}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class ModelCheckpoint:
    """Pickled under Lightning's module name below, as real SD checkpoints do."""

    def __init__(self):
        self.monitor, self.best_model_score = None, torch.tensor(0.25)


def test_lightning_pickle_loads_without_lightning(sd1, tmp_path, monkeypatch):
    model, _, preset, sd = sd1
    name = "pytorch_lightning.callbacks.model_checkpoint"
    fake = types.ModuleType(name)
    fake.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setattr(ModelCheckpoint, "__module__", name)
    for mod in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, mod, fake)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, path)
    for mod in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.delitem(sys.modules, mod)
    with pytest.raises(pickle.UnpicklingError):  # torch's own safe loader refuses such files
        torch.load(path, weights_only=True)
    tensors, extras = read_checkpoint(path)
    assert extras["global_step"] == 470000
    assert same_weights(load_model(path, config=preset), model)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_nothing_runs(sd1, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd1[3], "payload": Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load.*system"):
        load_model(path, config=sd1[2])
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(sd1, tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd1[3]}, path)
    else:
        save_file(sd1[3], str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path, config=sd1[2])


def test_missing_file():
    with pytest.raises(CheckpointError, match="not found"):
        load_model("no/such/file.ckpt")


def test_wrong_family_config(sd1):
    with pytest.raises(CheckpointError, match=r"wrong shape|unexpected") as e:
        load_model(sd1[1], config="tiny-sd2")
    assert "Likely cause" in str(e.value)


def test_missing_keys_are_listed(sd1, tmp_path):
    sd = dict(sd1[3])
    dropped = [k for k in sd if k.startswith("model.diffusion_model.output_blocks.5.")][:3]
    for k in dropped:
        del sd[k]
    path = tmp_path / "partial.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="3 missing key") as e:
        load_model(path, config=sd1[2])
    assert all(k in str(e.value) for k in dropped) and "truncated or partial" in str(e.value)


def test_lora_passed_as_checkpoint(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(path))
    with pytest.raises(CheckpointError, match="LoRA"):
        load_model(path)


def test_layouts_unwrapped_and_doubly_wrapped(sd1, tmp_path):
    model, _, preset, sd = sd1
    flat_st = tmp_path / "flat.safetensors"
    save_file(sd, str(flat_st))
    flat_ckpt, double = tmp_path / "flat.ckpt", tmp_path / "double.ckpt"
    torch.save(sd, flat_ckpt)
    torch.save({"state_dict": {"state_dict": sd}, "epoch": 3}, double)
    for path in (flat_st, flat_ckpt, double):
        assert same_weights(load_model(path, config=preset), model), path


def test_tolerated_extras_and_fp16(sd1, tmp_path):
    model, _, preset, sd = sd1
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.rand(1, 77)  # corrupt
    sd["logvar"] = torch.zeros(1000)
    for name in ("betas", "alphas_cumprod"):  # schedule buffers may be absent
        del sd[name]
    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": sd, "global_step": 1}, path)
    loaded = load_model(path, config=preset)
    assert loaded.model.diffusion_model.out[2].weight.dtype == torch.float32
    assert torch.equal(loaded.model.diffusion_model.out[2].weight, sd["model.diffusion_model.out.2.weight"].float())
    assert torch.equal(loaded.betas, model.betas) and torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)
    ids = loaded.cond_stage_model.transformer.text_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(77)[None])
    assert (
        load_model(path, config=preset, dtype=torch.float16).model.diffusion_model.out[2].weight.dtype == torch.float16
    )


def test_ema_selection(sd1, tmp_path, caplog):
    model, _, preset, sd = sd1
    sd = dict(sd)
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd["model_ema." + k[len("model.") :].replace(".", "")] = sd[k] + 1.0
    sd["model_ema.decay"], sd["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10, dtype=torch.int32)
    path = tmp_path / "ema.ckpt"
    torch.save({"state_dict": sd}, path)
    regular, ema = load_model(path, config=preset), load_model(path, config=preset, use_ema=True)
    assert torch.equal(regular.model.diffusion_model.out[2].weight, model.model.diffusion_model.out[2].weight)
    assert torch.equal(ema.model.diffusion_model.out[2].weight, model.model.diffusion_model.out[2].weight + 1.0)
    assert torch.equal(ema.first_stage_model.quant_conv.weight, model.first_stage_model.quant_conv.weight)
    # a file without EMA weights: warn and use the regular ones
    assert same_weights(load_model(sd1[1], config=preset, use_ema=True), model)
    assert "no EMA weights" in caplog.text


def test_config_from_metadata_sidecar_and_override(tiny_ckpts, tmp_path):
    from ldm_sce import save_checkpoint

    model, _, _ = tiny_ckpts["sd2"]
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)  # carries its config as metadata: no config needed
    assert load_model(path).parameterization == "eps"
    assert load_model(path, parameterization="v").parameterization == "v"
    bare = tmp_path / "bare.safetensors"
    save_checkpoint(model, bare, metadata=False)
    (tmp_path / "bare.yaml").write_text("preset: tiny-sd2\nparameterization: v\n")
    loaded = load_model(bare)
    assert loaded.parameterization == "v" and same_weights(loaded, model)


def test_detect_family():
    for preset, family in (("sd-v1", "sd1"), ("sd-v2-base", "sd2")):
        with torch.device("meta"):
            sd = LatentDiffusion(PRESETS[preset]).state_dict()
        assert detect_family(sd) == family
        unet_only = {k: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        assert detect_family(unet_only) == family  # from proj_in's shape alone
    with torch.device("meta"):
        sdxl = LatentDiffusion(PRESETS["sdxl-base"]).state_dict()
    assert detect_family(sdxl) == "sdxl"
    assert detect_family({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}) == "sdxl"
    with pytest.raises(CheckpointError, match="refiner"):
        detect_family({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1)})


def test_detected_preset_mismatch_names_the_fix(sd1):
    with pytest.raises(CheckpointError, match="pass the config"):
        load_model(sd1[1])  # a tiny file without config is detected as sd1, whose full-size shapes differ


def test_v_prediction_guess_rule(tiny_ckpts):
    """A1111's rule: v if mean(UNet(x=1, t=999, ctx=0.5) - x) < -1. With the output conv zeroed, the UNet
    returns its bias everywhere, so the rule's input is known exactly."""
    from ldm_sce.checkpoint_io import _guess_v_prediction

    model = load_model(tiny_ckpts["sd2"][1], config="tiny-sd2")
    conv = model.model.diffusion_model.out[2]
    conv.weight.zero_()
    conv.bias.fill_(-2.5)  # mean(out - x) = -3.5
    assert _guess_v_prediction(model)
    conv.bias.fill_(-0.5)  # -1.5... still v
    assert _guess_v_prediction(model)
    conv.bias.fill_(0.5)  # -0.5: eps
    assert not _guess_v_prediction(model)
