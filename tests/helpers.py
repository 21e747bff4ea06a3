"""Test helpers: tiny random models, and transformers' text model of a given size (an oracle)."""

from __future__ import annotations

import torch

from ldm_sce import LatentDiffusion, ModelConfig
from ldm_sce.config import to_compvis_yaml as compvis_yaml  # noqa: F401 (the tests' name)


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
