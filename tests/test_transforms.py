"""Perspective warp and ten-crop augmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose
from monai.utils import set_determinism

from monai_cxr_ssl.transforms import RandPerspective, RandPerspectived, ten_crop, warp_perspective

H, W = 12, 16
CORNERS = [[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]


@pytest.mark.parametrize("shape", [(1, H, W), (2, 3, H, W)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warp_keeps_shape_and_dtype(shape, dtype):
    img = torch.rand(shape, dtype=dtype)
    out = warp_perspective(img, CORNERS, [[1, 2], [W - 3, 0], [W - 1, H - 2], [2, H - 1]])
    assert out.shape == img.shape and out.dtype == dtype and out.device == img.device
    assert not torch.allclose(out, img)


def test_warp_identity_corners_is_identity():
    img = torch.rand(2, 3, H, W)
    torch.testing.assert_close(warp_perspective(img, CORNERS, CORNERS), img, atol=1e-5, rtol=0)


def test_warp_shift_moves_bright_pixel_by_two():
    img = torch.zeros(1, H, W)
    img[0, 5, 4] = 1.0
    out = warp_perspective(img, CORNERS, [[x + 2, y] for x, y in CORNERS])
    assert out[0].argmax().item() == 5 * W + 6
    torch.testing.assert_close(out[0, 5, 6], torch.tensor(1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_warp_sends_startpoint_to_endpoint():
    """A genuinely projective warp: the pixel at each start corner lands on its end corner."""
    end = [[3, 2], [W - 2, 1], [W - 4, H - 1], [1, H - 3]]
    for (sx, sy), (ex, ey) in zip(CORNERS, end, strict=True):
        img = torch.zeros(1, H, W)
        img[0, sy, sx] = 1.0
        out = warp_perspective(img, CORNERS, end)
        torch.testing.assert_close(out[0, ey, ex], torch.tensor(1.0), atol=1e-5, rtol=0)


def test_warp_rejects_degenerate_corners():
    with pytest.raises(ValueError, match="collinear"):
        warp_perspective(torch.rand(1, H, W), CORNERS, [[0, 0], [1, 1], [2, 2], [3, 3]])
    with pytest.raises(ValueError, match="4 \\(x, y\\) corners"):
        warp_perspective(torch.rand(1, H, W), CORNERS[:3], CORNERS[:3])


def test_zero_distortion_is_exact_identity():
    img = torch.rand(1, H, W)
    out = RandPerspective(distortion_scale=0.0, prob=1.0)(img)
    assert torch.equal(out, img)


def test_prob_zero_leaves_image_unchanged():
    img = torch.rand(1, H, W)
    assert torch.equal(RandPerspective(distortion_scale=0.9, prob=0.0)(img), img)


def test_random_corners_within_bounds():
    scale, height, width = 0.5, 40, 60
    dx, dy = int(scale * (width // 2)), int(scale * (height // 2))
    t = RandPerspective(distortion_scale=scale, prob=1.0).set_random_state(3)
    drawn = []
    for _ in range(50):
        t.randomize((height, width))
        (tlx, tly), (trx, try_), (brx, bry), (blx, bly) = t.endpoints
        assert t.startpoints == [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
        assert 0 <= tlx <= dx and 0 <= blx <= dx and width - 1 - dx <= trx <= width - 1 and width - 1 - dx <= brx
        assert 0 <= tly <= dy and 0 <= try_ <= dy and height - 1 - dy <= bry <= height - 1 and height - 1 - dy <= bly
        drawn.append(t.endpoints)
    assert len({str(e) for e in drawn}) > 40  # corners really vary


def test_seeded_determinism_and_numpy_input():
    img = np.random.default_rng(0).random((1, H, W), dtype=np.float32)
    a = RandPerspective(0.6, prob=1.0).set_random_state(7)(img)
    b = RandPerspective(0.6, prob=1.0).set_random_state(7)(img)
    c = RandPerspective(0.6, prob=1.0).set_random_state(8)(img)
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_distortion_scale():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="distortion_scale"):
            RandPerspective(distortion_scale=bad)
        with pytest.raises(ValueError, match="distortion_scale"):
            RandPerspectived(keys="image", distortion_scale=bad)


def test_dict_version_warps_keys_alike_and_is_seeded():
    img = torch.rand(1, H, W)
    data = {"image": img, "mask": img.numpy().copy(), "label": 1}
    t = RandPerspectived(keys=["image", "mask"], distortion_scale=0.7, prob=1.0, mode=["bilinear", "nearest"])
    out = t.set_random_state(0)(data)
    assert out["label"] == 1 and isinstance(out["mask"], torch.Tensor)
    assert not torch.allclose(out["image"], img)
    same_warp = warp_perspective(img, t.perspective.startpoints, t.perspective.endpoints, mode="nearest")
    torch.testing.assert_close(out["mask"].as_tensor(), same_warp)
    again = RandPerspectived(keys=["image", "mask"], distortion_scale=0.7, prob=1.0).set_random_state(0)(data)
    assert torch.equal(out["image"], again["image"])
    assert torch.equal(RandPerspectived(keys="image", prob=0.0)(data)["image"], img)


def test_dict_version_deterministic_under_set_determinism():
    data = [{"image": torch.rand(1, H, W)} for _ in range(3)]
    transform = Compose([RandPerspectived(keys="image", distortion_scale=0.8, prob=1.0)])

    def run(seed):
        set_determinism(seed)
        return torch.cat([b["image"] for b in DataLoader(Dataset(data, transform), batch_size=1)])

    try:
        first, second, other = run(0), run(0), run(1)
    finally:
        set_determinism(None)
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_ten_crop_matches_explicit_slices():
    b, c, height, width, h, w = 2, 3, 7, 9, 4, 5
    images = torch.arange(b * c * height * width, dtype=torch.float32).reshape(b, c, height, width)
    crops = ten_crop(images, (h, w))
    assert crops.shape == (10, b, c, h, w)
    top, left = round((height - h) / 2), round((width - w) / 2)  # 2 (banker's rounding of 1.5), 2
    expected = [
        images[:, :, :h, :w],
        images[:, :, :h, width - w :],
        images[:, :, height - h :, :w],
        images[:, :, height - h :, width - w :],
        images[:, :, top : top + h, left : left + w],
    ]
    expected += [e.flip(-1) for e in expected]
    for i, e in enumerate(expected):
        assert torch.equal(crops[i], e), f"crop {i}"
    assert torch.equal(crops[4, 1, 0, 0], images[1, 0, 2, 2:7])
    assert torch.equal(crops[5, 0, 0, 0], images[0, 0, 0, :w].flip(0))


def test_ten_crop_square_int_size_and_batch_independence():
    images = torch.rand(3, 1, 8, 8)
    crops = ten_crop(images, 6)
    assert crops.shape == (10, 3, 1, 6, 6)
    assert torch.equal(crops[:, 2], ten_crop(images[2:3], 6)[:, 0])


def test_ten_crop_too_large():
    with pytest.raises(ValueError, match=r"\(9, 4\).*\(8, 8\)"):
        ten_crop(torch.rand(1, 1, 8, 8), (9, 4))
    with pytest.raises(ValueError, match="B, C, H, W"):
        ten_crop(torch.rand(1, 8, 8), 4)
