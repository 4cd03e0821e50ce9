"""AUROC reports: per-class and mean AUROC, ROC-curve figures, the metrics JSON and the predictions; operating
points (sensitivity and specificity at a threshold chosen on validation data)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import auc, roc_curve

from monai_cxr_ssl.metrics import per_class_auroc
from monai_cxr_ssl.utils import atomic_write, write_json

logger = logging.getLogger("monai_cxr_ssl")


def auroc_report(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-class AUROC and their mean for (N, K) binary ``labels`` and predicted ``probs``.

    A class whose labels hold a single value has no defined AUROC: it is reported as ``None`` and left out of the
    mean. The report names the classes the mean covers (``classes_covered``) and those left out
    (``classes_left_out``), and counts the ``positives`` per class (an AUROC on few positives is uncertain). For
    mutually exclusive classes (two or more, every label one-hot) it adds the ``accuracy`` of the most probable
    class; None otherwise.
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    if labels.shape != probs.shape or labels.shape[1] != len(class_names):
        raise ValueError(
            f"labels {labels.shape}, probabilities {probs.shape} and {len(class_names)} class names do not match."
        )
    per_class = dict(zip(class_names, per_class_auroc(labels, probs), strict=True))
    covered = [name for name, value in per_class.items() if value is not None]
    left_out = [name for name, value in per_class.items() if value is None]
    if left_out:
        logger.warning("mean AUROC over %s; left out, AUROC undefined (their labels hold a single value on these %d "
                       "images): %s.", ", ".join(covered) or "no class", len(labels), ", ".join(left_out))
    exclusive = labels.shape[1] > 1 and len(labels) > 0 and bool(np.all(labels.sum(axis=1) == 1))
    return {
        "auroc": per_class,
        "mean_auroc": float(np.mean([per_class[name] for name in covered])) if covered else None,
        "classes_covered": covered,
        "classes_left_out": left_out,
        "num_images": int(len(labels)),
        "positives": {name: int(labels[:, k].sum()) for k, name in enumerate(class_names)},
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels.argmax(axis=1))) if exclusive else None,
    }


def plot_roc_curves(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | os.PathLike, title: str = ""
) -> None:
    """Draw one ROC curve per class (with its AUROC in the legend) into a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.asarray(labels).reshape(len(labels), -1)
    probs = np.asarray(probs).reshape(len(probs), -1)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    for k, name in enumerate(class_names):
        if len(np.unique(labels[:, k])) < 2:
            continue
        fpr, tpr, _ = roc_curve(labels[:, k], probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")  # the curve's area: no second sort
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def youden_threshold(labels: np.ndarray, probs: np.ndarray) -> float:
    """The probability threshold that maximises Youden's J (sensitivity + specificity − 1) for one class."""
    labels, probs = np.asarray(labels, dtype=np.float64).ravel(), np.asarray(probs, dtype=np.float64).ravel()
    if len(np.unique(labels)) < 2:
        raise ValueError("a Youden threshold needs positive and negative images; these labels hold one class only.")
    fpr, tpr, thresholds = roc_curve(labels, probs)
    return float(min(thresholds[int(np.argmax(tpr - fpr))], 1.0))


def operating_point(
    val_labels: np.ndarray, val_probs: np.ndarray, test_labels: np.ndarray, test_probs: np.ndarray
) -> dict[str, float]:
    """Sensitivity and specificity on test data at the threshold that maximises Youden's J (sensitivity +
    specificity − 1) on validation data, for one class (1-D arrays or one column)."""
    val_labels, val_probs, test_labels, test_probs = (np.asarray(a, dtype=np.float64).ravel() for a in
                                                      (val_labels, val_probs, test_labels, test_probs))
    if len(np.unique(val_labels)) < 2 or len(np.unique(test_labels)) < 2:
        raise ValueError("an operating point needs positive and negative images in both validation and test data.")
    threshold = youden_threshold(val_labels, val_probs)
    predicted = test_probs >= threshold
    positive = test_labels > 0
    return {
        "threshold": threshold,
        "sensitivity": float(predicted[positive].mean()),
        "specificity": float((~predicted[~positive]).mean()),
    }


def write_report(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], output_dir: str | os.PathLike, prefix: str
) -> dict:
    """Compute the AUROC report and write ``<prefix>_metrics.json``, ``<prefix>_roc.png`` and the labels and
    probabilities (``<prefix>_predictions.npz``, for operating points and comparisons) into ``output_dir``."""
    report = auroc_report(labels, probs, class_names)
    with atomic_write(os.path.join(output_dir, f"{prefix}_predictions.npz"), "wb") as f:
        np.savez(f, labels=np.asarray(labels, dtype=np.float32), probs=np.asarray(probs, dtype=np.float32),
                 class_names=np.asarray(class_names))
    write_json(os.path.join(output_dir, f"{prefix}_metrics.json"), report)
    plot_roc_curves(labels, probs, class_names, os.path.join(output_dir, f"{prefix}_roc.png"), title=prefix)
    return report
