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


def hf_text_model(t, layers: int | None = None):
    """transformers' CLIPTextModel with the dimensions of our TextConfig `t` (the oracle text tower)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=4 * t.width,
            num_hidden_layers=t.layers if layers is None else layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            hidden_act="quick_gelu" if t.arch == "clip" else "gelu",
            projection_dim=t.embed_dim,
        )
    )


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
