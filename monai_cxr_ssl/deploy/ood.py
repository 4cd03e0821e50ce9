"""Out-of-distribution check: Mahalanobis distance of an image's pooled DenseNet features from the training images'.

``monai-cxr-ssl export`` fits the mean and a Ledoit-Wolf (shrunk) covariance of the 1024-d pooled features
(``CXRDenseNet121.pooled_features``) of the centre crop of up to ``max_images`` training images, and sets the
threshold so that ``quantile`` (99%) of up to ``max_images`` validation images pass. The statistics travel inside the
TorchScript file as the extra file ``ood_stats.npz``; the threshold and counts are in the metadata (``cxr_ssl.ood``).
The deploy app computes the same features of the same crop and withholds findings above the threshold. Shrinkage
matters: with a few hundred images the sample covariance of 1024 features is singular.

Needs no MONAI Deploy SDK: export imports it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import CenterSpatialCrop, Resize
from sklearn.covariance import LedoitWolf

from monai_cxr_ssl.data.readers import read_cxr

__all__ = ["OOD_STATS_FILE", "OODStats", "centre_crop", "image_features", "fit_ood"]

OOD_STATS_FILE = "ood_stats.npz"
QUANTILE = 0.99
BATCH_SIZE = 16


def centre_crop(image: np.ndarray | torch.Tensor, image_size: int, crop_size: int) -> torch.Tensor:
    """The bundle's preprocessing of one ``(H, W)`` image in [0, 1]: area resize to ``image_size``, centre crop to
    ``crop_size``; returns ``(1, crop, crop)``."""
    resized = Resize((image_size, image_size), mode="area")(torch.as_tensor(image, dtype=torch.float32)[None])
    return torch.as_tensor(CenterSpatialCrop((crop_size, crop_size))(resized))


def image_features(
    model: torch.nn.Module, paths: Sequence[str | os.PathLike], image_size: int, crop_size: int
) -> np.ndarray:
    """``(N, 1024)`` pooled features of the centre crops of the images at ``paths`` (read with ``read_cxr``), on the
    model's device."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(paths), BATCH_SIZE):
        batch = torch.stack([centre_crop(read_cxr(p), image_size, crop_size) for p in paths[start:start + BATCH_SIZE]])
        with torch.inference_mode():
            out.append(model.pooled_features(batch.to(device)).double().cpu().numpy())
    return np.concatenate(out)


class OODStats:
    """Mean, precision (inverse shrunk covariance) and distance threshold of the training features."""

    def __init__(self, mean: np.ndarray, precision: np.ndarray, threshold: float) -> None:
        self.mean, self.precision, self.threshold = np.asarray(mean), np.asarray(precision), float(threshold)

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (``(N, D)``) from the training mean."""
        centred = np.atleast_2d(features).astype(np.float64) - self.mean
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", centred, self.precision.astype(np.float64), centred), 0))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, precision=self.precision.astype(np.float32), threshold=self.threshold)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> OODStats:
        with np.load(io.BytesIO(data)) as stats:
            return cls(stats["mean"], stats["precision"], float(stats["threshold"]))


def fit_ood(train: np.ndarray, validation: np.ndarray, quantile: float = QUANTILE) -> tuple[OODStats, np.ndarray]:
    """Fit the statistics on ``train`` features; the threshold is the ``quantile`` of the ``validation`` distances
    (``method="higher"``, so at least that share passes). Returns the statistics and the validation distances."""
    if len(train) < 2 or len(validation) < 1:
        raise ValueError(
            f"the out-of-distribution statistics need at least 2 training and 1 validation image, got {len(train)} "
            f"and {len(validation)}.")
    fitted = LedoitWolf().fit(train)
    stats = OODStats(fitted.location_, fitted.precision_.astype(np.float32), 0.0)  # as stored
    distances = stats.distance(validation)
    stats.threshold = float(np.quantile(distances, quantile, method="higher"))
    return stats, distances
