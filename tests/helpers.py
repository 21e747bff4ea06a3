"""Test helpers: tiny random checkpoints in the original format, and the original-YAML form of a config."""

from __future__ import annotations

import torch

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


def compvis_yaml(cfg: ModelConfig) -> dict:
    """The original CompVis/Stability inference YAML (as a dict) describing `cfg`."""
    u, v = cfg.unet, cfg.vae
    unet = {
        "use_checkpoint": True, "use_fp16": False, "image_size": 32, "in_channels": u.in_channels,
        "out_channels": u.out_channels, "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult), "use_spatial_transformer": True,
        "transformer_depth": u.transformer_depth, "context_dim": u.context_dim, "legacy": False,
    }  # fmt: skip
    if u.num_heads is not None:
        unet["num_heads"] = u.num_heads
    else:
        unet.update(num_head_channels=u.num_head_channels, use_linear_in_transformer=u.use_linear_in_transformer)
    text_target = "FrozenCLIPEmbedder" if cfg.text.arch == "clip" else "FrozenOpenCLIPEmbedder"
    params = {
        "linear_start": cfg.linear_start, "linear_end": cfg.linear_end, "num_timesteps_cond": 1,
        "log_every_t": 200, "timesteps": cfg.timesteps, "first_stage_key": "jpg", "cond_stage_key": "txt",
        "image_size": 64, "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema", "scale_factor": cfg.scale_factor, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": v.embed_dim, "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": True, "z_channels": v.z_channels, "resolution": 256, "in_channels": v.in_channels,
                    "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
                    "attn_resolutions": [], "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": {"target": f"ldm.modules.encoders.modules.{text_target}"},
    }  # fmt: skip
    if cfg.parameterization == "v":
        params["parameterization"] = "v"
    if cfg.text.arch == "open_clip":
        params["cond_stage_config"]["params"] = {"freeze": True, "layer": "penultimate"}
    return {
        "model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}
    }


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
        )  # fmt: skip
    )
