import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from helpers import random_model  # noqa: E402

from ldm_sce import PRESETS, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """{family: (model, path)}: random tiny models written as original-format `.ckpt` files (no metadata)."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for family, preset in (("sd1", "tiny-sd1"), ("sd2", "tiny-sd2")):
        model = random_model(PRESETS[preset], seed=len(out))
        path = root / f"{preset}.ckpt"
        save_checkpoint(model, path)
        out[family] = (model, path, preset)
    return out


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """{family: (path, config)}: random tiny SD1, SD2 and SDXL checkpoints as `.safetensors` in the original
    layout (no config inside)."""
    root = tmp_path_factory.mktemp("tiny-files")
    out = {}
    for family, preset in (("sd1", "tiny-sd1"), ("sd2", "tiny-sd2"), ("sdxl", "tiny-sdxl")):
        path = root / f"{preset}.safetensors"
        save_checkpoint(random_model(PRESETS[preset], seed=len(out) + 20), path, metadata=False)
        out[family] = (path, PRESETS[preset])
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """8 training images 16x16: a coloured square on grey, each with a same-name caption."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    for i in range(8):
        name, rgb = list(colors.items())[i % 4]
        arr = np.full((16, 16, 3), 128, np.uint8)
        x, y = rng.integers(0, 8, 2)
        arr[y : y + 8, x : x + 8] = rgb
        Image.fromarray(arr).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {name} square")
    return root
