"""Training data: image-caption folders, scepter's `train.csv`, and `metadata.jsonl`, with optional control
conditions. Every random choice of an item (caption dropout, canny thresholds, inpainting masks) is drawn
from a generator seeded by (seed, epoch, index), so a run is reproducible and resumable by step count.

Layouts (`data.path`):
- a folder of images, each with a same-name `.txt` caption (`data.caption_extension`; missing caption:
  empty); subfolders named `N_name` (kohya's layout) hold images repeated N times per epoch;
- a folder holding `train.csv` (scepter: header `Target:FILE,Prompt`, paths relative to the folder);
- a folder holding `metadata.jsonl` (lines `{"file_name": ..., "text": ...}`), or that file itself.
Conditions: made on the fly from the image (canny, color, inpaint) or read from `condition_dir` (same
file name) for precomputed ones (depth, HED, segmentation, pose).
Captions as kohya's sd-scripts treat them: comma-separated tags, the first `keep_tokens` fixed, the others
dropped with probability `tag_dropout` and then shuffled (`shuffle_caption`), per item and epoch.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .conditions import condition_tensor, make_condition, resize_center_crop_box
from .config import ConfigError
from .images import IMAGE_EXTS, ImageError, decode_image, load_image
from .shards import COND_PARTS, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    image: Path
    caption: str


_REPEATS = re.compile(r"^(\d+)_(.+)$")


def scan(path: str | Path, caption_extension: str = ".txt") -> list[Item]:
    """The items of a dataset in one of the layouts above (an image of an `N_name` folder N times);
    ConfigError naming the problem otherwise."""
    path = Path(path)
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl(path)
    if not path.is_dir():
        raise ConfigError(f"training data not found: {path} (data.path: a folder, or a metadata.jsonl file)")
    if (path / "metadata.jsonl").is_file():
        return _jsonl(path / "metadata.jsonl")
    if (path / "train.csv").is_file():
        return _csv(path / "train.csv")
    items = _folder(path, caption_extension)
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and _REPEATS.match(p.name)):
        repeats = int(_REPEATS.match(sub.name)[1])
        if repeats < 1 or repeats > 10_000:
            raise ConfigError(f"{sub}: a repeat count of {repeats} (the folder name's number must be 1..10000)")
        items += [item for item in _folder(sub, caption_extension) for _ in range(repeats)]
    if not items:
        raise ConfigError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTS))}) found")
    return items


def _folder(path: Path, caption_extension: str) -> list[Item]:
    items = []
    for image in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        txt = image.with_suffix(caption_extension)
        items.append(Item(image, _read_text(txt).strip() if txt.is_file() else ""))
    return items


def process_caption(caption: str, rng: np.random.Generator, keep_tokens: int, tag_dropout: float, shuffle: bool):
    """kohya's caption handling: tags split at commas; the first keep_tokens kept in place; each other tag
    dropped with probability tag_dropout, the rest shuffled if asked; joined with ", "."""
    if not (shuffle or tag_dropout):
        return caption
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if tag_dropout:
        flex = [t for t in flex if rng.random() >= tag_dropout]
    if shuffle:
        flex = [flex[k] for k in rng.permutation(len(flex))]
    return ", ".join(fixed + flex)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


def _csv(path: Path) -> list[Item]:
    rows = list(csv.reader(_read_text(path).splitlines()))
    if not rows or rows[0][:2] != ["Target:FILE", "Prompt"]:
        raise ConfigError(f"{path}: expected the header 'Target:FILE,Prompt'")
    bad = [n for n, r in enumerate(rows[1:], 2) if r and len(r) < 2]
    if bad:
        raise ConfigError(f"{path}: line(s) {bad[:5]} do not have a file and a prompt")
    items = [Item(path.parent / r[0], r[1]) for r in rows[1:] if r]
    if not items:
        raise ConfigError(f"{path}: no rows")
    return items


def _jsonl(path: Path) -> list[Item]:
    items = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                if not (isinstance(row, dict) and isinstance(row["file_name"], str)):
                    raise KeyError("file_name")
                text = row.get("text", "")
                if not isinstance(text, str):
                    raise KeyError("text")
                items.append(Item(path.parent / row["file_name"], text))
            except (json.JSONDecodeError, KeyError) as e:
                raise ConfigError(f"{path}:{n}: expected {{'file_name': ..., 'text': ...}} ({e})") from None
    if not items:
        raise ConfigError(f"{path}: no rows")
    return items


class TrainDataset(torch.utils.data.Dataset):
    """`data[epoch, i]` -> {'image': [3, H, W] in [-1, 1], 'caption': str, 'cond': [3, h, w] in [0, 1] (control
    only)}, or None when the image cannot be read (skipped with a warning and counted in `bad`). The epoch
    seeds the item's random choices (caption dropout, canny thresholds, masks) with the seed and index.

    `condition`: the condition kind made from each image (canny, color, inpaint), or read from
    `condition_dir` (same file name; used as it is) when that is given; `cond_resolution`: the condition
    image's side (`ModelConfig.condition_size`)."""

    def __init__(
        self,
        items: list[Item],
        resolution: int,
        *,
        cond_resolution: int | None = None,
        seed: int = 0,
        trigger: str = "",
        suffix: str = "",
        caption_dropout: float = 0.0,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        tag_dropout: float = 0.0,
        condition: str | None = None,
        condition_dir: str | None = None,
        random_thresholds: bool = False,
        sizes: list[tuple[int, int]] | None = None,
        condition_size=None,
    ):
        """sizes: each item's (width, height) (aspect-ratio buckets); None: resolution x resolution.
        condition_size(height, width) -> the condition image's (height, width) (default: cond_resolution)."""
        self.items, self.resolution, self.seed = items, resolution, seed
        self.cond_resolution = cond_resolution or resolution
        self.trigger, self.suffix, self.caption_dropout = trigger, suffix, caption_dropout  # prefix, suffix
        self.shuffle_caption, self.keep_tokens, self.tag_dropout = shuffle_caption, keep_tokens, tag_dropout
        self.condition, self.condition_dir, self.random_thresholds = condition, condition_dir, random_thresholds
        self.sizes, self.condition_size = sizes, condition_size
        self.bad: set[Path] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict | None:
        epoch, i = key
        item = self.items[i]
        cond = (lambda: load_image(Path(self.condition_dir) / item.image.name)) if self.condition_dir else None
        size = self.sizes[i] if self.sizes is not None else None
        rng = np.random.default_rng([self.seed, epoch, i])
        return self._make(lambda: load_image(item.image), item.image, item.caption, rng, size, cond)

    def from_shard(self, sample: Sample, size: tuple[int, int] | None = None) -> dict | None:
        """The item of a tar-shard sample (`shards.py`), its random choices seeded by (seed, epoch, sample)."""
        name = f"{sample.shard}:{sample.key}.{sample.image_part}"
        caption = (sample.read("txt") or b"").decode("utf-8", errors="replace").strip()
        cond = None
        if self.condition == "raw":  # precomputed conditions: the sample's cond part
            part = next((p for p in COND_PARTS if sample.part(p) is not None), None)
            if part is None:
                log.warning("skipping %s: it has no %s part (the precomputed condition)", name, " or ".join(COND_PARTS))
                self.bad.add(Path(name))
                return None
            cond = lambda: decode_image(sample.read(part), f"{sample.shard}:{sample.key}.{part}")  # noqa: E731
        rng = np.random.default_rng([self.seed, sample.epoch, sample.uid])
        return self._make(
            lambda: decode_image(sample.read(sample.image_part), name), Path(name), caption, rng, size, cond
        )

    def _make(self, load, name: Path, caption: str, rng: np.random.Generator, size, load_cond) -> dict | None:
        """The item made from the image `load()` gives (resized to `size` (width, height), or the square
        resolution), its caption and condition (`load_cond()`: a precomputed one), or None if it is unreadable."""
        width, height = size if size is not None else (self.resolution, self.resolution)
        try:
            original = load()
            img, (top, left) = resize_center_crop_box(original, width, height)
        except ImageError as e:
            if name not in self.bad:
                log.warning("skipping unreadable image %s (%s)", name, e)
            self.bad.add(name)
            return None
        dropped = rng.random() < self.caption_dropout
        text = process_caption(caption, rng, self.keep_tokens, self.tag_dropout, self.shuffle_caption)
        caption = "" if dropped else self.trigger + text + self.suffix
        arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        # SDXL's micro-conditioning, as it was trained: the original size, the crop and the target size
        sizes = torch.tensor([original.height, original.width, top, left, height, width])
        out = {
            "image": torch.from_numpy(arr).permute(2, 0, 1),
            "caption": caption,
            "dropped": dropped,
            "sizes": sizes.float(),
        }
        if self.condition:
            ch, cw = self.condition_size(height, width) if self.condition_size else (self.cond_resolution,) * 2
            try:
                out["cond"] = condition_tensor(self._condition(img, load_cond, rng, cw, ch))[0]
            except ImageError as e:
                log.warning("skipping %s: its condition image is unreadable (%s)", name, e)
                self.bad.add(name)
                return None
        return out

    def _condition(self, img: Image.Image, load_cond, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
        if load_cond is not None:  # precomputed (checked to exist before training, or a shard's cond part)
            return make_condition("raw", load_cond(), w, h)
        thresholds = (int(rng.integers(50, 101)), int(rng.integers(200, 351))) if self.random_thresholds else (100, 200)
        return make_condition(self.condition, img, w, h, seed=int(rng.integers(2**31)), thresholds=thresholds)


def collate(batch: list[dict | None]) -> dict | None:
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    out = {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "dropped": torch.tensor([b["dropped"] for b in batch]),
        "sizes": torch.stack([b["sizes"] for b in batch]),
    }
    if "cond" in batch[0]:
        out["cond"] = torch.stack([b["cond"] for b in batch])
    return out
