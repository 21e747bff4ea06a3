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
    unet = model.model.diffusion_model
    x, t, c = inputs(model, hw=(8, 12))
    shapes = []
    hooks = [b.register_forward_hook(lambda m, a, o: shapes.append(o.shape[1:])) for b in unet.input_blocks]
    with torch.no_grad():
        unet(x, t, c)
    for h in hooks:
        h.remove()
    hints = CSCTuner(model.cfg.unet, kernel=3).hints(cond_image(hw=(64, 96)))  # 8x the latent, as for SD
    assert [h.shape[1:] for h in hints] == shapes[::-1]


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


def test_decoder_checkpointing_same_gradients_fewer_saved_tensors(model):
    x, t, c = inputs(model)
    unet = model.model.diffusion_model
    tuners = unet.attach_sc_tuners()
    for tuner in tuners:
        randomize(tuner, seed=6)
    params = list(unet.tuners.parameters())
    for p in params:
        p.requires_grad_(True)
    grads, saved = {}, {}
    for flag in (False, True):
        unet.checkpoint_decoder = flag
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = unet(x, t, c).square().mean()
        grads[flag] = torch.autograd.grad(loss, params)
        saved[flag] = count[0]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert saved[True] < saved[False] / 3, saved


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


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_frozen_conv_same_input_gradient_without_keeping_the_input(stride, padding, k):
    from ldm_sce.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(16, 24, k, stride=stride, padding=padding).requires_grad_(False)
    x = torch.randn(2, 16, 9, 10, requires_grad=True)
    g = torch.randn_like(F.conv2d(x, conv.weight, conv.bias, stride, padding))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv(x)
    assert all(t.data_ptr() != x.data_ptr() for t in saved) and len(saved) == 1  # the weight only
    ref = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    assert torch.equal(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-6, atol=1e-6)
    conv.requires_grad_(True)  # trainable: the plain path, weight gradients available
    (gw,) = torch.autograd.grad(conv(x), conv.weight, g)
    assert gw.abs().sum() > 0


def test_geglu_same_gradients_keeping_one_tensor():
    from ldm_sce.layers import geglu

    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = geglu(h)
    assert len(saved) == 1
    a, b = h.chunk(2, dim=-1)
    torch.testing.assert_close(y, a * F.gelu(b))
    assert torch.autograd.gradcheck(geglu, (h,))


def _saved_bytes(fn, x, module):
    """fn(x) and the bytes it keeps for backward, the module's own weights not counted."""
    storages, weights = {}, {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return y, sum(storages.values())


def test_frozen_resblock_and_feedforward_keep_less_same_gradients():
    """GroupNorm + SiLU and the GEGLU projection are rerun in backward when frozen: same outputs and input
    gradients as the plain layers, less kept; trainable: the plain path, with weight gradients."""
    from ldm_sce.attention import FeedForward
    from ldm_sce.unet import ResBlock

    torch.manual_seed(0)
    block, ff = ResBlock(64, 32, 96).requires_grad_(False), FeedForward(64).requires_grad_(False)
    for m in block.modules():  # non-trivial norms and a non-zero output conv
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, 1.0 if isinstance(m, torch.nn.GroupNorm) else 0.05)
    emb = torch.randn(2, 32)

    def plain_block(x):
        h = block.in_layers[2](F.silu(block.in_layers[0](x))) + block.emb_layers(emb)[:, :, None, None]
        return block.skip_connection(x) + block.out_layers[3](F.silu(block.out_layers[0](h)))

    def plain_ff(x):
        a, b = ff.net[0].proj(x).chunk(2, dim=-1)
        return ff.net[2](a * F.gelu(b))

    cases = [
        (lambda x: block(x, emb), plain_block, torch.randn(2, 64, 12, 12), block, 0.55),
        (ff, plain_ff, torch.randn(2, 50, 64), ff, 0.2),
    ]
    for ours, plain, x, module, ratio in cases:
        x.requires_grad_(True)
        y, kept = _saved_bytes(ours, x, module)
        y_ref, kept_ref = _saved_bytes(plain, x, module)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        g = torch.randn_like(y)
        torch.testing.assert_close(
            torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], rtol=1e-5, atol=1e-6
        )
        assert kept < ratio * kept_ref, (kept, kept_ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the rerun in backward is under the same autocast
            y, y_ref = ours(x), plain(x)
        assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
        torch.testing.assert_close(
            torch.autograd.grad(y, x, g.bfloat16())[0], torch.autograd.grad(y_ref, x, g.bfloat16())[0], rtol=0, atol=0
        )
    ff.requires_grad_(True)
    ff(torch.randn(2, 5, 64, requires_grad=True)).sum().backward()
    assert ff.net[0].proj.weight.grad.abs().sum() > 0
