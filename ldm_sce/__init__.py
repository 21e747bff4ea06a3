"""ldm-sce: Stable Diffusion in the CompVis layout with SCEdit (skip connection editing) in the UNet."""

from .checkpoint_io import CheckpointError, load_model, read_checkpoint, save_checkpoint
from .config import PRESETS, ConfigError, ModelConfig, TextConfig, UNetConfig, VAEConfig, load_config
from .diffusion import LatentDiffusion
from .sampling import sample
from .tuners import Control, CSCTuner, SCTuner, Tuning

__all__ = [
    "PRESETS",
    "CSCTuner",
    "CheckpointError",
    "ConfigError",
    "Control",
    "LatentDiffusion",
    "ModelConfig",
    "SCTuner",
    "TextConfig",
    "Tuning",
    "UNetConfig",
    "VAEConfig",
    "load_config",
    "load_model",
    "read_checkpoint",
    "sample",
    "save_checkpoint",
]
