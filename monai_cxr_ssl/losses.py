"""Losses for training on partial labels and for distillation from a teacher's soft targets."""

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


class BernoulliKLDivLoss(torch.nn.Module):
    """KL(target ‖ student) between independent Bernoulli distributions, one per sigmoid output.

    The mean-teacher consistency term with AALS: ``target`` holds the teacher's (sharpened) probabilities,
    ``logits`` the student's. Summed over classes, averaged over the batch; computed from log-sigmoids so
    that confident students do not overflow, with ``0·log 0 = 0`` for targets at exactly 0 or 1.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
        entropy_terms = torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target)
        kl = entropy_terms - target * log_q - (1 - target) * log_not_q
        return kl.reshape(len(kl), -1).sum(dim=1).mean()
