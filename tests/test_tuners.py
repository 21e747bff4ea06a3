"""SC-Tuner and CSC-Tuner: parameter counts, identity at init, the scale/weight formulas, decoder-only
backprop, tuner files (ours and the official layouts) and base-model checks."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ldm_sce import PRESETS, CheckpointError, load_model
from ldm_sce.tuner_files import csc_tuner_file, load_tuner, save_tuner_file, sc_tuner_file
from ldm_sce.tuners import Control, CSCTuner, SCTuner, Tuning, count_parameters
from ldm_sce.unet import UNetModel


def meta_unet(preset):
    with torch.device("meta"):
        return UNetModel(PRESETS[preset].unet)


@pytest.mark.parametrize(
    "down_ratio,skips,op,expected",
    [
        (1.0, None, "linear", 19_680_000),  # paper: 19.68M
        (1 / 5, None, "linear", 3_943_680),  # tab. 5a: 3.94M
        (1 / 10, None, "linear", 1_976_640),  # 1.98M
        (1.0, [0, 11], "linear", 3_484_800),  # tab. 5b: 3.48M
        (1.0, [0, 3, 6, 9, 11], "linear", 7_790_080),  # 7.79M
        (1 / 8, None, "conv", 22_129_200),  # tab. 5c "Conv": 22.13M
    ],
)
def test_sc_tuner_parameter_counts_sd15(down_ratio, skips, op, expected):
    unet = meta_unet("sd-v1")
    with torch.device("meta"):
        tuners = unet.attach_sc_tuners(down_ratio, skips, op)
    assert sum(count_parameters(t) for t in tuners) == expected


@pytest.mark.parametrize("kernel,expected", [(1, 28_824_400), (3, 99_111_760)])  # paper: 28.82M, 99.11M
def test_csc_tuner_parameter_counts_sd21(kernel, expected):
    with torch.device("meta"):
        assert count_parameters(CSCTuner(PRESETS["sd-v2-v"].unet, kernel=kernel)) == expected


@pytest.fixture
def model(tiny_ckpts):
    _, path, preset = tiny_ckpts["sd1"]
    return load_model(path, config=preset)


def inputs(model, b=2, hw=(8, 12)):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 4, *hw, generator=g),
        torch.tensor([10, 600][:b]),
        torch.randn(b, 77, model.cfg.unet.context_dim, generator=g),
    )


def randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05


def cond_image(b=1, hw=(64, 96), seed=2):  # 8x the 8x12 latent
    return torch.rand(b, 3, *hw, generator=torch.Generator().manual_seed(seed))


def test_fresh_tuners_and_controller_are_exact_identities(model):
    x, t, c = inputs(model)
    unet = model.model.diffusion_model
    base_keys = set(model.state_dict())
    with torch.no_grad():
        base = unet(x, t, c)
        unet.attach_sc_tuners()
        ctrl = unet.attach_controller(CSCTuner(model.cfg.unet, kernel=3))
        randomize(ctrl.pre_hint_blocks)  # the hint encoder is not zero-initialised; the dense convs are
        control = Control([ctrl.hints(cond_image())], [1.0], 1.0)
        assert torch.equal(unet(x, t, c, Tuning(1.0, control)), base)
    unet.replace_tuners([SCTuner(64)] + list(unet.tuners)[1:])  # any slot can be replaced; the base keys never change
    assert {k for k in model.state_dict() if "tuners" not in k and "controllers" not in k} == base_keys


def record_first_skip(unet):
    """The edited skip entering output block 0 (h there is the middle block's output: no tuner effect)."""
    seen = {}

    def hook(module, args):
        seen["x"] = args[0]

    return seen, unet.output_blocks[0].register_forward_pre_hook(hook)


def mlp(x, tuner):  # ln2(GELU(ln1(x))) written out, token-wise over channels
    y = x.permute(0, 2, 3, 1)
    y = F.linear(F.gelu(F.linear(y, tuner.ln1.weight, tuner.ln1.bias)), tuner.ln2.weight, tuner.ln2.bias)
    return y.permute(0, 3, 1, 2)


def test_scale_and_weight_formulas(model):
    x, t, c = inputs(model)
    unet = model.model.diffusion_model
    ch = unet.output_blocks[0][0].in_layers[0].num_channels - model.cfg.unet.skip_channels[0]
    seen, handle = record_first_skip(unet)
    with torch.no_grad():
        unet(x, t, c)
        skip = seen.pop("x")[:, ch:].clone()
        tuners = unet.attach_sc_tuners()
        for tuner in tuners:
            randomize(tuner, seed=3)
        for s in (0.0, 0.5, 2.0):
            unet(x, t, c, Tuning(s))
            torch.testing.assert_close(seen.pop("x")[:, ch:], skip + s * mlp(skip, tuners[0]))
        ctrls = [unet.attach_controller(CSCTuner(model.cfg.unet)) for _ in range(2)]
        for i, ctrl in enumerate(ctrls):
            randomize(ctrl, seed=10 + i)
        hints = [ctrl.hints(cond_image(seed=i)) for i, ctrl in enumerate(ctrls)]
        unet(x, t, c, Tuning(0.5, Control(hints, [0.3, 0.7], 0.8)))
        expected = skip + 0.5 * mlp(skip, tuners[0])
        for ctrl, hs, w in zip(ctrls, hints, [0.3, 0.7], strict=True):
            expected = expected + 0.8 * w * (hs[0] + mlp(skip + hs[0], ctrl.lsc_tuner_blocks[0]))
        torch.testing.assert_close(seen.pop("x")[:, ch:], expected)
    handle.remove()


def test_hints_match_every_skip(model):
    hints = CSCTuner(model.cfg.unet, kernel=3).hints(cond_image(hw=(64, 96)))  # 8x the 8x12 latent, as for SD
    assert [tuple(h.shape[1:]) for h in hints] == model.cfg.unet.skip_shapes(8, 12)


def test_backward_reaches_only_tuners_and_records_nothing_before_them(model):
    x, t, c = inputs(model)
    unet = model.model.diffusion_model
    for tuner in unet.attach_sc_tuners():
        randomize(tuner, seed=4)
    ctrl = unet.attach_controller(CSCTuner(model.cfg.unet))
    randomize(ctrl, seed=5)
    trainable = list(unet.tuners.parameters()) + list(ctrl.parameters())
    for p in trainable:
        p.requires_grad_(True)

    section = {"now": None}
    saved = {"encoder": 0, "middle": 0, "decoder": 0}
    unet.input_blocks[0].register_forward_pre_hook(lambda *a: section.update(now="encoder"))
    unet.middle_block.register_forward_pre_hook(lambda *a: section.update(now="middle"))
    unet.middle_block.register_forward_hook(lambda *a: section.update(now="decoder"))  # skip edits onwards

    def pack(tensor):
        if section["now"]:
            saved[section["now"]] += 1
        return tensor

    hints = ctrl.hints(cond_image())  # the controller's own graph (it is trained)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, t, c, Tuning(control=Control([hints], [1.0])))
    assert saved["encoder"] == 0 and saved["middle"] == 0 and saved["decoder"] > 0, saved
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    frozen = [n for n, p in unet.named_parameters() if p.grad is not None and not p.requires_grad]
    assert not frozen and all(p.grad is None for n, p in unet.named_parameters() if not p.requires_grad)


def output_with(model, control=None, tuner_scale=1.0):
    x, t, c = inputs(model)
    with torch.no_grad():
        return model.apply_model(x, t, c, Tuning(tuner_scale, control))


def trained_like(model, seed=7):
    """Attach SC-Tuners and a controller with random (non-identity) weights."""
    unet = model.model.diffusion_model
    for tuner in unet.attach_sc_tuners(down_ratio=0.5, skips=[0, 2, 5, 8]):
        randomize(tuner, seed=seed)
    ctrl = unet.attach_controller(CSCTuner(model.cfg.unet, kernel=3))
    randomize(ctrl, seed=seed + 1)
    return ctrl


def test_own_format_round_trip(model, tiny_ckpts, tmp_path):
    ctrl = trained_like(model)
    save_tuner_file(sc_tuner_file(model, {"steps": 3}), tmp_path / "sc.safetensors")
    save_tuner_file(csc_tuner_file(model, ctrl, "canny"), tmp_path / "csc.safetensors")
    cond = cond_image()
    with torch.no_grad():
        ref = output_with(model, Control([ctrl.hints(cond)], [1.0]))
    fresh = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")
    load_tuner(fresh, tmp_path / "sc.safetensors")
    loaded = load_tuner(fresh, tmp_path / "csc.safetensors")
    assert loaded.condition == "canny"
    with torch.no_grad():
        assert torch.equal(output_with(fresh, Control([loaded.hints(cond)], [1.0])), ref)


def test_official_layouts_load_to_the_same_outputs(model, tiny_ckpts, tmp_path):
    ctrl = trained_like(model, seed=20)
    unet = model.model.diffusion_model
    skips = [0, 2, 5, 8]  # the tiny UNet has 9 skips
    # swift adapter folder
    swift = tmp_path / "style" / "0_SwiftSCETuning"
    swift.mkdir(parents=True)
    (swift / "adapter_config.json").write_text(
        json.dumps({"dims": [32] * 12, "down_ratio": 0.5, "tuner_mode": "identity", "tuner_op": "SCEAdapter"})
    )
    save_file(
        {
            f"model.lsc_identity.{m}.scetuner_0_SwiftSCETuning.tuner_op.{k}": v.contiguous()
            for m in skips
            for k, v in unet.tuners[m].state_dict().items()
        },
        str(swift / "adapter_model.safetensors"),
    )
    # native scepter checkpoint
    native = tmp_path / "ldm_step-100"
    native.mkdir()
    torch.save(
        {f"model.lsc_identity.{m}.tuner_op.{k}": v for m in skips for k, v in unet.tuners[m].state_dict().items()},
        native / "pytorch_model.bin",
    )
    # released controller folder
    released = tmp_path / "canny" / "0_SwiftSCETuning"
    released.mkdir(parents=True)
    (released / "configuration.json").write_text(json.dumps({"CONTROL_MODEL": {"NAME": "CSCTuners"}}))
    ctrl_sd = {}
    for k, v in ctrl.state_dict().items():
        parts = k.split(".")
        if parts[0] == "lsc_tuner_blocks":  # official: lsc_tuner_blocks.{m}.tuner_op.ln1.weight
            k = ".".join(parts[:2] + ["tuner_op"] + parts[2:])
        ctrl_sd[f"model.0.{k}"] = v
    torch.save(ctrl_sd, released / "pytorch_model.bin")

    cond = cond_image()
    with torch.no_grad():
        ref = output_with(model, Control([ctrl.hints(cond)], [1.0]))
    for sc_source in (tmp_path / "style", native / "pytorch_model.bin"):
        fresh = load_model(tiny_ckpts["sd1"][1], config="tiny-sd1")
        load_tuner(fresh, sc_source)
        loaded = load_tuner(fresh, tmp_path / "canny")
        with torch.no_grad():
            assert torch.equal(output_with(fresh, Control([loaded.hints(cond)], [1.0])), ref), sc_source


def test_tuner_for_another_base_is_refused(model, tiny_ckpts, tmp_path):
    trained_like(model)
    save_tuner_file(sc_tuner_file(model), tmp_path / "sd1.safetensors")
    other = load_model(tiny_ckpts["sd2"][1], config="tiny-sd2")
    with pytest.raises(CheckpointError, match="made for sd1, model is sd2"):
        load_tuner(other, tmp_path / "sd1.safetensors")
    full = meta_unet("sd-v1")  # SD1.5-size tuner (1280-channel skips) onto the tiny model
    with torch.device("meta"):
        full.attach_sc_tuners()
    sd = {f"tuners.{m}.{k}": torch.zeros(v.shape) for m in (0, 11) for k, v in full.tuners[m].state_dict().items()}
    save_file(
        sd,
        str(tmp_path / "big.safetensors"),
        metadata={
            "ldm_sce.tuner": json.dumps(
                {"kind": "sc", "skip_dims": list(PRESETS["sd-v1"].unet.skip_channels), "skips": [0, 11], "base": None}
            )
        },
    )
    with pytest.raises(CheckpointError, match=r"skip dims \[1280.*has \[64"):
        load_tuner(model, tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match="not a tuner file"):
        load_tuner(model, tiny_ckpts["sd1"][1])


def test_control_range_switches_control_by_sampling_progress(model):
    from ldm_sce.sampling import cfg_denoiser

    unet = model.model.diffusion_model
    ctrl = unet.attach_controller(CSCTuner(model.cfg.unet))
    randomize(ctrl, seed=8)
    control = Control([ctrl.hints(cond_image())], [1.0])
    x, _, c = inputs(model, b=1)
    uc = torch.zeros_like(c)
    t_early, t_late = torch.tensor([900]), torch.tensor([100])  # progress 0.1 and 0.9
    with torch.no_grad():
        plain = cfg_denoiser(model, c, uc, 5.0)
        first_half = cfg_denoiser(model, c, uc, 5.0, Tuning(control=control, control_range=(0.0, 0.5)))
        assert not torch.equal(first_half.eps(x, t_early), plain.eps(x, t_early))  # control acts early
        assert torch.equal(first_half.eps(x, t_late), plain.eps(x, t_late))  # and not after 50%


def test_convert_tuner_cli(model, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from ldm_sce.tuner_files import read_tuner_file

    unet = model.model.diffusion_model
    tuners = unet.attach_sc_tuners(skips=[1, 4])
    for tuner in tuners:
        randomize(tuner, seed=9)
    native = tmp_path / "ldm_step-10"
    native.mkdir()
    torch.save(
        {f"model.lsc_identity.{m}.tuner_op.{k}": v for m in (1, 4) for k, v in unet.tuners[m].state_dict().items()},
        native / "pytorch_model.bin",
    )
    tool = Path(__file__).resolve().parents[1] / "tools" / "convert_tuner.py"
    r = subprocess.run(
        [sys.executable, str(tool), str(native), str(tmp_path / "out.safetensors"), "--base", "sd1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    tf = read_tuner_file(tmp_path / "out.safetensors")
    assert (tf.kind, tf.base, tf.skips, tf.down_ratio) == ("sc", "sd1", [1, 4], 1.0)
    assert torch.equal(tf.state_dict["tuners.4.ln2.weight"], unet.tuners[4].ln2.weight)
    r = subprocess.run(
        [sys.executable, str(tool), str(tmp_path / "nothing"), str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not found" in r.stderr
