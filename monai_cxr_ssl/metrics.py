"""Mean AUROC over the classes whose AUROC is defined, as an ignite metric for model selection.

MONAI's ``ROCAUC`` (macro average) is NaN as soon as one class has no positive (or no negative) among the
validation images, which is common for rare findings in small multi-label splits; ignite's best-model tracking then
never improves after the first epoch. ``MeanDefinedAUROC`` averages over the classes that have both labels instead,
and ``auroc_classes`` names those classes once, before training, from the validation labels (they are fixed, so the
classes the mean covers are the same every epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import EpochMetric
from sklearn.metrics import roc_auc_score

from monai_cxr_ssl import distributed

__all__ = ["MeanDefinedAUROC", "auroc_classes", "defined_classes", "per_class_auroc"]

logger = logging.getLogger("monai_cxr_ssl")


def _as_2d(a: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.astype(np.float64).reshape(len(a), -1)


def defined_classes(labels: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    """(C,) bool: which columns of (N, C) (or (N,)) 0/1 ``labels`` hold both a positive and a negative."""
    labels = _as_2d(labels) > 0
    if len(labels) == 0:
        return np.zeros(labels.shape[1], dtype=bool)
    return labels.any(axis=0) & ~labels.all(axis=0)


def per_class_auroc(labels: np.ndarray | torch.Tensor, probs: np.ndarray | torch.Tensor) -> list[float | None]:
    """Per-class AUROC (scikit-learn) of (N, C) ``labels`` and ``probs``; None where a class's labels hold one value."""
    labels, probs = _as_2d(labels), _as_2d(probs)
    if labels.shape != probs.shape:
        raise ValueError(f"labels {labels.shape} and probabilities {probs.shape} do not match.")
    defined = defined_classes(labels)
    return [float(roc_auc_score(labels[:, k], probs[:, k])) if defined[k] else None for k in range(labels.shape[1])]


def auroc_classes(items: Sequence[dict], class_names: Sequence[str], part: str = "validation",
                  metric: str = "val_auroc") -> list[str]:
    """The classes whose AUROC is defined on the datalist ``items`` (the ``part`` of a split), i.e. the classes the
    mean AUROC ``metric`` covers; logs the classes left out once, and raises when no class is defined.

    Call it when the config is built: the validation labels are fixed, so this is known before training.
    """
    names = list(class_names)
    labels = np.asarray([it["label"] for it in items], dtype=np.float64).reshape(len(items), len(names))
    defined = defined_classes(labels)
    positives = (labels > 0).sum(axis=0)
    left_out = [f"{n} ({int(p)} positive{'s' if p != 1 else ''})" for n, p, d in zip(names, positives, defined,
                                                                                        strict=True) if not d]
    if not defined.any():
        raise ValueError(
            f"{metric} is undefined: none of the classes {names} has both positive and negative images among the "
            f"{len(items)} {part} images ({', '.join(left_out)}); use a larger val_fraction, another seed, or "
            "`classes` to select classes that occur."
        )
    covered = [n for n, d in zip(names, defined, strict=True) if d]
    if left_out:
        logger.warning(
            "%s is the mean over %d of %d classes (%s); left out, AUROC undefined on the %d %s images: %s.",
            metric, len(covered), len(names), ", ".join(covered), len(items), part, ", ".join(left_out),
        )
    return covered


class MeanDefinedAUROC(EpochMetric):
    """Mean AUROC over the classes that have both a positive and a negative among the images seen in an epoch.

    A drop-in replacement for MONAI's ``ROCAUC`` handler as a validation key metric: ``output_transform`` maps the
    engine output to ``(probabilities, labels)``, each a (B, C) tensor or a list of (C,) tensors (decollated
    MONAI output, e.g. ``monai.handlers.from_engine(["pred", "label"])``). Undefined classes are left out instead of
    turning the mean into NaN; ``covered`` lists the classes of the latest ``compute`` (``class_names`` names them).
    Raises ``ValueError`` when no class is defined.
    """

    def __init__(
        self,
        output_transform: Callable = lambda x: x,
        class_names: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self.covered: list[str] = []
        super().__init__(self._mean, output_transform=output_transform, check_compute_fn=False, device=device)

    @staticmethod
    def _stack(values: torch.Tensor | Sequence) -> torch.Tensor:
        if isinstance(values, torch.Tensor):
            tensor = values
        else:
            tensor = torch.stack([torch.as_tensor(v) for v in values])
        return tensor.detach().float().reshape(len(tensor), -1)

    def compute(self) -> float:
        """The mean over this epoch's pairs of every rank: ignite's ``EpochMetric`` gathers only equal-sized shares,
        and the validation loaders split without padding (duplicates would bias the AUROC)."""
        if not self._predictions:
            probs = labels = torch.zeros(0)
        else:
            probs, labels = torch.cat(self._predictions), torch.cat(self._targets)
        if distributed.is_distributed():
            k = probs.shape[1] if probs.ndim > 1 else len(self.class_names or [])
            pairs = distributed.gather_in_order(torch.cat([probs.reshape(-1, k), labels.reshape(-1, k)], 1).numpy())
            probs, labels = torch.as_tensor(pairs[:, :k]), torch.as_tensor(pairs[:, k:])
        if len(probs) == 0:
            raise NotComputableError("MeanDefinedAUROC must have at least one example before it can be computed.")
        return self._mean(probs, labels)

    def update(self, output: tuple) -> None:
        probs, labels = output
        super().update((self._stack(probs), self._stack(labels)))

    def _mean(self, probs: torch.Tensor, labels: torch.Tensor) -> float:
        values = per_class_auroc(labels, probs)
        names = self.class_names or [f"class_{k}" for k in range(len(values))]
        self.covered = [n for n, v in zip(names, values, strict=True) if v is not None]
        if not self.covered:
            raise ValueError(
                f"mean AUROC is undefined: none of the classes {names} has both positive and negative images among "
                f"the {len(labels)} images evaluated."
            )
        return float(np.mean([v for v in values if v is not None]))
