"""Ten-crop test-time augmentation: four corner crops, the centre crop and their horizontal flips."""

from __future__ import annotations

import torch
from monai.utils import ensure_tuple_rep

__all__ = ["ten_crop"]


def ten_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop a (B, C, H, W) batch ten ways for test-time augmentation.

    Returns a (10, B, C, h, w) tensor ordered top-left, top-right, bottom-left, bottom-right, centre, followed by
    the horizontal flips of those five in the same order. The centre offset is ``int(round((H - h) / 2))`` as in
    torchvision. The crops are slices of the whole batch (no per-image loop), stacked into a new tensor.
    """
    if images.ndim != 4:
        raise ValueError(f"ten_crop expects a (B, C, H, W) batch, got shape {tuple(images.shape)}.")
    crop_h, crop_w = (int(s) for s in ensure_tuple_rep(size, 2))
    height, width = images.shape[-2:]
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(
            f"ten_crop size {(crop_h, crop_w)} must be positive and fit in the image size {(height, width)}; "
            "lower the crop size or resize the images first."
        )
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    bottom, right = height - crop_h, width - crop_w
    five = torch.stack(
        [
            images[..., :crop_h, :crop_w],
            images[..., :crop_h, right:],
            images[..., bottom:, :crop_w],
            images[..., bottom:, right:],
            images[..., top : top + crop_h, left : left + crop_w],
        ]
    )
    return torch.cat([five, five.flip(-1)])
