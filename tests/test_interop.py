"""Files made elsewhere and tools users already run: released controllers of any hint width, scepter
Studio's TEXT_SCE tuners, several tuners at once, community LoRA files (against diffusers' own loader), the
diffusers integration (against our UNet), and the community metadata of our files."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as su
from helpers import hf_text_towers, random_model, write_kohya_lora
from safetensors import safe_open
from safetensors.torch import save_file

from ldm_sce import PRESETS, CheckpointError, load_model
from ldm_sce.config import HINT_STRIDES, to_compvis_yaml
from ldm_sce.lora import diffusers_unet_name, load_lora, lora_targets, remove_lora
from ldm_sce.text_encoders import tokenize
from ldm_sce.tuner_files import (
    csc_tuner_file,
    load_tuner,
    load_tuners,
    read_tuner_file,
    save_tuner_file,
    sc_tuner_file,
)
from ldm_sce.tuners import Control, CSCTuner, SkipIdentity, TunerSet, Tuning


def assert_close(ours, ref, rel=1e-5):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} * {scale:.3g}"


def randomize(module, seed, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * std


@pytest.fixture(scope="module")
def models(tiny_files):
    """{family: (path, config)}: tiny random SD1, SD2 and SDXL checkpoints in the original layout."""
    return tiny_files


def fresh(models, family):
    path, cfg = models[family]
    return load_model(path, config=cfg)


def unet_inputs(model, b=2, hw=(8, 8)):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(b, 4, *hw, generator=g), torch.tensor([30, 700][:b])
    ctx = torch.randn(b, 77, model.cfg.unet.context_dim, generator=g)
    y = torch.randn(b, model.cfg.unet.adm_in_channels, generator=g) if model.cfg.unet.has_vector else None
    return x, t, ctx, y


def ours_out(model, x, t, ctx, y, tuning=None):
    c = {"crossattn": ctx, "vector": y} if y is not None else ctx
    with torch.no_grad():
        return model.apply_model(x, t, c, tuning)


def first_skip_hook(unet):
    """The edited skip entering output block 0 (after h, the middle block's output)."""
    seen = {}
    ch = unet.output_blocks[0][0].in_layers[0].num_channels - unet.cfg.skip_channels[0]

    def hook(module, args):
        seen["skip"] = args[0][:, ch:].clone()

    return seen, unet.output_blocks[0].register_forward_pre_hook(hook)


def mlp(x, tuner):  # ln2(GELU(ln1(x))) over channels, written out
    y = x.permute(0, 2, 3, 1)
    y = F.linear(F.gelu(F.linear(y, tuner.ln1.weight, tuner.ln1.bias)), tuner.ln2.weight, tuner.ln2.bias)
    return y.permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------
# 1. Released controllers: fractional hint widths, kernels 1 and 3, every layout, SCALE as default weight
# ---------------------------------------------------------------------------------------------------------


def official_controller(cfg, ratio, kernel, seed):
    """A released controller's state dict written by hand from scepter's construction (widths int(16 r),
    ..., int(96 r)), random weights; keys as in the released `pytorch_model.bin`."""
    g = torch.Generator().manual_seed(seed)
    widths = [3] + [int(b * ratio) for b in (16, 16, 32, 32, 96, 96)] + [cfg.hint_channels]
    sd = {}
    for i in range(7):
        sd[f"0.pre_hint_blocks.{2 * i}.weight"] = torch.randn(widths[i + 1], widths[i], 3, 3, generator=g) * 0.2
        sd[f"0.pre_hint_blocks.{2 * i}.bias"] = torch.randn(widths[i + 1], generator=g) * 0.1
    ch = cfg.hint_channels
    for i, (_, out_ch, _) in enumerate(cfg.encoder_blocks):
        sd[f"0.dense_hint_blocks.{i}.1.weight"] = torch.randn(out_ch, ch, kernel, kernel, generator=g) * 0.1
        sd[f"0.dense_hint_blocks.{i}.1.bias"] = torch.randn(out_ch, generator=g) * 0.1
        ch = out_ch
    for m, d in enumerate(cfg.skip_channels):
        for name, shape in (("ln1.weight", (d, d)), ("ln1.bias", (d,)), ("ln2.weight", (d, d)), ("ln2.bias", (d,))):
            sd[f"0.lsc_tuner_blocks.{m}.tuner_op.{name}"] = torch.randn(*shape, generator=g) * 0.1
    return sd


def hints_by_formula(sd, cfg, cond, kernel):
    """SPEC section 4 written out on the raw official tensors: 3x3 convs with SiLU between, then the chained
    dense convs (SiLU, kernel k, padding k // 2, stride 2 where the encoder downsamples); decoder order."""
    h = cond
    for i, stride in enumerate(HINT_STRIDES):
        h = F.conv2d(h, sd[f"0.pre_hint_blocks.{2 * i}.weight"], sd[f"0.pre_hint_blocks.{2 * i}.bias"], stride, 1)
        h = F.silu(h) if i < len(HINT_STRIDES) - 1 else h
    out = []
    for i, (kind, _, _) in enumerate(cfg.encoder_blocks):
        w, b = sd[f"0.dense_hint_blocks.{i}.1.weight"], sd[f"0.dense_hint_blocks.{i}.1.bias"]
        h = F.conv2d(F.silu(h), w, b, 2 if kind == "down" else 1, kernel // 2)
        out.append(h)
    return out[::-1]


@pytest.mark.parametrize("ratio", [0.5, 1, 2])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("layout", ["bin", "model-prefix", "ours"])
def test_released_controllers_of_any_hint_width_load_and_follow_the_formulas(models, tmp_path, ratio, kernel, layout):
    model = fresh(models, "sd1")
    cfg = model.cfg.unet
    sd = official_controller(cfg, ratio, kernel, seed=int(ratio * 10) + kernel)
    folder = tmp_path / "canny" / "0_SwiftSCETuning"
    folder.mkdir(parents=True)
    prefix = "model." if layout == "model-prefix" else ""
    torch.save({prefix + k: v for k, v in sd.items()}, folder / "pytorch_model.bin")
    # scepter's configuration.json nests the CSCTuners settings; SCALE is the controller's default weight
    config = {"NAME": "SwiftSCETuning", "CONTROL_MODEL": {"NAME": "CSCTuners", "SCALE": 0.7}}
    if ratio != 1:
        config["CONTROL_MODEL"]["PRE_HINT_DIM_RATIO"] = ratio
    (folder / "configuration.json").write_text(json.dumps(config))
    src = tmp_path / "canny"
    if layout == "ours":  # converted once: the ratio and the default weight survive in our metadata
        tf = read_tuner_file(src)
        tf.condition = "canny"
        save_tuner_file(tf, tmp_path / "canny.safetensors")
        src = tmp_path / "canny.safetensors"
        meta = read_tuner_file(src)
        assert (meta.hint_ratio, meta.default_weight, meta.kernel) == (ratio, 0.7, kernel)
    ctrl = load_tuner(model, src, kind="csc")
    assert [ctrl.pre_hint_blocks[2 * i].out_channels for i in range(6)] == [
        int(b * ratio) for b in (16, 16, 32, 32, 96, 96)
    ]
    assert ctrl.default_weight == 0.7 and ctrl.kernel == kernel
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hints = ctrl.hints(cond)
        ref = hints_by_formula(sd, cfg, cond, kernel)
        for ours, theirs in zip(hints, ref, strict=True):
            assert_close(ours, theirs)
        # the residual of skip m: c = hint + ln2(GELU(ln1(skip + hint)))
        skip = torch.randn_like(ref[0])
        lsc = {k.split("tuner_op.")[1]: v for k, v in sd.items() if k.startswith("0.lsc_tuner_blocks.0.")}
        y = (skip + ref[0]).permute(0, 2, 3, 1)
        y = F.linear(F.gelu(F.linear(y, lsc["ln1.weight"], lsc["ln1.bias"])), lsc["ln2.weight"], lsc["ln2.bias"])
        assert_close(ctrl.residual(0, skip, ref[0]), ref[0] + y.permute(0, 3, 1, 2))


def test_a_configuration_that_disagrees_with_the_weights_is_refused(models, tmp_path):
    model = fresh(models, "sd1")
    folder = tmp_path / "c" / "0_SwiftSCETuning"
    folder.mkdir(parents=True)
    torch.save(official_controller(model.cfg.unet, 0.5, 3, 0), folder / "pytorch_model.bin")
    (folder / "configuration.json").write_text(json.dumps({"PRE_HINT_DIM_RATIO": 1.0, "SCALE": 1.0}))
    with pytest.raises(CheckpointError, match=r"PRE_HINT_DIM_RATIO 1.0.*\[8, 8, 16, 16, 48, 48\]"):
        load_tuner(model, tmp_path / "c")


# ---------------------------------------------------------------------------------------------------------
# 2. scepter Studio's TEXT_SCE: SC-Tuners + a swift LoRA on the first text encoder
# ---------------------------------------------------------------------------------------------------------

_SUBS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def write_text_sce(folder, model, rank=4, alpha=8.0, seed=0):
    """A TEXT_SCE folder in swift's layout: 0_SwiftSCETuning (adapter_model.safetensors) and 1_SwiftLoRA
    (adapter_model.bin with peft/swift keys `...lora_A.<adapter>.weight`, adapter_config.json). Returns the
    SC-Tuner weights and the LoRA matrices {(layer, sub): (A, B)}."""
    g = torch.Generator().manual_seed(seed)
    skips = model.cfg.unet.skip_channels
    sce = folder / "0_SwiftSCETuning"
    sce.mkdir(parents=True)
    sc = {}
    for m, d in enumerate(skips):
        for name, shape in (("ln1.weight", (d, d)), ("ln1.bias", (d,)), ("ln2.weight", (d, d)), ("ln2.bias", (d,))):
            sc[f"model.lsc_identity.{m}.scetuner_0_SwiftSCETuning.tuner_op.{name}"] = (
                torch.randn(*shape, generator=g) * 0.05
            )
    save_file(sc, str(sce / "adapter_model.safetensors"))
    (sce / "adapter_config.json").write_text(json.dumps({"swift_type": "SCETUNING", "dims": list(skips)}))
    lora_dir = folder / "1_SwiftLoRA"
    lora_dir.mkdir()
    text = model.conditioner.embedders[0] if model.cfg.family == "sdxl" else model.cond_stage_model
    width = text.cfg.width
    mats, lora = {}, {}
    for n in range(text.cfg.layers):
        for sub in _SUBS:
            fan_in = 4 * width if sub == "mlp.fc2" else width
            fan_out = 4 * width if sub == "mlp.fc1" else width
            a = torch.randn(rank, fan_in, generator=g) * 0.1
            b = torch.randn(fan_out, rank, generator=g) * 0.1
            mats[(n, sub)] = (a, b)
            base = f"cond_stage_model.embedders.0.transformer.text_model.encoder.layers.{n}.{sub}"
            lora[f"{base}.lora_A.1_SwiftLoRA.weight"] = a
            lora[f"{base}.lora_B.1_SwiftLoRA.weight"] = b
    torch.save(lora, lora_dir / "adapter_model.bin")
    config = {"swift_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0}
    config["target_modules"] = "(cond_stage_model.*(q_proj|k_proj|v_proj|out_proj|mlp.fc1|mlp.fc2))$"
    (lora_dir / "adapter_config.json").write_text(json.dumps(config))
    return sc, mats


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_sce_folders_load_and_change_the_text_features_by_the_lora_formula(models, tmp_path, family):
    model = fresh(models, family)
    sc, mats = write_text_sce(tmp_path / "studio", model, rank=4, alpha=8.0)
    prompts = ["a cat on a mat", "<sce> a house"]
    with torch.no_grad():
        before = model.get_learned_conditioning(prompts)
    # the reference: W + (alpha / r) B A written into a copy of the first text encoder
    ref = fresh(models, family)
    text = ref.conditioner.embedders[0] if family == "sdxl" else ref.cond_stage_model
    with torch.no_grad():
        for (n, sub), (a, b) in mats.items():
            text.transformer.text_model.encoder.layers[n].get_submodule(sub).weight += (8.0 / 4) * b @ a
        expected = ref.get_learned_conditioning(prompts)
    tuners = load_tuner(model, tmp_path / "studio", kind="sc")
    assert len(tuners) == len(model.cfg.unet.skip_channels)
    with torch.no_grad():
        after = model.get_learned_conditioning(prompts)
    keys = ("crossattn", "vector") if family == "sdxl" else (None,)
    for k in keys:
        got, want, old = (v[k] if k else v for v in (after, expected, before))
        assert_close(got, want)
        if k != "vector":  # the LoRA does change the context (SDXL's pooled vector is the second tower's)
            assert (got - old).abs().max() > 1e-3
    if family == "sdxl":  # only the first tower: the bigG half of the context is unchanged
        w = model.conditioner.embedders[0].cfg.width
        assert torch.equal(after["crossattn"][..., w:], before["crossattn"][..., w:])
        assert torch.equal(after["vector"], before["vector"])
    # converted to one file of ours: the same tuners and the same text features
    tf = read_tuner_file(tmp_path / "studio")
    assert tf.text_lora == {"rank": 4, "alpha": 8.0}
    save_tuner_file(tf, tmp_path / "text_sce.safetensors")
    again = fresh(models, family)
    load_tuner(again, tmp_path / "text_sce.safetensors")
    with torch.no_grad():
        converted = again.get_learned_conditioning(prompts)
    for k in keys:
        assert torch.equal(converted[k] if k else converted, after[k] if k else after)
    load_tuner(again, tmp_path / "text_sce.safetensors")  # loading again replaces, never stacks, the text LoRA
    with torch.no_grad():
        twice = again.get_learned_conditioning(prompts)
    for k in keys:
        assert torch.equal(twice[k] if k else twice, after[k] if k else after)


# ---------------------------------------------------------------------------------------------------------
# 3. Several SC-Tuners at once
# ---------------------------------------------------------------------------------------------------------


def tuner_files(model, tmp_path, n=2):
    unet = model.model.diffusion_model
    paths = []
    for k in range(n):
        for i, t in enumerate(unet.attach_sc_tuners()):
            randomize(t, 100 * k + i)
        paths.append(tmp_path / f"style{k}.safetensors")
        save_tuner_file(sc_tuner_file(model), paths[-1])
    unet.replace_tuners(SkipIdentity() for _ in unet.tuners)
    return paths


def test_two_tuners_combined_both_ways_follow_the_formulas(models, tmp_path):
    model = fresh(models, "sd1")
    unet = model.model.diffusion_model
    paths = tuner_files(model, tmp_path)
    x, t, ctx, _ = unet_inputs(model)
    seen, handle = first_skip_hook(unet)
    t1 = load_tuner(model, paths[0])[0]  # the first file alone: its tuner, and the skip before it acts
    with torch.no_grad():
        model.apply_model(x, t, ctx, Tuning(0.0))
        skip = seen.pop("skip")
    t2 = load_tuner(model, paths[1])[0]
    expected = {
        "sum": skip + 0.8 * mlp(skip, t1) + 0.5 * mlp(skip, t2),
        "sequential": (lambda x1: x1 + 0.5 * mlp(x1, t2))(skip + 0.8 * mlp(skip, t1)),
    }
    for mode, want in expected.items():
        slots = load_tuners(model, [(paths[0], 0.8), (paths[1], 0.5)], mode)
        assert isinstance(slots[0], TunerSet) and slots[0].weights == [0.8, 0.5]
        with torch.no_grad():
            model.apply_model(x, t, ctx)
        torch.testing.assert_close(seen.pop("skip"), want)
    # the sum does not depend on the order; the sequential composition does
    load_tuners(model, [(paths[1], 0.5), (paths[0], 0.8)], "sum")
    with torch.no_grad():
        model.apply_model(x, t, ctx)
    torch.testing.assert_close(seen.pop("skip"), expected["sum"])
    load_tuners(model, [(paths[1], 0.5), (paths[0], 0.8)], "sequential")
    with torch.no_grad():
        model.apply_model(x, t, ctx)
    assert (seen.pop("skip") - expected["sequential"]).abs().max() > 1e-6
    # a global scale multiplies every edit; per-skip scales (research) one number per skip
    load_tuners(model, [(paths[0], 0.8), (paths[1], 0.5)], "sum")
    n = len(model.cfg.unet.skip_channels)
    with torch.no_grad():
        model.apply_model(x, t, ctx, Tuning((0.25,) + (1.0,) * (n - 1)))
    torch.testing.assert_close(seen.pop("skip"), skip + 0.25 * (0.8 * mlp(skip, t1) + 0.5 * mlp(skip, t2)))
    handle.remove()


def test_per_skip_scales_zero_everywhere_is_the_base_model(models, tmp_path):
    model = fresh(models, "sd1")
    paths = tuner_files(model, tmp_path, n=1)
    x, t, ctx, _ = unet_inputs(model)
    base = ours_out(fresh(models, "sd1"), x, t, ctx, None)
    load_tuner(model, paths[0])
    n = len(model.cfg.unet.skip_channels)
    assert torch.equal(ours_out(model, x, t, ctx, None, Tuning((0.0,) * n)), base)
    assert not torch.equal(ours_out(model, x, t, ctx, None, Tuning((0.0,) * (n - 1) + (1.0,))), base)


# ---------------------------------------------------------------------------------------------------------
# 4. Community LoRA files, against diffusers' own loader on diffusers' models built from the same file
# ---------------------------------------------------------------------------------------------------------


def diffusers_models(models, family):
    """diffusers' UNet and transformers' text towers converted from the checkpoint by diffusers' own code;
    text towers as (module, diffusers prefix, pad token, features of the tokens as our conditioning)."""
    from safetensors.torch import load_file

    path, cfg = models[family]
    sd = load_file(path)
    dcfg = su.create_unet_diffusers_config_from_ldm(to_compvis_yaml(cfg), sd)
    if family == "sdxl":
        dcfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    unet = UNet2DConditionModel(**dcfg).eval()
    unet.load_state_dict(su.convert_ldm_unet_checkpoint(sd, dcfg), strict=True)

    towers = hf_text_towers(cfg, sd)
    if family == "sd1":
        return unet, [(towers[0][0], "text_encoder", 49407, lambda m, tok: m(tok).last_hidden_state)]
    if family == "sd2":
        feats = lambda m, tok: m.final_layer_norm(m(tok, output_hidden_states=True).hidden_states[-2])  # noqa: E731
        return unet, [(towers[0][0], "text_encoder", 0, feats)]
    penultimate = lambda m, tok: m(tok, output_hidden_states=True).hidden_states[-2]  # noqa: E731
    (clip_l, _), (big_g, _) = towers
    return unet, [(clip_l, "text_encoder", 49407, penultimate), (big_g, "text_encoder_2", 0, penultimate)]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_lora_matches_diffusers_load_lora_weights(models, tmp_path, family):
    model = fresh(models, family)
    ref_unet, towers = diffusers_models(models, family)
    path = tmp_path / "lora.safetensors"
    written = write_kohya_lora(model, path)
    pipeline = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    state, alphas = pipeline.lora_state_dict(str(path))
    pipeline.load_lora_into_unet(state, alphas, unet=ref_unet)
    for hf, prefix, _, _ in towers:
        pipeline.load_lora_into_text_encoder(state, alphas, text_encoder=hf, prefix=prefix)
    x, t, ctx, y = unet_inputs(model)
    base = ours_out(model, x, t, ctx, y)
    n = load_lora(model, path)
    assert n == len({k.split(".")[0] for k in written})
    ours = ours_out(model, x, t, ctx, y)
    with torch.no_grad():
        added = {"text_embeds": y[:, : model.cfg.text2.embed_dim], "time_ids": None} if y is not None else None
        if added is not None:  # diffusers' vector: pooled text, then its own size embeddings of time_ids
            sizes = torch.tensor([[16.0, 24, 0, 0, 16, 24], [32, 32, 4, 2, 16, 16]])
            y = torch.cat(
                [y[:, : model.cfg.text2.embed_dim], ref_unet.add_time_proj(sizes.flatten()).reshape(2, -1)], 1
            )
            ours = ours_out(model, x, t, ctx, y)
            added = {"text_embeds": y[:, : model.cfg.text2.embed_dim], "time_ids": sizes}
        theirs = ref_unet(x, t, ctx, added_cond_kwargs=added).sample
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the UNet
    assert_close(ours, theirs)
    prompts = ["a red cat on a mat", "a lighthouse"]
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        ctx_ours = c["crossattn"] if family == "sdxl" else c
        widths = [hf.config.hidden_size for hf, *_ in towers]
        for (hf, _, pad, feats), part in zip(towers, torch.split(ctx_ours, widths, dim=-1), strict=True):
            assert_close(part, feats(hf, tokenize(prompts, pad=pad)))


def test_sgm_named_sdxl_lora_equals_the_diffusers_named_one(models, tmp_path):
    """sd-scripts names SDXL UNet layers as sgm does (`lora_unet_input_blocks_4_1_...`); the same matrices
    under diffusers' names give exactly the same model."""
    outs = []
    for compvis in (False, True):
        model = fresh(models, "sdxl")
        path = tmp_path / f"lora-{compvis}.safetensors"
        write_kohya_lora(model, path, seed=3, compvis_names=compvis)
        assert any(k.startswith("lora_unet_input_blocks") for k in safe_open(str(path), "pt").keys()) == compvis
        load_lora(model, path, weight=0.7)
        outs.append(ours_out(model, *unet_inputs(model)))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("preset", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
def test_diffusers_names_of_every_unet_layer_match_diffusers_own_conversion(preset):
    """Our name map (CompVis -> diffusers) against diffusers' checkpoint converter: every parameter lands on
    the tensor diffusers' conversion puts under that name."""
    cfg = PRESETS[preset]
    unet = random_model(cfg).model.diffusion_model
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    dcfg = su.create_unet_diffusers_config_from_ldm(to_compvis_yaml(cfg), sd)
    if cfg.family == "sdxl":
        dcfg.update(addition_embed_type="text_time", addition_time_embed_dim=256, class_embed_type=None)
    converted = su.convert_ldm_unet_checkpoint(sd, dcfg)
    mapped = {}
    for name, p in unet.named_parameters():
        module, leaf = name.rsplit(".", 1)
        mapped[f"{diffusers_unet_name(unet, module)}.{leaf}"] = p
    assert set(mapped) == set(converted)
    assert all(torch.equal(mapped[k], converted[k]) for k in converted)


def test_lora_weight_merge_formats_and_removal(models, tmp_path):
    model = fresh(models, "sd1")
    x, t, ctx, _ = unet_inputs(model)
    base = ours_out(model, x, t, ctx, None)
    kohya = write_kohya_lora(model, tmp_path / "k.safetensors", alpha=4.0)  # alpha = rank: scale 1
    # the same LoRA in diffusers/peft's layout (no alpha: lora_alpha = r)
    targets = lora_targets(model)
    unet = model.model.diffusion_model
    by_target = {}
    for name in {k.split(".")[0] for k in kohya}:
        by_target[targets[name].name] = name
    peft = {}
    for ours, name in by_target.items():
        if ours.startswith("model.diffusion_model."):
            theirs = "unet." + diffusers_unet_name(unet, ours.removeprefix("model.diffusion_model."))
        else:
            theirs = "text_encoder." + ours.removeprefix("cond_stage_model.transformer.")
        peft[f"{theirs}.lora_A.weight"] = kohya[f"{name}.lora_down.weight"]
        peft[f"{theirs}.lora_B.weight"] = kohya[f"{name}.lora_up.weight"]
    save_file(peft, str(tmp_path / "p.safetensors"))
    outs = {}
    for fmt, merge, weight in (("k", False, 1.0), ("p", False, 1.0), ("k", True, 1.0), ("k", False, 0.5)):
        m = fresh(models, "sd1")
        load_lora(m, tmp_path / f"{fmt}.safetensors", weight=weight, merge=merge)
        outs[fmt, merge, weight] = ours_out(m, x, t, ctx, None)
        if not merge:
            remove_lora(m)
            assert torch.equal(ours_out(m, x, t, ctx, None), base)  # removed: exactly the base model
    assert torch.equal(outs["k", False, 1.0], outs["p", False, 1.0])
    assert_close(outs["k", True, 1.0], outs["k", False, 1.0])
    assert (outs["k", False, 0.5] - base).abs().max() < (outs["k", False, 1.0] - base).abs().max()


def test_lora_for_another_family_or_layout_is_refused(models, tmp_path):
    sd1, sdxl = fresh(models, "sd1"), fresh(models, "sdxl")
    write_kohya_lora(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="a LoRA for sdxl, but the model is sd1"):
        load_lora(sd1, tmp_path / "xl.safetensors")
    write_kohya_lora(sd1, tmp_path / "v2.safetensors", metadata={"ss_base_model_version": "sd_v2"})
    with pytest.raises(CheckpointError, match="a LoRA for sd2, but the model is sd1"):
        load_lora(sd1, tmp_path / "v2.safetensors")
    save_file(
        {
            "lora_unet_nonexistent_layer.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_nonexistent_layer.lora_up.weight": torch.zeros(4, 2),
        },
        str(tmp_path / "bad.safetensors"),
    )
    with pytest.raises(CheckpointError, match="nonexistent_layer is not a layer of this sd1 model"):
        load_lora(sd1, tmp_path / "bad.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(CheckpointError, match="LoHa"):
        load_lora(sd1, tmp_path / "loha.safetensors")
    x, t, ctx, _ = unet_inputs(sd1)
    assert torch.equal(ours_out(sd1, x, t, ctx, None), ours_out(fresh(models, "sd1"), x, t, ctx, None))  # unchanged


# ---------------------------------------------------------------------------------------------------------
# 5. SCEdit inside diffusers' UNet2DConditionModel
# ---------------------------------------------------------------------------------------------------------


def diffusers_call(unet, model, x, t, ctx, y):
    if y is None:
        return unet(x, t, ctx).sample
    sizes = torch.tensor([[16.0, 24, 0, 0, 16, 24], [32, 32, 4, 2, 16, 16]])
    return unet(
        x, t, ctx, added_cond_kwargs={"text_embeds": y[:, : model.cfg.text2.embed_dim], "time_ids": sizes}
    ).sample


def diffusers_vector(unet, model, y):
    sizes = torch.tensor([[16.0, 24, 0, 0, 16, 24], [32, 32, 4, 2, 16, 16]])
    pooled = y[:, : model.cfg.text2.embed_dim]
    return torch.cat([pooled, unet.add_time_proj(sizes.flatten()).reshape(2, -1)], 1)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_diffusers_unet_with_our_integration_equals_our_unet(models, tmp_path, family):
    from ldm_sce.integrations.diffusers import SCEdit

    model = fresh(models, family)
    unet = model.model.diffusion_model
    for i, tuner in enumerate(unet.attach_sc_tuners()):
        randomize(tuner, i)
    ctrl = unet.attach_controller(CSCTuner(model.cfg.unet, kernel=3))
    randomize(ctrl, 50, std=0.1)
    save_tuner_file(sc_tuner_file(model), tmp_path / "sc.safetensors")
    save_tuner_file(csc_tuner_file(model, ctrl, "canny"), tmp_path / "canny.safetensors")
    # the official layout of the SC-Tuners too: a swift adapter folder
    swift = tmp_path / "style" / "0_SwiftSCETuning"
    swift.mkdir(parents=True)
    save_file(
        {
            f"model.lsc_identity.{m}.scetuner_0_SwiftSCETuning.tuner_op.{k}": v.contiguous()
            for m, t in enumerate(unet.tuners)
            for k, v in t.state_dict().items()
        },
        str(swift / "adapter_model.safetensors"),
    )
    ref, _ = diffusers_models(models, family)
    x, t, ctx, y = unet_inputs(model)
    if y is not None:
        y = diffusers_vector(ref, model, y)
    cond = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        base = diffusers_call(ref, model, x, t, ctx, y)
        tuning = Tuning(0.8, Control([ctrl.hints(cond)], [0.6], 0.9))
        ours = ours_out(model, x, t, ctx, y, tuning)
        ours_sc = ours_out(model, x, t, ctx, y, Tuning(0.8))
    for sc_file in (tmp_path / "sc.safetensors", tmp_path / "style"):
        sce = SCEdit(ref, family=family)
        sce.load_tuner(sc_file, scale=0.8)
        loaded = sce.load_controller(tmp_path / "canny.safetensors")
        assert loaded.condition == "canny"
        sce.set_control([cond], weights=[0.6], scale=0.9)
        with torch.no_grad():
            theirs = diffusers_call(ref, model, x, t, ctx, y)
            assert_close(theirs, ours)
            sce.clear_control()
            assert_close(diffusers_call(ref, model, x, t, ctx, y), ours_sc)
            # control limited to the end of sampling: off at t=700 (progress 0.3), on at t=30 (0.97)
            sce.set_control([cond], weights=[0.6], scale=0.9, start=0.5, end=1.0)
            late = [diffusers_call(ref, model, x, torch.full((2,), s), ctx, y) for s in (700, 30)]
            assert_close(late[0], ours_out(model, x, torch.full((2,), 700), ctx, y, Tuning(0.8)))
            assert_close(late[1], ours_out(model, x, torch.full((2,), 30), ctx, y, tuning))
        sce.remove()
        with torch.no_grad():
            assert torch.equal(diffusers_call(ref, model, x, t, ctx, y), base)  # the UNet as it was
    assert (ours - base).abs().max() > 1e-3


def test_diffusers_integration_refuses_files_that_do_not_fit(models, tmp_path):
    from ldm_sce.integrations.diffusers import SCEdit

    xl = fresh(models, "sdxl")
    xl.model.diffusion_model.attach_sc_tuners()
    save_tuner_file(sc_tuner_file(xl), tmp_path / "xl.safetensors")
    ref, _ = diffusers_models(models, "sd1")
    sce = SCEdit(ref, family="sd1")
    with pytest.raises(CheckpointError, match="skip dims"):
        sce.load_tuner(tmp_path / "xl.safetensors")
    sce.remove()


# ---------------------------------------------------------------------------------------------------------
# 6. Community metadata in our files
# ---------------------------------------------------------------------------------------------------------


def test_tuner_files_carry_the_sai_model_spec_and_a_kohya_style_summary(models, tmp_path):
    model = fresh(models, "sdxl")
    model.model.diffusion_model.attach_sc_tuners()
    training = {"steps": 500, "lr": 1e-4, "batch_size": 4, "resolution": 1024, "trigger": "<sce> "}
    save_tuner_file(sc_tuner_file(model, training), tmp_path / "watercolor.safetensors")
    with safe_open(str(tmp_path / "watercolor.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/scedit-sc"
    assert meta["modelspec.title"] == "watercolor" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.trigger_phrase"] == "<sce>" and meta["modelspec.implementation"] == "ldm_sce"
    assert (meta["ss_base_model_version"], meta["ss_max_train_steps"], meta["ss_learning_rate"]) == (
        "sdxl_base_v1-0",
        "500",
        "0.0001",
    )
    assert read_tuner_file(tmp_path / "watercolor.safetensors").training == training  # ours, unchanged
