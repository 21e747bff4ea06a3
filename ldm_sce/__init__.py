"""ldm-sce: Stable Diffusion in the CompVis layout with SCEdit (skip connection editing) in the UNet."""

from .checkpoint_io import CheckpointError, load_model, read_checkpoint, save_checkpoint
from .config import PRESETS, ConfigError, ModelConfig, TextConfig, UNetConfig, VAEConfig, load_config
from .diffusion import LatentDiffusion

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "LatentDiffusion",
    "ModelConfig",
    "TextConfig",
    "UNetConfig",
    "VAEConfig",
    "load_config",
    "load_model",
    "read_checkpoint",
    "save_checkpoint",
]
