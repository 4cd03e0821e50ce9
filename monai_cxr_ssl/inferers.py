"""Ten-crop test-time augmentation as a MONAI inferer: the mean class probability over the ten crops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import convert_to_tensor

from monai_cxr_ssl.probabilities import check_kind, probability_logits
from monai_cxr_ssl.probabilities import probabilities as class_probabilities
from monai_cxr_ssl.transforms.tencrop import ten_crop

__all__ = ["TenCropInferer", "ten_crop_probabilities"]


def ten_crop_probabilities(
    inputs: torch.Tensor,
    network: Callable[..., torch.Tensor],
    crop_size: int | tuple[int, int],
    *args: Any,
    probabilities: str = "sigmoid",
    **kwargs: Any,
) -> torch.Tensor:
    """Mean probability (B, K) of ``network`` over the ten crops of each image in ``inputs`` (B, C, H, W), its
    logits made probabilities as ``probabilities`` says (``monai_cxr_ssl.probabilities.KINDS``).

    All 10 * B crops go through ``network`` in one batched forward; ``args``/``kwargs`` are passed on to it.
    """
    crops = ten_crop(convert_to_tensor(inputs, track_meta=False), crop_size)
    logits = network(crops.reshape(-1, *crops.shape[2:]), *args, **kwargs)
    probs = class_probabilities(logits, probabilities)
    return probs.reshape(crops.shape[0], crops.shape[1], *probs.shape[1:]).mean(dim=0)


class TenCropInferer(Inferer):
    """Drop-in replacement for ``SimpleInferer`` that averages class probabilities over ten crops.

    Returns logits of the averaged probability (``probabilities.probability_logits``), so that the bundle's
    post-processing (``Activationsd`` with the same ``probability_layer``) yields the ten-crop mean probability.

    Args:
        crop_size: crop height and width (int for square crops).
        eps: probabilities are clamped to [eps, 1 - eps] before the logit so the output stays finite.
        probabilities: how logits become class probabilities (``monai_cxr_ssl.probabilities.KINDS``), the
            bundle setting of the same name.
    """

    def __init__(self, crop_size: int | tuple[int, int], eps: float = 1e-6, probabilities: str = "sigmoid") -> None:
        if not 0.0 < eps < 0.5:
            raise ValueError(f"TenCropInferer eps must be in (0, 0.5), got {eps}.")
        self.crop_size = crop_size
        self.eps = eps
        self.probabilities = check_kind(probabilities)

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Return (B, K) logits of the ten-crop mean probability of ``network`` on ``inputs`` (B, C, H, W)."""
        probs = ten_crop_probabilities(inputs, network, self.crop_size, *args,
                                       probabilities=self.probabilities, **kwargs)
        return probability_logits(probs, self.probabilities, self.eps)
