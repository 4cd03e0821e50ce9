"""Ignite handler that applies the balanced confidence filter to a finished pseudo-label file."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_cxr_ssl import distributed
from monai_cxr_ssl.filtering import (
    QUOTA_PREVALENCES,
    balanced_filter,
    class_proportions,
    filtered_datalist,
    flip_rate,
)
from monai_cxr_ssl.pseudo_labels import file_sha256, read_pseudo_labels, write_filtered_datalist
from monai_cxr_ssl.sharpening import aals, check_aals_parameters

SHARPENINGS = (None, "aals")

logger = logging.getLogger("monai_cxr_ssl")


class BalancedFilter:
    """Keeps κ·|U| of the teacher's pseudo-labels in the labeled set's class proportions and writes the
    student's datalist to ``output_file``.

    Attach it to the pseudo-label evaluator after ``PseudoLabelWriter`` (it reads that handler's file at
    ``EPOCH_COMPLETED``) and before ``MLFlowHandler``: it adds ``filter_kept`` and, per class,
    ``filter_kept_positive_<c>`` / ``filter_kept_negative_<c>``, the positive quota ``filter_quota_positive_<c>``
    beside what it rests on (``filter_labeled_prevalence_<c>``, ``filter_predicted_prevalence_<c>`` = the teacher's
    mean probability, ``filter_predicted_positive_<c>`` = their rounded sum), and ``filter_flip_rate_<c>`` when the
    file holds the true labels, to ``engine.state.metrics``; with ``sharpening="aals"`` also
    ``aals_raised_fraction``, the share of kept pseudo-labels that sharpening raised.

    Args:
        pseudo_label_file: the file ``PseudoLabelWriter`` writes.
        split: the split (``prepare_split``): its ``unlabeled`` items are the images, its ``labeled`` items give
            the class proportions, its fingerprint must match the file's.
        output_file: the filtered datalist (JSON) for the student stage.
        keep_fraction: κ, the share of the unlabeled images kept, in (0, 1].
        soft: keep the probability as the label instead of 0/1.
        threshold: None ranks only (the paper); a probability restricts positives to ≥ it and negatives to < it.
        sharpening: None, or ``"aals"`` to give the kept images the AALS-sharpened probability
            (``monai_cxr_ssl.sharpening.aals``) as a soft label instead of 0/1 or the raw probability.
        aals_t: AALS centre t, in (0, 1).
        aals_a0: AALS strength a0, >= 1.
        quota_prevalence: ``"min"`` (default: the labeled set's proportion, capped by the positives the teacher
            predicts in U), ``"labeled"`` (the paper) or ``"predicted"``; see ``filtering.balanced_filter``.
    """

    def __init__(
        self,
        pseudo_label_file: str | os.PathLike,
        split: dict,
        output_file: str | os.PathLike,
        keep_fraction: float = 0.75,
        soft: bool = False,
        threshold: float | None = None,
        sharpening: str | None = None,
        aals_t: float = 0.4,
        aals_a0: float = 4.0,
        quota_prevalence: str = "min",
    ) -> None:
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction (κ) must be in (0, 1], got {keep_fraction}.")
        if sharpening not in SHARPENINGS:
            raise ValueError(f"sharpening must be one of {SHARPENINGS}, got {sharpening!r}.")
        if sharpening == "aals":
            check_aals_parameters(aals_t, aals_a0)  # now, rather than after pseudo-labelling
        if quota_prevalence not in QUOTA_PREVALENCES:
            raise ValueError(f"quota_prevalence must be one of {QUOTA_PREVALENCES}, got {quota_prevalence!r}.")
        self.pseudo_label_file = pseudo_label_file
        self.split = split
        self.output_file = output_file
        self.keep_fraction = keep_fraction
        self.soft = soft
        self.threshold = threshold
        self.sharpening = sharpening
        self.aals_t = aals_t
        self.aals_a0 = aals_a0
        self.quota_prevalence = quota_prevalence

    def attach(self, engine: Engine) -> None:
        """Attach on rank 0 only: under torchrun it reads the file rank 0's ``PseudoLabelWriter`` wrote."""
        if distributed.is_main_process():
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        header, ids, probs, labels = read_pseudo_labels(
            self.pseudo_label_file, expected_fingerprint=self.split["fingerprint"],
            expected_split_fingerprint=self.split["split_fingerprint"],
        )
        classes = header["classes"]
        unlabeled = {it["id"]: it for it in self.split["unlabeled"]}
        items = [unlabeled[i] for i in ids]
        result = balanced_filter(
            probs, class_proportions(self.split["labeled"]), self.keep_fraction, self.soft, self.threshold, classes,
            quota_prevalence=self.quota_prevalence,
        )
        raised = None
        if self.sharpening == "aals":
            sharpened = aals(torch.from_numpy(probs), self.aals_t, self.aals_a0).numpy()
            result.labels = np.where(result.mask, sharpened, 0.0).astype(np.float32)
            raised = float((sharpened > probs)[result.mask].mean()) if result.mask.any() else 0.0
        kept = filtered_datalist(items, result)
        provenance = {
            "dataset_fingerprint": self.split["fingerprint"],
            "split_fingerprint": self.split["split_fingerprint"],
            "pseudo_label_file": os.path.basename(self.pseudo_label_file),
            "pseudo_label_sha256": file_sha256(self.pseudo_label_file),
            "keep_fraction": self.keep_fraction,
            "soft": self.soft,
            "threshold": self.threshold,
            "quota_prevalence": self.quota_prevalence,
            "sharpening": self.sharpening,
            **({"aals_t": self.aals_t, "aals_a0": self.aals_a0} if self.sharpening else {}),
            "counts": result.counts,
            "shortfalls": result.shortfalls,
        }
        write_filtered_datalist(self.output_file, kept, provenance)

        metrics = engine.state.metrics
        metrics["filter_kept"] = len(kept)
        if raised is not None:
            metrics["aals_raised_fraction"] = raised
        flips = flip_rate(result, labels) if labels is not None else np.full(len(classes), np.nan)
        for name, flip in zip(classes, flips, strict=True):
            metrics[f"filter_kept_positive_{name}"] = result.counts[name]["kept_positive"]
            metrics[f"filter_kept_negative_{name}"] = result.counts[name]["kept_negative"]
            for key in ("quota_positive", "labeled_prevalence", "predicted_prevalence", "predicted_positive"):
                metrics[f"filter_{key}_{name}"] = result.counts[name][key]
            if not np.isnan(flip):
                metrics[f"filter_flip_rate_{name}"] = float(flip)
        logger.info(
            "balanced filter kept %d of %d unlabeled images (κ=%s, %s labels, quota_prevalence=%s): %s",
            len(kept), len(ids), self.keep_fraction, self.sharpening or ("soft" if self.soft else "hard"),
            self.quota_prevalence,
            "; ".join(
                f"{n}: +{c['kept_positive']} / -{c['kept_negative']} (positive quota {c['quota_positive']}: labeled "
                f"prevalence {c['labeled_prevalence']:.3f}, teacher predicts {c['predicted_positive']} positives, "
                f"prevalence {c['predicted_prevalence']:.3f})"
                for n, c in result.counts.items()
            ),
        )
