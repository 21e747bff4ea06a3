import numpy as np
import pytest
from PIL import Image

from ldm_sce.conditions import condition_tensor, make_condition, random_mask, resize_center_crop


def square_image(w=96, h=64):
    arr = np.zeros((h, w, 3), np.uint8)
    arr[16:48, 32:64] = (255, 0, 0)  # a red square on black
    return Image.fromarray(arr)


def test_resize_center_crop_keeps_the_center():
    img = resize_center_crop(square_image(), 32, 32)  # 96x64 -> 48x32, crop x 8..40
    arr = np.asarray(img)
    assert img.size == (32, 32) and arr[16, 16, 0] > 200 and arr[16, 1, 0] < 30


def test_canny_marks_exactly_the_square_outline():
    edges = make_condition("canny", square_image(), 96, 64)
    assert edges.shape == (64, 96, 3) and set(np.unique(edges)) == {0, 255}
    on = edges[:, :, 0] > 0
    assert on[16:48, 31:33].any() and on[16:48, 63:65].any()  # left and right sides
    assert not on[:10].any() and not on[24:40, 40:56].any()  # flat regions have no edges


def test_color_map_is_blockwise_constant():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8))
    cmap = make_condition("color", img, 192, 128)
    assert cmap.shape == (128, 192, 3)
    assert len(np.unique(cmap.reshape(-1, 3), axis=0)) <= (128 // 64) * (192 // 64)
    assert (cmap[:64, :64] == cmap[0, 0]).all()


def test_inpaint_zeroes_the_mask():
    mask = np.zeros((64, 96), np.uint8)
    mask[:, :48] = 255
    cond = make_condition("inpaint", Image.new("RGB", (96, 64), (200, 100, 50)), 96, 64, mask=Image.fromarray(mask))
    assert (cond[:, :48] == 0).all() and (cond[:, 48:] == (200, 100, 50)).all()
    # LaMa-style masks, drawn from the seed: boxes (seed 3: 156 pixels) or strokes (seed 4: 877 pixels)
    m3, m4 = (random_mask(64, 64, np.random.default_rng(s)) for s in (3, 4))
    assert (m3.sum(), m4.sum()) == (156, 877)
    ys, xs = np.nonzero(m3)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (46, 57, 41, 53)


def test_condition_tensor_range_and_unknown_kind():
    t = condition_tensor(make_condition("raw", square_image(), 96, 64))
    assert t.shape == (1, 3, 64, 96) and t.min() >= 0 and t.max() == 1.0
    with pytest.raises(ValueError, match="unknown condition"):
        make_condition("depth-from-thin-air", square_image(), 8, 8)
