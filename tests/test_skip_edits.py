"""Training-free skip edits in the decoder loop: FreeU against diffusers' `enable_freeu` (its block rule) and
against the official code's formula written out (the channel rule), skip scaling and dropping, identities and
the composition order."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import single_file_utils as su
from helpers import random_model

from ldm_sce import PRESETS
from ldm_sce.config import to_compvis_yaml
from ldm_sce.skip_edits import FREEU_PRESETS, FreeU, SkipEdit, SkipScale, fourier_filter
from ldm_sce.tuners import SkipIdentity


@pytest.fixture(scope="module")
def sd1():
    model = random_model(PRESETS["tiny-sd1"], seed=3)
    unet = model.model.diffusion_model
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    dcfg = su.create_unet_diffusers_config_from_ldm(to_compvis_yaml(PRESETS["tiny-sd1"]), sd)
    ref = UNet2DConditionModel(**dcfg).eval()
    ref.load_state_dict(su.convert_ldm_unet_checkpoint(sd, dcfg), strict=True)
    return unet, ref


def inputs(hw=(8, 12)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, *hw, generator=g), torch.tensor([10, 600]), torch.randn(2, 77, 32, generator=g)


def assert_close(ours, ref, rel=1e-5):
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"{err:.3g} > {rel} * {scale:.3g}"


def test_freeu_with_diffusers_rule_matches_enable_freeu(sd1):
    unet, ref = sd1
    x, t, c = inputs()
    b1, b2, s1, s2 = FREEU_PRESETS["sd1"]
    with torch.no_grad():
        base = unet(x, t, c)
        unet.skip_edits.append(FreeU(unet.cfg, b1, b2, s1, s2, rule="diffusers"))
        ours = unet(x, t, c)
        ref.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
        theirs = ref(x, t, c).sample
        ref.disable_freeu()
    unet.skip_edits = torch.nn.ModuleList()
    assert (ours - base).abs().max() > 1e-3
    assert_close(ours, theirs)


def official_freeu_forward(unet, x, t, c, b1, b2, s1, s2):
    """The official FreeU UNet forward (ChenyangSi/FreeU, free_lunch_utils), written over our modules: before
    each decoder block, h with the widest level's channels gets b1/s1, the next level's b2/s2."""
    from ldm_sce.unet import timestep_embedding

    widths = sorted({unet.cfg.model_channels * m for m in unet.cfg.channel_mult}, reverse=True)
    emb = unet.time_embed(timestep_embedding(t, unet.cfg.model_channels))
    hs, h = [], x
    for block in unet.input_blocks:
        h = block(h, emb, c)
        hs.append(h)
    h = unet.middle_block(h, emb, c)
    for block in unet.output_blocks:
        skip = hs.pop()
        for width, b, s in ((widths[0], b1, s1), (widths[1], b2, s2)):
            if h.shape[1] == width:
                h = h.clone()
                h[:, : width // 2] = h[:, : width // 2] * b
                skip = fourier_filter(skip, s)
        h = block(torch.cat([h, skip], dim=1), emb, c)
    return unet.out(h)


@pytest.mark.parametrize("hw", [(8, 12), (16, 16)])
def test_freeu_official_rule_is_the_official_formula(sd1, hw):
    unet, _ = sd1
    x, t, c = inputs(hw)
    values = (1.3, 1.6, 0.8, 0.3)
    unet.skip_edits.append(FreeU(unet.cfg, *values))
    with torch.no_grad():
        ours = unet(x, t, c)
        ref = official_freeu_forward(unet, x, t, c, *values)
    unet.skip_edits = torch.nn.ModuleList()
    assert_close(ours, ref)


def test_the_two_rules_pick_different_blocks_on_sd15():
    cfg = PRESETS["sd-v1"].unet
    official = FreeU(cfg, 1.5, 1.6, 0.9, 0.2).which
    diffusers = FreeU(cfg, 1.5, 1.6, 0.9, 0.2, rule="diffusers").which
    assert official == [1] * 7 + [2] * 3 + [None] * 2  # h has 1280 channels entering blocks 0-6, 640 in 7-9
    assert diffusers == [1] * 3 + [2] * 3 + [None] * 6  # up blocks 0 and 1
    xl = FreeU(PRESETS["sdxl-base"].unet, *FREEU_PRESETS["sdxl"]).which
    assert xl == [1] * 4 + [2] * 3 + [None] * 2


def test_fourier_filter_is_fp32_and_identity_at_scale_one():
    x = torch.randn(2, 4, 6, 10).half()  # not powers of two: fp16 FFT would fail
    assert fourier_filter(x, 0.5).dtype == torch.float16
    y = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fourier_filter(y, 1.0), y)
    # the box holds the zero frequency: at scale 0 the filtered skip has no mean left (its DC is removed)
    assert fourier_filter(y, 0.0).mean(dim=(-2, -1)).abs().max() < 1e-12


def test_empty_stack_scale_one_and_composition_order(sd1):
    unet, _ = sd1
    x, t, c = inputs()
    n = len(unet.cfg.skip_channels)
    with torch.no_grad():
        base = unet(x, t, c)
        unet.skip_edits.append(SkipScale([1.0] * n))
        assert torch.equal(unet(x, t, c), base)  # scale 1 everywhere: exactly the base

        class Record(SkipEdit):
            def __init__(self):
                super().__init__()
                self.seen = []

            def forward(self, m, h, skip):
                self.seen.append(skip.clone())
                return h, skip

        rec = Record()
        unet.skip_edits = torch.nn.ModuleList([SkipScale.dropping([0], n), rec])
        dropped = unet(x, t, c)
        assert rec.seen[0].abs().max() == 0 and rec.seen[1].abs().max() > 0  # in list order: dropped, then seen
        assert not torch.equal(dropped, base)
        # FreeU then scaling differs from scaling then FreeU only through the order of the two edits
        a = FreeU(unet.cfg, 1.4, 1.2, 0.5, 0.5)
        s = SkipScale([2.0] * n)
        unet.skip_edits = torch.nn.ModuleList([a, s])
        first = unet(x, t, c)
        unet.skip_edits = torch.nn.ModuleList([s, a])
        second = unet(x, t, c)
    unet.skip_edits = torch.nn.ModuleList()
    torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-5)  # both linear in the skip: they commute
    assert isinstance(unet.tuners[0], SkipIdentity)


def test_analyze_skips_tool_on_a_tiny_model(tiny_ckpts, tmp_path):
    """tools/analyze_skips.py end to end: its numbers are consistent, and an identity tuner edits nothing."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from ldm_sce import load_model
    from ldm_sce.tuner_files import save_tuner_file, sc_tuner_file

    root = Path(__file__).resolve().parents[1]
    ckpt = tiny_ckpts["sd1"][1]
    model = load_model(ckpt, config="tiny-sd1")
    model.model.diffusion_model.attach_sc_tuners()  # fresh: exact identities
    save_tuner_file(sc_tuner_file(model), tmp_path / "identity.safetensors")
    args = ["--ckpt", ckpt, "--config", "tiny-sd1", "--tuner", tmp_path / "identity.safetensors", "--prompt", "a cat"]
    args += ["--seeds", 0, "--timesteps", 500, "--steps", 2, "--out", tmp_path / "out", "--device", "cpu"]
    r = subprocess.run(
        [sys.executable, str(root / "tools" / "analyze_skips.py"), *map(str, args)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "out" / "skips.json").read_text())
    n = len(PRESETS["tiny-sd1"].unet.skip_channels)
    rem = out["removals"]
    assert rem["none"]["change_rms"] == 0.0 and rem["all"]["dropped"] == list(range(n))
    assert rem["half"]["dropped"] == list(range(n // 2)) and len(rem) == 3 + n
    for row in out["per_skip"]:
        assert row["output_change_when_removed"] == rem[f"skip {row['skip']}"]["change_rms"] > 0
        assert row["tuner_edit_size"] == 0.0  # an identity tuner
    assert {p.name for p in (tmp_path / "out").glob("*.png")} == {
        "variance.png",
        "histogram.png",
        "features.png",
        "per_skip.png",
    }
