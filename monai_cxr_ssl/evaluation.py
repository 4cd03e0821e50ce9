"""AUROC reports: per-class and mean AUROC, ROC-curve figures and the metrics JSON."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import auc, roc_auc_score, roc_curve

from monai_cxr_ssl.utils import atomic_write, write_json

logger = logging.getLogger("monai_cxr_ssl")


def auroc_report(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-class AUROC and their mean for (N, K) binary ``labels`` and predicted ``probs``.

    A class whose labels hold a single value has no defined AUROC: it is reported as ``None``
    and left out of the mean, with a warning.
    """
    labels = np.asarray(labels, dtype=np.float64).reshape(len(labels), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(probs), -1)
    if labels.shape != probs.shape or labels.shape[1] != len(class_names):
        raise ValueError(
            f"labels {labels.shape}, probabilities {probs.shape} and {len(class_names)} class names do not match."
        )
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        if len(np.unique(labels[:, k])) < 2:
            logger.warning("AUROC of class %r is undefined: its labels hold a single value.", name)
            per_class[name] = None
        else:
            per_class[name] = float(roc_auc_score(labels[:, k], probs[:, k]))
    defined = [v for v in per_class.values() if v is not None]
    return {
        "auroc": per_class,
        "mean_auroc": float(np.mean(defined)) if defined else None,
        "num_images": int(len(labels)),
        "positives": {name: int(labels[:, k].sum()) for k, name in enumerate(class_names)},
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


def write_report(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str], output_dir: str | os.PathLike, prefix: str
) -> dict:
    """Compute the AUROC report and write ``<prefix>_metrics.json`` and ``<prefix>_roc.png`` into ``output_dir``."""
    report = auroc_report(labels, probs, class_names)
    write_json(os.path.join(output_dir, f"{prefix}_metrics.json"), report)
    plot_roc_curves(labels, probs, class_names, os.path.join(output_dir, f"{prefix}_roc.png"), title=prefix)
    return report
