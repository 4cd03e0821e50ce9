"""Ten-crop test-time augmentation as a MONAI inferer for multi-label (sigmoid) classifiers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from monai_cxr_ssl.transforms.tencrop import ten_crop

__all__ = ["TenCropInferer", "ten_crop_probabilities"]


def ten_crop_probabilities(
    inputs: torch.Tensor,
    network: Callable[..., torch.Tensor],
    crop_size: int | tuple[int, int],
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """Mean sigmoid probability (B, K) of ``network`` over the ten crops of each image in ``inputs`` (B, C, H, W).

    All 10 * B crops go through ``network`` in one batched forward; ``args``/``kwargs`` are passed on to it.
    """
    crops = ten_crop(convert_to_tensor(inputs, track_meta=False), crop_size)
    logits = network(crops.reshape(-1, *crops.shape[2:]), *args, **kwargs)
    return torch.sigmoid(logits).reshape(crops.shape[0], crops.shape[1], *logits.shape[1:]).mean(dim=0)


class TenCropInferer(Inferer):
    """Drop-in replacement for ``SimpleInferer`` that averages sigmoid probabilities over ten crops.

    Returns logits of the averaged probability, so a downstream ``Activationsd(sigmoid=True)`` yields the ten-crop
    mean probability.

    Args:
        crop_size: crop height and width (int for square crops).
        eps: probabilities are clamped to [eps, 1 - eps] before the logit so the output stays finite.
    """

    def __init__(self, crop_size: int | tuple[int, int], eps: float = 1e-6) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"TenCropInferer eps must be in (0, 0.5), got {eps}.")
        self.crop_size = crop_size
        self.eps = eps

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Return (B, K) logits of the ten-crop mean probability of ``network`` on ``inputs`` (B, C, H, W)."""
        probs = ten_crop_probabilities(inputs, network, self.crop_size, *args, **kwargs)
        return torch.logit(probs.clamp(self.eps, 1.0 - self.eps))
