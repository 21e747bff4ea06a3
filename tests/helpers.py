"""Test helpers: tiny random models, and transformers' text model of a given size (an oracle)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ldm_sce import LatentDiffusion, ModelConfig


def random_model(cfg: ModelConfig, seed: int = 0) -> LatentDiffusion:
    """A model whose every parameter is random (norm scales and biases too), so no key can hide."""
    torch.manual_seed(seed)
    model = LatentDiffusion(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if name.endswith("logit_scale"):
            continue
        if p.ndim == 1 and ("norm" in name or name.split(".")[-2].startswith("ln")):
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
        else:
            p.normal_(0.0, 1.0 / max(p[0].numel(), 1) ** 0.5 if p.ndim > 1 else 0.1)
    return model


def hf_text_model(t, layers: int | None = None, projection: bool = False):
    """transformers' CLIPTextModel (with `projection`: CLIPTextModelWithProjection) with the dimensions of
    our TextConfig `t` (the oracle text tower)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.width,
        intermediate_size=4 * t.width,
        num_hidden_layers=t.layers if layers is None else layers,
        num_attention_heads=t.heads,
        max_position_embeddings=t.context_length,
        hidden_act="quick_gelu" if t.arch == "clip" else "gelu",
        projection_dim=t.embed_dim,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def load_hf(module, state: dict):
    """Load a transformers text model strictly (position ids aside: transformers makes them) from diffusers'
    converted state dict, with or without its `text_model.` prefix as the module has it; returns it, eval."""
    if not any(k.startswith("text_model.") for k in module.state_dict()):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = module.load_state_dict(
        {k: v for k, v in state.items() if "position_ids" not in k}, strict=False
    )
    assert not [k for k in missing if "position_ids" not in k] and not unexpected, (missing, unexpected)
    return module.eval()


def hf_text_towers(cfg, sd: dict) -> list:
    """transformers' text towers of a checkpoint (state dict `sd`, config `cfg`), converted by diffusers'
    own code: [(module, pad token)] (SDXL: CLIP-L, then bigG with its projection)."""
    from diffusers.loaders import single_file_utils as su

    if cfg.family == "sd1":
        return [(load_hf(hf_text_model(cfg.text), su.convert_ldm_clip_checkpoint(sd)), 49407)]
    if cfg.family == "sd2":
        hf = hf_text_model(cfg.text)
        return [(load_hf(hf, su.convert_open_clip_checkpoint(hf, sd)), 0)]
    clip_l = load_hf(
        hf_text_model(cfg.text), su.convert_ldm_clip_checkpoint(sd, "conditioner.embedders.0.transformer.")
    )
    big_g = hf_text_model(cfg.text2, projection=True)
    load_hf(big_g, su.convert_open_clip_checkpoint(big_g, sd, "conditioner.embedders.1.model."))
    return [(clip_l, 49407), (big_g, 0)]


def train_config(tmp_path: Path, ckpt: Path, data_path: Path, **sections) -> Path:
    """A training YAML for the tiny SD1 model in tmp_path (sections given are merged into the defaults)."""
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


_UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_UNET_LAYERS += ("proj_in", "proj_out", "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")


def write_kohya_lora(model, path, rank=4, alpha=2.0, seed=0, compvis_names=False, metadata=None):
    """A kohya-format LoRA on the UNet's attention, feed-forward, proj and resnet layers (conv LoRA on the
    3x3 convs) and on every text-encoder projection, random matrices."""
    from ldm_sce.lora import diffusers_unet_name, lora_targets

    g = torch.Generator().manual_seed(seed)
    unet = model.model.diffusion_model
    sd = {}

    def add(name, w):
        down_shape = (rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1])
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        sd[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=g) * 0.2
        sd[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.2
        sd[f"{name}.alpha"] = torch.tensor(alpha)

    for name, module in unet.named_modules():
        if name.endswith(_UNET_LAYERS) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            theirs = name if compvis_names else diffusers_unet_name(unet, name)
            add("lora_unet_" + theirs.replace(".", "_"), module.weight)
    for name, target in lora_targets(model).items():
        if name.startswith("lora_te"):
            add(
                name,
                getattr(target.module, target.tensor)[target.rows]
                if target.rows
                else getattr(target.module, target.tensor),
            )
    from safetensors.torch import save_file

    save_file(sd, str(path), metadata=metadata)
    return sd
