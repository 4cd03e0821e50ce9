"""Class probabilities from a classifier's logits, in one place.

Findings are independent by default: one sigmoid per class, for multi-label and binary tasks. A method whose classes
are mutually exclusive (one per image) declares it with the bundle setting ``exclusive_classes: true``, and every
consumer turns logits into probabilities with a softmax over the classes instead: the ten-crop inferer, the
post-processing (MONAI's ``Activationsd`` with ``sigmoid``/``softmax`` chosen from the same setting, which computes
the same as :func:`probabilities` on each decollated item), the mean teacher's targets and the exported network
(:func:`probability_layer`), whose probabilities the reports, the pseudo-label files and the deploy app read.
"""

from __future__ import annotations

import torch

__all__ = ["probabilities", "probability_logits", "probability_layer"]


def probabilities(logits: torch.Tensor, exclusive_classes: bool = False) -> torch.Tensor:
    """Per-class probabilities of ``logits`` (classes on the last dimension): a sigmoid each, or, for mutually
    exclusive classes, a softmax over them."""
    return torch.softmax(logits, dim=-1) if exclusive_classes else torch.sigmoid(logits)


def probability_logits(probs: torch.Tensor, exclusive_classes: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """Logits whose :func:`probabilities` are ``probs`` (up to the clamp): ``logit(p)`` for independent classes,
    ``log(p)`` for exclusive ones (``softmax(log p) = p`` when the ``p`` sum to 1). Probabilities are clamped to
    ``[eps, 1 − eps]`` first so that the logits stay finite."""
    clamped = probs.clamp(eps, 1.0 - eps)
    return torch.log(clamped) if exclusive_classes else torch.logit(clamped)


def probability_layer(exclusive_classes: bool = False) -> torch.nn.Module:
    """The layer that ends a network returning :func:`probabilities` of its (B, K) logits (scriptable)."""
    return torch.nn.Softmax(dim=-1) if exclusive_classes else torch.nn.Sigmoid()
