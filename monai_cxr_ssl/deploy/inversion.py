"""A grey scale that does not match its pixels: a radiograph whose PhotometricInterpretation is wrong for its pixel
data (MONOCHROME1 on pixels that were never inverted, or the reverse) reads as a negative image, and a negative
chest radiograph is still a plausible input to the model and to the out-of-distribution check.

On a chest radiograph shown as it should be (air dark), the mediastinum and the upper abdomen are brighter than
the lung fields; on a negative they are darker. ``inversion_score`` measures both contrasts in units of the image's
standard deviation; ``bench/inversion_check.py`` measures it on real images and their negatives
(``bench/results/inversion_check.json``), which set ``INVERTED_BELOW``.
"""

from __future__ import annotations

import numpy as np

INVERTED_BELOW = -0.3  # a score under this reads as a negative image


def inversion_score(image: np.ndarray) -> float:
    """(mediastinum − lungs) + (upper abdomen − lungs), in units of the image's standard deviation, for a frontal
    chest radiograph ``(H, W)`` as displayed (higher = brighter); positive when air is dark, negative on a
    negative image. Regions: lungs in rows 25–70 % and columns 15–32 % and 68–85 %, the mediastinum in columns
    42–58 % of those rows, the abdomen in the bottom 15 % of rows and columns 30–70 %."""
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    rows = slice(int(0.25 * h), int(0.7 * h))
    lungs = np.concatenate([img[rows, int(0.15 * w):int(0.32 * w)].ravel(),
                            img[rows, int(0.68 * w):int(0.85 * w)].ravel()]).mean()
    mediastinum = img[rows, int(0.42 * w):int(0.58 * w)].mean()
    abdomen = img[int(0.85 * h):, int(0.3 * w):int(0.7 * w)].mean()
    return float((mediastinum - lungs + abdomen - lungs) / (img.std() + 1e-12))


def looks_inverted(image: np.ndarray, photometric: str) -> str | None:
    """Why ``image`` (read with its ``photometric`` interpretation) looks like a negative, or None."""
    score = inversion_score(image)
    if score >= INVERTED_BELOW:
        return None
    return (f"the image reads as a negative (PhotometricInterpretation {photometric}, but its mediastinum and "
            f"abdomen are darker than its lung fields: grey-scale score {score:.2f} < {INVERTED_BELOW}); the "
            "PhotometricInterpretation likely does not match the pixel data: check the DICOM export")
