"""Weak image-level positive labels (e.g. mined from reports) for mean-teacher training with AALS.

The paper's setting: besides the labeled images, a set P of unlabeled images is known to be positive at image
level. Give P as either

- a CSV manifest with an image column (default ``image``) and a weak-label column (default ``weak_label``):
  for one class, ``1``/``0`` (also ``true``/``false``, ``yes``/``no``); for several classes, the positive class
  names separated by ``|`` (``Effusion|Mass``); empty means no weak label; or
- a list file (any other extension): one image per line, optionally followed by a tab and ``|``-separated class
  names (without them the image is weakly positive for every class); blank lines and ``#`` comments are skipped.

Images are named by their id in the split file (the path relative to the dataset folder) or by absolute path.
The unlabeled images that the file marks positive form P; AALS sharpens the teacher's predictions for their
weak-positive classes only. Without a file, every unlabeled image is used and sharpened (the general case).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from monai_cxr_ssl.data.datasets import _read_csv
from monai_cxr_ssl.data.splits import subsample

__all__ = ["load_weak_labels", "unlabeled_datalist"]

logger = logging.getLogger("monai_cxr_ssl")

_TRUE, _FALSE = {"1", "1.0", "true", "yes"}, {"", "0", "0.0", "false", "no"}


def _mask(value: str, classes: Sequence[str], where: str) -> list[float]:
    """The weak-positive mask (1.0 per positive class) that ``value`` names; ``where`` locates it in errors."""
    value = value.strip()
    if len(classes) == 1 and value.lower() in _TRUE | _FALSE:
        return [1.0 if value.lower() in _TRUE else 0.0]
    names = [name.strip() for name in value.split("|") if name.strip()]
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise ValueError(
            f"{where}: weak label {value!r} names unknown class(es) {unknown}; use 1/0 for a single class or "
            f"'|'-separated names from {list(classes)}."
        )
    return [1.0 if name in names else 0.0 for name in classes]


def load_weak_labels(
    path: str | os.PathLike, classes: Sequence[str], column: str = "weak_label", image_column: str = "image"
) -> dict[str, list[float]]:
    """Read a weak-label CSV manifest or list file (see the module docstring) into ``{image: mask}``, keeping
    only images with at least one weak-positive class."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weak-label file not found: {path} (set weak_labels to a CSV manifest or list file).")
    weak: dict[str, list[float]] = {}
    if path.suffix.lower() == ".csv":
        try:
            rows = _read_csv(path, [image_column, column])
        except ValueError as e:
            raise ValueError(f"{e} Set weak_label_column (and weak_label_image_column) to the manifest's columns.") \
                from None
        for line, row in enumerate(rows, start=2):
            weak[row[image_column]] = _mask(row[column], classes, f"{path}, line {line}")
    else:
        for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            image, _, names = text.rstrip("\n").partition("\t")
            weak[image.strip()] = _mask(names, classes, f"{path}, line {line}") if names.strip() else \
                [1.0] * len(classes)
    return {image: mask for image, mask in weak.items() if any(mask)}


def unlabeled_datalist(
    split: dict,
    weak_labels: str | os.PathLike | None = None,
    column: str = "weak_label",
    image_column: str = "image",
    max_unlabeled: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """The mean teacher's unlabeled datalist: all of ``split["unlabeled"]`` (capped at ``max_unlabeled``) when
    ``weak_labels`` is None, else the weak-positive set P, each item with its ``"sharpen"`` mask."""
    items = split["unlabeled"]
    if weak_labels is None:
        return subsample(items, max_unlabeled, seed)
    weak = load_weak_labels(weak_labels, split["classes"], column, image_column)
    positive = []
    for it in items:
        mask = weak.get(it["id"], weak.get(it["image"]))
        if mask is not None:
            positive.append({**it, "sharpen": mask})
    if not positive:
        raise ValueError(
            f"{weak_labels}: none of its {len(weak)} weak-positive image(s) is in the unlabeled split "
            f"({len(items)} images); name images by their id in the split file (path relative to the dataset "
            "folder, e.g. " + (repr(items[0]["id"]) if items else "'images/x.png'") + ") or by absolute path."
        )
    if len(positive) < len(weak):
        logger.info("weak labels: %d of %d weak-positive images are unlabeled (the rest are labeled or held out)",
                    len(positive), len(weak))
    return subsample(positive, max_unlabeled, seed)
