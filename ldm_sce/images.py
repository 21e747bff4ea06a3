"""Image files in and out: decoding any Pillow mode correctly, tensors <-> PIL, grids, and PNG outputs that
are written atomically and never overwrite an existing file.

Decoding (`load_image`) turns every readable file into 8-bit RGB the same way, whatever it is used for
(training image, control image, init image):
- EXIF orientation is applied (phone photos are stored sideways with a rotation tag);
- 16-bit grey (`I;16*`, and `I` within 0..65535: depth maps and scans often are) is scaled by 255 / 65535,
  not clipped (clipping turns almost every pixel white); 16-bit RGB PNGs are read by Pillow as 8-bit RGB;
- float (`F`) images in [0, 1] are scaled by 255; other float ranges are refused (their meaning is unknown);
- palette, grey, CMYK and 1-bit images are converted to RGB; an alpha channel is composited onto white
  (AUTOMATIC1111's img2img background), so transparent pixels do not become their hidden colour;
- multi-frame files (GIF, TIFF pages) give their first frame.
A file that is not an image, is truncated, or has a mode that cannot be turned into RGB raises `ImageError`
naming the file and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """An image file that cannot be read as RGB; the message names the file and the reason."""


class NonFiniteError(ValueError):
    """Latents or images holding NaN or inf: nothing is written; the message names the likely cause."""


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}  # what datasets, shards and uploads take as images


def to_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """Any Pillow image -> 8-bit RGB by the rules of the module docstring."""
    im = ImageOps.exif_transpose(im)
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        a = np.asarray(im, dtype=np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{name}: 32-bit integer pixels outside 0..65535; save it as an 8- or 16-bit image")
        return Image.fromarray(np.rint(a * (255 / 65535)).astype(np.uint8)).convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
            raise ImageError(f"{name}: float pixels outside [0, 1]; save it as an 8- or 16-bit image")
        return Image.fromarray(np.rint(a * 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode in ("RGB", "L", "1", "CMYK", "YCbCr"):
        return im.convert("RGB")
    raise ImageError(f"{name}: image mode {im.mode!r} cannot be read as RGB; convert it to an RGB PNG or JPEG")


def load_image(path: str | Path) -> Image.Image:
    """The image at `path` as 8-bit RGB (see the module docstring); `ImageError` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    return _open(path, str(path))


def image_size(source: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of an image file (or encoded image bytes) as `load_image` gives it (EXIF rotations of 90
    degrees swap the sides), from its header."""
    import io

    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def decode_image(data: bytes, name: str) -> Image.Image:
    """As `load_image`, for an encoded image in memory (e.g. a tar shard's member); `name` for messages."""
    import io

    return _open(io.BytesIO(data), name)


def _open(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            im.seek(0)
            im.load()
            return to_rgb(im, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"cannot read image {name}: not an image or a truncated file ({e})") from e


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL images. NaN or inf (which would become black) raises NonFiniteError."""
    if not torch.isfinite(images).all():
        raise NonFiniteError(
            "the decoded images hold NaN or inf (the VAE overflowed, or its input was not finite); with "
            "reduced precision, decode in fp32 (--precision full)"
        )
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def make_grid(images: list[Image.Image], n_cols: int) -> Image.Image:
    w, h = images[0].size
    n_rows = (len(images) + n_cols - 1) // n_cols
    grid = Image.new("RGB", (n_cols * w, n_rows * h))
    for i, img in enumerate(images):
        grid.paste(img, ((i % n_cols) * w, (i // n_cols) * h))
    return grid


def next_index(folder: Path, pattern: str, digits: int) -> int:
    """One past the highest number among the files of `folder` matching `pattern` (e.g. 00012.png): new
    outputs go after every existing one, whatever gaps there are (CompVis counted files, which reused a
    number after a gap)."""
    numbers = [int(p.stem[-digits:]) for p in folder.glob(pattern) if p.stem[-digits:].isdigit()]
    return max(numbers, default=-1) + 1


def free_path(path: Path) -> Path:
    """`path`, or the first of name-1.ext, name-2.ext, ... that does not exist yet."""
    k = 0
    candidate = path
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.stem}-{k}{path.suffix}")
    return candidate


def save_png(img: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Write `img` to `path` as PNG with `text` chunks, atomically (a temporary name, then a hard link to
    `path`): an existing file is never replaced (FileExistsError), and a crash leaves no half-written PNG."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        try:
            os.link(tmp, path)  # fails if path exists: no overwrite, even when two processes race
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if path.exists():
                raise FileExistsError(f"{path} exists; not overwriting it") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
