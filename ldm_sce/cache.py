"""The training disk cache (`data.cache_dir`): VAE posteriors and text features kept as safetensors files,
named by a hash of everything that made them, so a stale entry is never read."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion

log = logging.getLogger(__name__)


class DiskCache:
    """VAE posteriors and text features as safetensors files under `root`, named by a hash of what made them:
    a posterior by the image's bytes (a file's or a shard sample's), its training size and the VAE's weights;
    text features by the caption and the text encoders' weights. A changed image, size, caption or model gives
    a new name, so a stale entry is never read; files are written atomically (a temporary name, a rename)."""

    def __init__(self, root: Path, model: LatentDiffusion):
        self.root = root
        text = model.conditioner if model.cfg.family == "sdxl" else model.cond_stage_model
        self.vae_id, self.text_id = _weights_hash(model.first_stage_model), _weights_hash(text)
        self._files: dict[Path, tuple[tuple[int, int], str]] = {}  # path -> ((mtime_ns, size), content hash)
        (root / "latents").mkdir(parents=True, exist_ok=True)
        (root / "text").mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def file_hash(self, image: Path) -> str:
        """The hash of a file's bytes, recomputed only when its modification time or size changes."""
        stat = image.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._files.get(image, (None,))[0] != stamp:
            self._files[image] = (stamp, sha256(image.read_bytes()))
        return self._files[image][1]

    def latent_key(self, content: str, shape: tuple[int, ...]) -> Path:
        """The entry of an image with content hash `content`, made at latent `shape`."""
        name = sha256(f"{content}:{shape}:{self.vae_id}".encode())
        return self.root / "latents" / f"{name}.safetensors"

    def text_key(self, caption: str) -> Path:
        return self.root / "text" / f"{sha256(f'{caption}:{self.text_id}'.encode())}.safetensors"

    def get(self, path: Path) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        if not path.is_file():
            self.misses += 1
            return None
        try:
            found = load_file(str(path))
        except Exception as e:  # a damaged entry is made again
            log.warning("disk cache: %s is unreadable (%s); recomputing it", path, e)
            self.misses += 1
            return None
        self.hits += 1
        return found

    def put(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)


def sha256(data: bytes) -> str:
    """The hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def _weights_hash(module: nn.Module) -> str:
    """A hash of a module's parameter names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
