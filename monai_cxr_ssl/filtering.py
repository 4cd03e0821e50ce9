"""Balanced filtering of a teacher's pseudo-labels (Martins & Silva, teacher-student pseudo-labelling).

The teacher predicts probabilities for the unlabeled set U; ``balanced_filter`` keeps K = κ·|U| of them, the most
confident ones, split between positives and negatives in the class proportions of the labeled set D: the highest
probabilities become positives, the lowest negatives. With patient-clustered multi-label data the labeled
proportion can be far above what U holds (one patient's 21 Edema images in D asked for 50 Edema pseudo-positives
where U held 1), so by default (``quota_prevalence="min"``) the positive quota is also capped by the number of
positives the teacher expects in U, the rounded sum of its probabilities. The ranking is the paper's rule
(``threshold=None``); with a threshold, only probabilities at or above it may become positives and only those below
it negatives, so a quota the teacher cannot fill on its side of the threshold is left short instead of taking
unconfident predictions.

Multi-label predictions (C > 1, the paper's suggested extension) are filtered per class independently, so the
result is a mask over (image, class) pairs: the student's loss must then be masked (binary cross-entropy only on
kept entries, e.g. ``(bce(logits, labels, reduction="none") * mask).sum() / mask.sum()``), and an image is used by
the student when any of its labels is kept (``filtered_datalist`` writes that mask as ``"label_mask"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "QUOTA_PREVALENCES", "FilterResult", "balanced_filter", "class_proportions", "filtered_datalist", "flip_rate",
]

logger = logging.getLogger("monai_cxr_ssl")

QUOTA_PREVALENCES = ("labeled", "predicted", "min")


@dataclass
class FilterResult:
    """Pseudo-labels kept by ``balanced_filter``.

    ``mask`` (N, C) marks the kept (image, class) pairs; ``positive`` (N, C) those kept as positives; ``labels``
    (N, C) holds 1/0 (hard) or the probability (soft) where kept and 0 elsewhere; ``counts`` maps each class name to
    its kept / quota / candidate counts, the prevalences behind the quota (``labeled_prevalence``,
    ``predicted_prevalence``: the mean teacher probability) and ``predicted_positive`` (their rounded sum);
    ``shortfalls`` describes the classes that had fewer candidates than their quota; ``threshold`` is the one used
    (None: ranking only).
    """

    mask: np.ndarray
    positive: np.ndarray
    labels: np.ndarray
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    shortfalls: list[str] = field(default_factory=list)
    threshold: float | None = None

    @property
    def kept_images(self) -> np.ndarray:
        """Indices of the images with at least one kept pseudo-label."""
        return np.flatnonzero(self.mask.any(axis=1))


def _to_numpy(x: np.ndarray | torch.Tensor | Sequence | float) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` smallest ``values``, ties going to the lower index; O(n) via ``np.partition``."""
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    if k >= len(values):
        return np.arange(len(values))
    kth = np.partition(values, k - 1)[k - 1]
    below = np.flatnonzero(values < kth)
    tied = np.flatnonzero(values == kth)[: k - len(below)]
    return np.concatenate([below, tied])


def balanced_filter(
    probs: np.ndarray | torch.Tensor,
    positive_fraction: float | Sequence[float] | np.ndarray | torch.Tensor,
    keep_fraction: float = 0.75,
    soft: bool = False,
    threshold: float | None = None,
    class_names: Sequence[str] | None = None,
    quota_prevalence: str = "min",
) -> FilterResult:
    """Keep the ``keep_fraction`` most confident pseudo-labels of each class, balanced as the labeled set.

    Args:
        probs: (N,) or (N, C) teacher probabilities for the unlabeled images.
        positive_fraction: prevalence of each class in the labeled set (a float, or (C,); see ``class_proportions``).
        keep_fraction: κ in (0, 1]; each class keeps K = round(κ·N) pseudo-labels, round(K·p) of them positive.
        soft: keep the probabilities themselves as labels instead of 1/0.
        threshold: None (default, the paper) ranks only: the ``K·p`` highest probabilities become positives and
            the ``K·(1-p)`` lowest of the rest negatives. A number restricts positives to probabilities ≥ it and
            negatives to those below it.
        class_names: names used in ``counts`` and messages (default ``class_0``, ``class_1``, ...).
        quota_prevalence: the prevalence behind the positive quota: ``"labeled"`` (the paper) round(K·p) with p from
            ``positive_fraction``; ``"predicted"`` round(K·q) with q the teacher's mean probability on U;
            ``"min"`` (default) the labeled quota capped by round(Σ probabilities), the positives the teacher
            expects in all of U. The negative quota is K minus the positive one.

    A class with fewer candidates than its quota keeps all of them and records a shortfall; the other side is
    not topped up, so a teacher biased towards one class cannot put more of that class in the kept set than its quota.
    Quotas are rounded half up; ties in probability go to the lower image index.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}.")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}.")
    if quota_prevalence not in QUOTA_PREVALENCES:
        raise ValueError(f"quota_prevalence must be one of {QUOTA_PREVALENCES}, got {quota_prevalence!r}.")
    p = _to_numpy(probs)
    if p.ndim not in (1, 2) or (p.ndim == 2 and p.shape[1] == 0):
        raise ValueError(f"probs must have shape (N,) or (N, C) with C >= 1, got {p.shape}.")
    p = p[:, None] if p.ndim == 1 else p
    n, num_classes = p.shape
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs must be probabilities in [0, 1] without NaN; apply a sigmoid to logits first.")
    frac = _to_numpy(positive_fraction).reshape(-1)
    if frac.size == 1:
        frac = np.repeat(frac, num_classes)
    if frac.shape != (num_classes,):
        raise ValueError(f"positive_fraction has {frac.size} values for {num_classes} classes in probs.")
    if np.isnan(frac).any() or (frac < 0).any() or (frac > 1).any():
        raise ValueError(f"positive_fraction must be in [0, 1], got {frac.tolist()}.")
    names = list(class_names) if class_names is not None else [f"class_{c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} classes in probs.")

    mask = np.zeros((n, num_classes), dtype=bool)
    positive = np.zeros((n, num_classes), dtype=bool)
    labels = np.zeros((n, num_classes), dtype=np.float32)
    counts: dict[str, dict[str, int]] = {}
    shortfalls: list[str] = []
    total = _round_half_up(keep_fraction * n)
    expected = p.sum(axis=0)  # positives the teacher expects among the unlabeled images
    for c, name in enumerate(names):
        predicted = expected[c] / n if n else 0.0
        quota_pos = {
            "labeled": _round_half_up(total * frac[c]),
            "predicted": _round_half_up(total * predicted),
            "min": min(_round_half_up(total * frac[c]), _round_half_up(expected[c])),
        }[quota_prevalence]
        quota_neg = total - quota_pos
        if threshold is None:
            pos = np.arange(n)
            kept_pos = _smallest(-p[:, c], quota_pos)
            rest = np.ones(n, dtype=bool)
            rest[kept_pos] = False
            neg = np.flatnonzero(rest)
        else:
            pos = np.flatnonzero(p[:, c] >= threshold)
            neg = np.flatnonzero(p[:, c] < threshold)
            kept_pos = pos[_smallest(-p[pos, c], quota_pos)]
        kept_neg = neg[_smallest(p[neg, c], quota_neg)]
        positive[kept_pos, c] = True
        mask[kept_pos, c] = True
        mask[kept_neg, c] = True
        if soft:
            labels[mask[:, c], c] = p[mask[:, c], c]
        else:
            labels[kept_pos, c] = 1.0
        counts[name] = {
            "kept_positive": len(kept_pos),
            "kept_negative": len(kept_neg),
            "quota_positive": quota_pos,
            "quota_negative": quota_neg,
            "candidates_positive": len(pos),
            "candidates_negative": len(neg),
            "labeled_prevalence": float(frac[c]),
            "predicted_prevalence": float(predicted),
            "predicted_positive": _round_half_up(expected[c]),
        }
        for side, cands, quota, rule in (("positive", pos, quota_pos, ">="), ("negative", neg, quota_neg, "<")):
            if len(cands) < quota:
                msg = (
                    f"class {name!r}: {len(cands)} {side} candidates (probability {rule} {threshold}) for a quota "
                    f"of {quota}; kept them all, the rest is not refilled. Lower keep_fraction or adjust threshold "
                    "(or null for ranking only) to keep the labeled proportions."
                )
                logger.warning(msg)
                shortfalls.append(msg)
    return FilterResult(mask, positive, labels, counts=counts, shortfalls=shortfalls, threshold=threshold)


def class_proportions(items: Sequence[dict]) -> np.ndarray:
    """(C,) prevalence of each class in a datalist: the mean of its items' ``label`` vectors."""
    if len(items) == 0:
        raise ValueError("class_proportions needs a non-empty datalist (the labeled set).")
    try:
        labels = np.asarray([it["label"] for it in items], dtype=np.float64)
    except ValueError as e:
        raise ValueError("the datalist's label vectors must all have the same length.") from e
    return labels.reshape(len(items), -1).mean(axis=0)


def flip_rate(result: FilterResult, true_labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """(C,) fraction of kept pseudo-labels whose hard label differs from the true 0/1 label; NaN if none kept."""
    truth = _to_numpy(true_labels)
    if truth.ndim == 1:
        truth = truth[:, None]
    if truth.shape != result.mask.shape:
        raise ValueError(f"true_labels shape {truth.shape} does not match the predictions {result.mask.shape}.")
    flipped = (result.positive != (truth >= 0.5)) & result.mask
    kept = result.mask.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(kept > 0, flipped.sum(axis=0) / kept, np.nan)


def filtered_datalist(items: Sequence[dict], result: FilterResult) -> list[dict]:
    """The unlabeled ``items`` with a kept pseudo-label, labelled by the filter.

    Each entry keeps ``image`` and ``id``; ``label`` is the pseudo-label vector and, for C > 1, ``label_mask``
    (0/1 floats) marks which of its labels were kept and so enter the student's loss.
    """
    if len(items) != len(result.mask):
        raise ValueError(f"the datalist has {len(items)} items but the filter saw {len(result.mask)} predictions.")
    multi = result.mask.shape[1] > 1
    out = []
    for i in result.kept_images:
        entry = {"image": items[i]["image"], "id": items[i]["id"], "label": result.labels[i].tolist()}
        if multi:
            entry["label_mask"] = result.mask[i].astype(np.float32).tolist()
        out.append(entry)
    return out
