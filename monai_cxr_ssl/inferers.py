"""Ten-crop test-time augmentation as a MONAI inferer: the mean class probability over the ten crops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from monai_cxr_ssl.probabilities import probabilities, probability_logits
from monai_cxr_ssl.transforms.tencrop import ten_crop

__all__ = ["TenCropInferer", "ten_crop_probabilities"]


def ten_crop_probabilities(
    inputs: torch.Tensor,
    network: Callable[..., torch.Tensor],
    crop_size: int | tuple[int, int],
    *args: Any,
    exclusive_classes: bool = False,
    **kwargs: Any,
) -> torch.Tensor:
    """Mean probability (B, K) of ``network`` over the ten crops of each image in ``inputs`` (B, C, H, W): one
    sigmoid per class, or a softmax over exclusive classes (``monai_cxr_ssl.probabilities``).

    All 10 * B crops go through ``network`` in one batched forward; ``args``/``kwargs`` are passed on to it.
    """
    crops = ten_crop(convert_to_tensor(inputs, track_meta=False), crop_size)
    logits = network(crops.reshape(-1, *crops.shape[2:]), *args, **kwargs)
    probs = probabilities(logits, exclusive_classes)
    return probs.reshape(crops.shape[0], crops.shape[1], *logits.shape[1:]).mean(dim=0)


class TenCropInferer(Inferer):
    """Drop-in replacement for ``SimpleInferer`` that averages class probabilities over ten crops.

    Returns logits of the averaged probability (``probabilities.probability_logits``), so that the bundle's
    post-processing (``Activationsd`` with the same ``exclusive_classes``) yields the ten-crop mean probability.

    Args:
        crop_size: crop height and width (int for square crops).
        eps: probabilities are clamped to [eps, 1 - eps] before the logit so the output stays finite.
        exclusive_classes: average softmax probabilities over mutually exclusive classes instead of sigmoids.
    """

    def __init__(self, crop_size: int | tuple[int, int], eps: float = 1e-6, exclusive_classes: bool = False) -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"TenCropInferer eps must be in (0, 0.5), got {eps}.")
        self.crop_size = crop_size
        self.eps = eps
        self.exclusive_classes = exclusive_classes

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Return (B, K) logits of the ten-crop mean probability of ``network`` on ``inputs`` (B, C, H, W)."""
        probs = ten_crop_probabilities(inputs, network, self.crop_size, *args,
                                       exclusive_classes=self.exclusive_classes, **kwargs)
        return probability_logits(probs, self.exclusive_classes, self.eps)
