"""Condition images for CSC-Tuner controllers: RGB uint8 arrays [H, W, 3] (the model takes them as [0, 1]).

- canny: OpenCV Canny edges (thresholds 100/200 by default; training may randomise 50-100 / 200-350).
- color: a colour map, downsampled by 64 with cubic interpolation and upsampled back with nearest.
- inpaint: the image with a masked region set to 0, from a user mask or random strokes/boxes (LaMa-style).
- raw: a precomputed condition (depth, HED, segmentation, pose) used as it is.
Every condition is first resized and center-cropped to the target size.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .images import to_rgb

CONDITIONS = ("canny", "color", "inpaint", "raw")


def _cv2():
    import cv2  # opencv-python-headless: the standard Canny of the ControlNet/SCEdit annotators

    return cv2


def resize_center_crop(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height, then crop the center (any mode: made RGB by `to_rgb`)."""
    return resize_center_crop_box(img, width, height)[0]


def resize_center_crop_box(img: Image.Image, width: int, height: int) -> tuple[Image.Image, tuple[int, int]]:
    """`resize_center_crop` and the crop's (top, left) in the resized image (SDXL conditions on it)."""
    img = img if img.mode == "RGB" else to_rgb(img)
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height)), (top, left)


def canny(img: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    edges = _cv2().Canny(img, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def color_map(img: np.ndarray, factor: int = 64) -> np.ndarray:
    cv2 = _cv2()
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def random_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A LaMa-style irregular mask [H, W] bool: a few thick random strokes and/or boxes."""
    cv2 = _cv2()
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 4)):
            bw, bh = rng.integers(w // 8, w // 2 + 1), rng.integers(h // 8, h // 2 + 1)
            x, y = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
            mask[y : y + bh, x : x + bw] = 1
    else:
        for _ in range(rng.integers(1, 5)):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            for _ in range(rng.integers(2, 8)):
                angle, length = rng.uniform(0, 2 * np.pi), rng.integers(w // 10 + 1, w // 3 + 2)
                nx = int(np.clip(x + length * np.cos(angle), 0, w - 1))
                ny = int(np.clip(y + length * np.sin(angle), 0, h - 1))
                cv2.line(mask, (x, y), (nx, ny), 1, int(rng.integers(max(1, w // 40), max(2, w // 12))))
                x, y = nx, ny
    return mask.astype(bool)


def inpaint_condition(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The masked image: pixels where mask is True become 0 (black)."""
    out = img.copy()
    out[mask] = 0
    return out


def make_condition(
    kind: str,
    img: Image.Image,
    width: int,
    height: int,
    mask: Image.Image | None = None,
    seed: int = 0,
    thresholds: tuple[int, int] = (100, 200),
) -> np.ndarray:
    """The condition image [height, width, 3] uint8 for controller kind `kind` made from `img`."""
    if kind not in CONDITIONS:
        raise ValueError(f"unknown condition {kind!r}; choose one of {', '.join(CONDITIONS)}")
    arr = np.asarray(resize_center_crop(img, width, height))
    if kind == "canny":
        return canny(arr, *thresholds)
    if kind == "color":
        return color_map(arr)
    if kind == "inpaint":
        if mask is None:
            m = random_mask(height, width, np.random.default_rng(seed))
        else:
            m = np.asarray(resize_center_crop(mask, width, height).convert("L")) > 127
        return inpaint_condition(arr, m)
    return arr


def condition_tensor(cond: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, H, W] float in [0, 1] (no mean/std), as the controllers take it."""
    return torch.tensor(cond).permute(2, 0, 1)[None].float() / 255.0
