"""Losses for training on partial labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskedBCEWithLogitsLoss(torch.nn.Module):
    """Binary cross-entropy with logits that ignores targets set to NaN.

    Multi-label pseudo-labels are kept per (image, class): a student sees some classes of an image and
    not others. Encoding the dropped entries as NaN keeps the usual ``(pred, label)`` loss signature of
    MONAI's trainers. The mean is over the kept entries; with no NaN it equals ``BCEWithLogitsLoss``.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = ~torch.isnan(target)
        if kept.all():
            return F.binary_cross_entropy_with_logits(logits, target)
        if not kept.any():
            return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
        return F.binary_cross_entropy_with_logits(logits[kept], target[kept])
