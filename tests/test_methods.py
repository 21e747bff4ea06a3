"""Training methods (ldm_sce/methods.py): each starts at the base model exactly, trains what it says, and
exports a file its loader reads back; a new method plugs into the trainer through the registry alone."""

import json
from pathlib import Path

import pytest
import torch
from helpers import train_config
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_sce import load_model
from ldm_sce.lora import load_lora
from ldm_sce.methods import METHODS, Method, MethodSection, add_lora
from ldm_sce.training import Trainer, load_train_config
from ldm_sce.tuner_files import load_tuner

METHOD_SECTIONS = {
    "sc": {"name": "sc"},
    "csc": {"name": "csc", "condition": "canny", "random_thresholds": True},
    "lora": {"name": "lora", "lora_rank": 4},
    "full": {"name": "full"},
}
# loss of the second step of each 2-step run below (tiny-sd1 from tests/conftest.py, seed 0, lr 3e-3, batch 4);
# the first step's loss is the base model's, the same for all (checked exactly)
SECOND_LOSS = {"sc": 1.0278202, "csc": 1.0278978, "lora": 1.0283289, "full": 0.9942843}


def base_loss(ckpt, trainer) -> float:
    """The untouched base model's MSE on the trainer's first batch, computed apart from the trainer."""
    base = load_model(ckpt, config="tiny-sd1")
    batch = trainer._prepare(0)
    with torch.no_grad():
        out = base.apply_model(batch["x_t"], batch["t"], batch["c"])
    return torch.nn.functional.mse_loss(out, batch["target"]).item()


def logged_losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.mark.parametrize("name", sorted(METHOD_SECTIONS))
def test_each_method_starts_at_the_base_and_exports_what_it_trained(name, tiny_ckpts, dataset, tmp_path):
    ckpt = tiny_ckpts["sd1"][1]
    cfg = load_train_config(train_config(tmp_path, ckpt, dataset, method=METHOD_SECTIONS[name], optim={"max_steps": 2}))
    trainer = Trainer(cfg)
    assert all(p.requires_grad for p in trainer.params)
    trainable = {id(p) for p in trainer.params}
    frozen = [n for n, p in trainer.model.named_parameters() if p.requires_grad and id(p) not in trainable]
    assert not frozen, frozen[:3]  # nothing else trains
    expected_first = base_loss(ckpt, trainer)
    path = trainer.train()
    first, second = logged_losses(tmp_path / "out")
    assert first == pytest.approx(expected_first, rel=1e-6)  # a fresh method is an exact identity
    assert second == pytest.approx(SECOND_LOSS[name], rel=1e-4)
    assert (
        path.name
        == {
            "sc": "sc_tuner.safetensors",
            "csc": "csc_canny.safetensors",
            "lora": "lora.safetensors",
            "full": "model.safetensors",
        }[name]
    )

    # the exported file loads back into a fresh model and gives the trained model's output
    fresh = load_model(ckpt, config="tiny-sd1")
    if name in ("sc", "csc"):
        loaded = load_tuner(fresh, path)
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["ldm_sce.tuner"])
        assert meta["kind"] == name and meta["base"] == "sd1" and meta["training"]["steps"] == 2
        if name == "csc":
            assert meta["condition"] == "canny" and loaded.condition == "canny"
    elif name == "lora":
        tensors = load_file(path)
        assert len(tensors) == 2 * 10 * 11  # A and B of 10 linears in each of the tiny UNet's 11 transformers
        assert all(tensors[k].abs().max() > 0 for k in tensors if k.endswith("lora_B"))  # trained away from 0
        load_lora(fresh, path)
    else:
        fresh = load_model(path)  # a whole checkpoint, config in its metadata
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        if name == "csc":
            return  # a controller needs hints; its round trip is in test_tuners.py
        trained = trainer.model.model.diffusion_model(x, t, c)
        # equal weights (sc, lora: bitwise equal outputs; full: the same weights in other allocations, round-off)
        torch.testing.assert_close(fresh.model.diffusion_model(x, t, c), trained, rtol=0, atol=1e-6)
        assert not torch.equal(load_model(ckpt, config="tiny-sd1").model.diffusion_model(x, t, c), trained)


def test_lora_file_round_trip_gives_the_same_unet(tiny_ckpts, tmp_path):
    from safetensors.torch import save_file

    ckpt = tiny_ckpts["sd1"][1]
    trained = load_model(ckpt, config="tiny-sd1")
    unet = trained.model.diffusion_model
    params = add_lora(unet, 4)
    torch.manual_seed(1)
    for p in params:
        p.data.normal_(0, 0.1)
    path = tmp_path / "lora-test.safetensors"
    save_file({n: p.detach().contiguous() for n, p in unet.named_parameters() if ".lora_" in n}, str(path))

    fresh = load_model(ckpt, config="tiny-sd1")
    assert sum(p.numel() for p in params) == 63_744  # rank 4 (bench: 1,019,904 at 64)
    assert load_lora(fresh, path) == 10 * 11  # layers: 10 linears in each of the tiny UNet's 11 transformers
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(x, t, c)
        assert not torch.equal(expected, load_model(ckpt, config="tiny-sd1").model.diffusion_model(x, t, c))
        assert torch.equal(fresh.model.diffusion_model(x, t, c), expected)


class OutputBias(Method):
    """A method written as a user would: train only the UNet's output bias, export it as a tensor file."""

    name, export_name = "out_bias", "out_bias.safetensors"

    def attach(self, unet):
        bias = unet.out[2].bias
        bias.requires_grad_(True)
        return [bias]

    def export(self, model, out_dir, summary):
        from safetensors.torch import save_file

        save_file(
            {"bias": model.model.diffusion_model.out[2].bias.detach().contiguous()}, str(out_dir / self.export_name)
        )
        return out_dir / self.export_name


def test_a_new_method_needs_only_its_class(tiny_ckpts, dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "out_bias", OutputBias)
    cfg = load_train_config(
        train_config(tmp_path, tiny_ckpts["sd1"][1], dataset, method={"name": "out_bias"}, optim={"max_steps": 2})
    )
    trainer = Trainer(cfg)
    assert [p.shape for p in trainer.params] == [torch.Size([4])]
    bias = load_file(trainer.train())["bias"]
    assert bias.abs().max() > 0  # it trained (the CompVis init starts it at 0)


def test_method_settings_are_checked():
    assert METHODS["csc"].check(MethodSection(name="csc"), None) == [
        "method csc needs method.condition (canny, color, inpaint) or data.condition_dir"
    ]
    assert METHODS["csc"].check(MethodSection(name="csc"), "maps/") == []
    assert "method.kernel must be 1 or 3" in METHODS["csc"].check(MethodSection(name="csc", kernel=5), "maps/")[0]
    assert "method.op" in METHODS["sc"].check(MethodSection(op="mlp"), None)[0]
