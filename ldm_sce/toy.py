"""The toy shapes world: a synthetic image-text dataset made by code, and the image analysis that scores
what a model trained on it generates, with no download and no pretrained network.

A scene is one shape (circle, square, triangle, diamond) of one of five colours, small or large, placed
left / right / top / bottom / centre on a light background, plain or with faint stripes. One background
colour: at toy width (32 channels) every GroupNorm of the SD architecture (32 groups) normalises each
channel alone, which removes a flat image's per-channel mean, so a toy VAE learns a varying background
colour only very slowly; SD's VAE (128 channels, 4 per group) does not have the problem. Captions say
what is drawn ("a small red circle on the left"); some omit the size or the position, and a fifth end
with a made-up "<word> style", so that the model learns to read past words it does not know (the text
encoder is random and frozen; SD's pretrained CLIP tolerates new words, this one must be taught to).
The `zqx` style (the few-shot style set, trigger " zqx style" at the end of the prompt) draws the same
scenes with fine "/" stripes and a dark outline, a look the base model never sees. The VAE is the
general codec: besides the base world it learns random looks (light or night-blue grounds, bold
patterns, outlines) and the night look of the first style (night blue, white outline; `night_outline`).
Everything is deterministic from a seed. Images are drawn at 4x and downsampled (anti-aliased edges).

Analysis (`analyze`): the background is the border's frequent colours (a plain ground, or both colours
of a bold pattern); the shape is the largest connected region of pixels far from all of them. Its colour
is the nearest palette colour to the median of the region's interior; its kind follows from how much of
its bounding box it fills (square ~1, circle ~0.79, triangle and diamond ~0.5) and, between the last two,
where its widest row lies (bottom: triangle). `style_adherence` reads the `zqx` style's stripes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from .diffusion import LatentDiffusion
    from .tuners import Control

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 195, 20),
    "purple": (140, 50, 180),
}
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (7.0, 10.0), "large": (13.0, 18.0)}  # radius range in pixels at 64x64
POSITIONS = {
    "in the center": (0.5, 0.5),
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
}
BACKGROUNDS = [(245, 245, 245)]  # one light background (plain or striped), see the module docstring
NIGHT = (22, 26, 58)  # night blue: the VAE's dark ground
STYLE_TRIGGER = " zqx style"  # appended to the prompt
# the `zqx` style: fine "/" stripes (6 px, 1.5 latent pixels: a texture the latent carries per position, which
# an SC-Tuner learns while keeping the shapes; at 12 px, the size of a small shape, it broke their edges)
STYLE_LOOK = {"texture": "slash", "contrast": 0.2, "period": 6, "outline": (20, 20, 20)}
RES = 64
_SS = 4  # supersampling factor


@dataclass(frozen=True)
class Scene:
    kind: str
    colour: str
    size: str
    position: str
    cx: float  # centre and radius in pixels at RES
    cy: float
    r: float
    background: tuple[int, int, int]
    stripes: bool
    night_outline: bool = False  # the first style's look: night blue, white outline (VAE set)
    texture: str = ""  # a bold background pattern: "stripes" (\), "slash" (/), "dots" or "grid"
    contrast: float = 0.0  # how far the pattern moves from the background colour, 0..1
    period: int = 8  # of the pattern, pixels at RES
    outline: tuple[int, int, int] | None = None  # an outline of the shape in this colour (varied looks)


def random_scene(rng: np.random.Generator, night_outline: bool = False, varied: float = 0.0) -> Scene:
    """One scene; `varied`: the probability of a random look (background, bold pattern, outline), for the VAE."""
    kind = KINDS[rng.integers(len(KINDS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    r = float(rng.uniform(*SIZES[size]))
    fx, fy = POSITIONS[position]
    cx, cy = (np.array([fx, fy]) * RES + rng.uniform(-3, 3, 2)).clip(r + 2, RES - r - 2)
    background = NIGHT if night_outline else BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    scene = Scene(
        kind, colour, size, position, float(cx), float(cy), r, background, bool(rng.random() < 0.3), night_outline
    )
    if varied and rng.random() < varied:
        scene = replace(scene, **random_look(rng))
    return scene


def random_look(rng: np.random.Generator) -> dict:
    """A random look for the general-codec set: light or night background, a bold pattern of random
    contrast and period (or none), an outline of random grey (or none)."""
    textures = ("", "stripes", "slash", "dots", "grid")
    outline = None
    if rng.random() < 0.6:
        outline = tuple(int(v) for v in [rng.choice([0, 30, 128, 220, 255])] * 3)
    return {
        "background": BACKGROUNDS[0] if rng.random() < 0.7 else NIGHT,
        "stripes": False,
        "texture": textures[rng.integers(len(textures))],
        "contrast": float(rng.uniform(0.1, 0.4)),
        "period": int(rng.choice([6, 8, 12, 16])),
        "outline": outline,
    }


def caption(scene: Scene, rng: np.random.Generator, nonce: float = 0.0) -> str:
    """'a [size] colour kind [position]': size and position are each left out a third of the time.
    `nonce`: the probability of a made-up "<word> style" at the end, a word the model must learn to read
    past (the style's trigger goes there too)."""
    words = ["a"] + ([scene.size] if rng.random() > 1 / 3 else []) + [scene.colour, scene.kind]
    if rng.random() > 1 / 3:
        words.append(scene.position)
    if nonce and rng.random() < nonce:
        words += [nonce_word(rng), "style"]
    return " ".join(words)


def nonce_word(rng: np.random.Generator) -> str:
    """A made-up word of 3-4 letters, never the style's trigger."""
    while True:
        word = "".join(chr(ord("a") + int(i)) for i in rng.integers(26, size=int(rng.integers(3, 5))))
        if word != STYLE_TRIGGER.split()[0]:
            return word


def _polygon(scene: Scene, s: float) -> list[tuple[float, float]] | None:
    cx, cy, r = scene.cx * s, scene.cy * s, scene.r * s
    if scene.kind == "square":
        a = r * 0.88  # about the circle's area
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if scene.kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if scene.kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render(scene: Scene, res: int = RES) -> Image.Image:
    s = res / RES * _SS
    size = res * _SS
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    if scene.stripes:  # faint diagonal stripes, "\"
        shade = tuple(int(c * 0.94) for c in scene.background)
        step = int(8 * s)
        for k in range(-size, size, step):
            draw.line([(k, 0), (k + size, size)], fill=shade, width=max(1, step // 3))
    if scene.texture:
        _pattern(draw, scene, s, size)
    fill = COLOURS[scene.colour]
    outline, width = ((255, 255, 255), int(round(1.5 * s))) if scene.night_outline else (None, 0)
    if scene.outline is not None:
        outline, width = tuple(scene.outline), int(round(1.5 * s))
    poly = _polygon(scene, s)
    if poly is None:
        cx, cy, r = scene.cx * s, scene.cy * s, scene.r * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(poly, fill=fill, outline=outline, width=width)
    return img.resize((res, res), Image.BOX)


def _pattern(draw: ImageDraw.ImageDraw, scene: Scene, s: float, size: int) -> None:
    """A bold background pattern: towards black on a light background, towards white on a dark one."""
    bg = np.array(scene.background, dtype=np.float64)
    ink = 0.0 if bg.mean() > 127 else 255.0
    c = tuple(int(round(v)) for v in bg + scene.contrast * (ink - bg))
    step = max(2, int(scene.period * s))
    if scene.texture in ("stripes", "slash"):
        sign = 1 if scene.texture == "stripes" else -1  # "\" or "/"
        for k in range(-size, 2 * size, step):
            draw.line([(k, 0), (k + sign * size, size)], fill=c, width=max(1, step // 2))
    elif scene.texture == "dots":
        rad = step / 4
        for x in np.arange(step / 2, size, step):
            for y in np.arange(step / 2, size, step):
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=c)
    elif scene.texture == "grid":
        for k in range(0, size, step):
            draw.line([(k, 0), (k, size)], fill=c, width=max(1, step // 4))
            draw.line([(0, k), (size, k)], fill=c, width=max(1, step // 4))


def write_dataset(out: str | Path, n: int, seed: int, nonce: float = 0.0, look: dict | None = None) -> Path:
    """n scenes as PNGs plus `metadata.jsonl` (file_name, text, and the scene) in `out`; `nonce` as in
    `caption`; `look`: Scene fields every scene gets (a style)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        scene = random_scene(rng)
        if look:
            scene = replace(scene, **look)
        name = f"{i:06d}.png"
        render(scene).save(out / name)
        text = caption(scene, rng, nonce=nonce)
        lines.append(json.dumps({"file_name": name, "text": text, "scene": asdict(scene)}))
    tmp = out / "metadata.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "metadata.jsonl")
    return out


def eval_prompts() -> list[tuple[str, str, str]]:
    """The fixed prompt set: 50 (prompt, colour, kind). Every colour-kind pair appears 2 or 3 times,
    plain, with a size and with a position."""
    colours, out = list(COLOURS), []
    sizes, positions = list(SIZES), list(POSITIONS)
    for i in range(50):
        colour, kind = colours[i % 5], KINDS[(i // 5) % 4]
        if i < 20:
            prompt = f"a {colour} {kind}"
        elif i < 40:
            prompt = f"a {sizes[i % 2]} {colour} {kind}"
        else:
            prompt = f"a {colour} {kind} {positions[i % 5]}"
        out.append((prompt, colour, kind))
    return out


# ---------------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------------


def luma(rgb) -> float:
    r, g, b = (np.asarray(rgb, dtype=np.float64) / 255.0)[..., :3].T
    return float(np.mean(0.299 * r + 0.587 * g + 0.114 * b))


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)]
    )


def _far_from_background(a: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels farther than `threshold` from the border's median colour and from every colour (binned by
    16 levels) of at least a tenth of the border pixels: a plain ground, or both colours of a bold pattern."""
    border = _border(a)
    _, inverse, counts = np.unique(np.round(border / 16), axis=0, return_inverse=True, return_counts=True)
    colours = [np.median(border, axis=0)]
    colours += [border[inverse.ravel() == k].mean(axis=0) for k in np.flatnonzero(counts >= 0.1 * len(border))]
    dist = np.min([np.linalg.norm(a - c, axis=-1) for c in colours], axis=0)
    return (dist > threshold).astype(np.uint8)


def _largest_region(far: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 mask, [x, y, w, h, area]) of the largest 8-connected region of `far`; None when it is empty."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(far, connectivity=8)
    if n < 2:
        return None
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == k).astype(np.uint8), stats[k]


def analyze(img: Image.Image | np.ndarray, threshold: float = 70.0) -> dict:
    """{'colour', 'kind', 'background_luma', 'fill', 'area'} of the main shape; colour and kind are None
    when no shape is found."""
    import cv2

    a = np.asarray(img, dtype=np.float32)[..., :3]
    bg = np.median(_border(a), axis=0)
    out = {"colour": None, "kind": None, "background_luma": luma(bg), "fill": 0.0, "area": 0}
    region = _largest_region(_far_from_background(a, threshold))
    if region is None or region[1][4] < 20:
        return out
    mask, (x, y, w, h, area) = region
    inner = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    pixels = a[inner] if inner.sum() >= 5 else a[mask.astype(bool)]
    rgb = np.median(pixels, axis=0)
    names = list(COLOURS)
    out["colour"] = names[int(np.argmin([np.linalg.norm(rgb - np.array(COLOURS[c])) for c in names]))]
    fill = area / float(w * h)
    widths = mask[y : y + h, x : x + w].sum(axis=1)
    widest = float(np.mean(np.flatnonzero(widths >= widths.max() - 1))) / max(h - 1, 1)  # 0 top .. 1 bottom
    if fill > 0.88:
        kind = "square"
    elif fill > 0.65:
        kind = "circle"
    else:
        kind = "triangle" if widest > 0.7 else "diamond"
    out.update(kind=kind, fill=fill, area=int(area))
    return out


def edges(img: Image.Image | np.ndarray) -> np.ndarray:
    """Canny edges (100, 200) of an RGB image, as a boolean map."""
    from .conditions import canny

    return canny(np.asarray(img)[..., :3].astype(np.uint8)) > 0


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> float:
    """F1 of edge maps where a pixel within `tolerance` pixels of an edge of the other map counts as a hit
    (the usual tolerance of boundary benchmarks, here in pixels)."""
    import cv2

    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_target = cv2.dilate(target.astype(np.uint8), kernel).astype(bool)
    near_pred = cv2.dilate(pred.astype(np.uint8), kernel).astype(bool)
    if not pred.any() or not target.any():
        return 0.0
    precision = float((pred & near_target).sum() / pred.sum())
    recall = float((target & near_pred).sum() / target.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------------------
# Generation and scores
# ---------------------------------------------------------------------------------------------------------

SAMPLING = {"sampler": "ddim", "steps": 25, "scale": 5.0}  # the settings every toy figure uses


def generate(
    model: LatentDiffusion,
    prompts: list[str],
    seeds: list[int],
    control: Callable[[slice], Control] | None = None,
    tuner_scale: float = 1.0,
    batch: int = 50,
) -> list[Image.Image]:
    """64x64 images for `prompts` (one per seed) with the toy sampling settings. `control`: a function
    of the batch slice returning a `Control`, or None."""
    import torch

    from .images import to_pil
    from .sampling import sample
    from .tuners import Tuning

    out = []
    with torch.no_grad():
        for k in range(0, len(prompts), batch):
            part = prompts[k : k + batch]
            c = model.get_learned_conditioning(part)
            uc = model.get_learned_conditioning([""] * len(part))
            tuning = Tuning(tuner_scale, control(slice(k, k + len(part))) if control else None)
            z = sample(
                model,
                c,
                uc,
                sampler=SAMPLING["sampler"],
                steps=SAMPLING["steps"],
                scale=SAMPLING["scale"],
                seed=list(seeds[k : k + batch]),
                shape=model.cfg.latent_size(RES, RES),
                tuning=tuning,
            )
            out += to_pil(model.decode_first_stage(z))
    return out


def prompt_scores(images: list[Image.Image], expected: list[tuple[str, str]]) -> dict:
    """Fractions of images whose shape has the asked colour, kind, and both; expected: (colour, kind)."""
    found = [analyze(im) for im in images]
    colour = [f["colour"] == c for f, (c, _) in zip(found, expected, strict=True)]
    kind = [f["kind"] == k for f, (_, k) in zip(found, expected, strict=True)]
    return {
        "colour": float(np.mean(colour)),
        "kind": float(np.mean(kind)),
        "accuracy": float(np.mean([a and b for a, b in zip(colour, kind, strict=True)])),
        "background_luma": float(np.mean([f["background_luma"] for f in found])),
    }


def pattern(img: Image.Image | np.ndarray) -> tuple[float, float]:
    """(strength, slant) of the background pattern: the luma std of the pixels more than 3 pixels from
    the main shape, and log(d1 / d2) of the mean absolute luma differences across and along "/" lines:
    positive for the style's fine "/" stripes, negative for the base world's faint "\\" stripes, about 0
    for none or dots."""
    import cv2

    a = np.asarray(img, dtype=np.float64)[..., :3] / 255.0
    lum = a @ np.array([0.299, 0.587, 0.114])
    region = _largest_region(_far_from_background(a * 255, 70.0))
    keep = np.ones_like(lum, dtype=bool)
    if region is not None:
        keep = ~cv2.dilate(region[0], np.ones((7, 7), np.uint8)).astype(bool)
    if keep.sum() < 50:
        return 0.0, 0.0
    across = np.abs(lum[1:, 1:] - lum[:-1, :-1])[keep[1:, 1:] & keep[:-1, :-1]].mean()  # step (1, 1)
    along = np.abs(lum[1:, :-1] - lum[:-1, 1:])[keep[1:, :-1] & keep[:-1, 1:]].mean()  # step (-1, 1)
    return float(lum[keep].std()), float(np.log((across + 1e-3) / (along + 1e-3)))


def style_adherence(images: list[Image.Image], strength: float = 0.045, slant: float = 0.5) -> float:
    """Fraction of images in the `zqx` style: a "/" pattern (`pattern`: strength above 0.045, slant
    above 0.5; the base world's faint "\\" stripes have strength at most 0.026, the style 0.06-0.07)."""
    return float(np.mean([st > strength and sl > slant for st, sl in (pattern(im) for im in images)]))


__all__ = [
    "COLOURS",
    "KINDS",
    "STYLE_LOOK",
    "STYLE_TRIGGER",
    "Scene",
    "analyze",
    "caption",
    "edge_f1",
    "edges",
    "eval_prompts",
    "generate",
    "pattern",
    "prompt_scores",
    "random_scene",
    "render",
    "style_adherence",
    "write_dataset",
]
