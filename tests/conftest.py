import sys
from pathlib import Path

import pytest

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
