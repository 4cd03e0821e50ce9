"""Adaptive Asymmetric Label Sharpening (AALS, Wang et al.): sharpen a teacher's probabilities into soft targets.

``S(y) = expit(a·logit(y) + (1 − a)·logit(t))`` with ``a = a0 − (a0 − 1)·y_max`` and target ``max(S(y), y)``.
``t`` is a fixed point of ``S``; for ``a > 1`` values above ``t`` move up and values below it would move down,
which the ``max`` prevents, so the sharpening is asymmetric: with ``t < 0.5`` a teacher's hesitant positives
(``t < y < 0.5``) are raised, which counters the low sensitivity of a teacher trained on few positives. ``a``
falls to 1 (no sharpening) as ``y_max`` approaches 1: confident predictions are left as they are.

``y_max`` is the teacher's maximum probability for the finding in the image. For a classifier with one sigmoid
output per class that is the class probability itself (the default, ``per_image=False``); ``per_image=True``
takes the maximum over the classes (last dimension) instead, one strength per image.
"""

from __future__ import annotations

import torch

__all__ = ["aals", "check_aals_parameters", "sharpening_strength"]


def check_aals_parameters(t: float, a0: float) -> None:
    """Raise ``ValueError`` unless 0 < t < 1 and a0 >= 1."""
    if not 0.0 < t < 1.0:
        raise ValueError(f"AALS centre t must be in (0, 1), got {t}.")
    if not a0 >= 1.0:
        raise ValueError(f"AALS strength a0 must be >= 1 (1 = no sharpening), got {a0}.")


def sharpening_strength(y_max: torch.Tensor, a0: float = 4.0) -> torch.Tensor:
    """``a = a0 − (a0 − 1)·y_max``: ``a0`` for an unsure teacher (``y_max`` = 0), 1 for a certain one."""
    return a0 - (a0 - 1.0) * y_max


def aals(
    probs: torch.Tensor, t: float = 0.4, a0: float = 4.0, per_image: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """AALS targets ``max(S(y), y)`` for probabilities ``probs`` of any shape (see the module docstring).

    Args:
        probs: teacher probabilities in [0, 1].
        t: the centre, in (0, 1); the paper's best is 0.4.
        a0: the strength for ``y_max`` = 0, >= 1; 1 turns sharpening off; the paper's best is 4.
        per_image: take ``y_max`` over the last dimension (classes) instead of per class.
        eps: logits are taken of probabilities clamped to [eps, 1 − eps], so 0 and 1 give finite values.
    """
    check_aals_parameters(t, a0)
    probs = torch.as_tensor(probs)
    if a0 == 1.0:  # a = 1 everywhere: S is the identity, returned exactly rather than through logit/expit
        return probs.clone()
    y_max = probs.amax(dim=-1, keepdim=True) if per_image and probs.ndim > 0 else probs
    a = sharpening_strength(y_max, a0)
    centre = torch.logit(torch.tensor(t, dtype=probs.dtype, device=probs.device))
    sharpened = torch.sigmoid(a * torch.logit(probs, eps=eps) + (1.0 - a) * centre)
    # For a >= 1, S(y) >= y exactly when y >= t: below t the max is y itself, kept exact (also at y = 0).
    return torch.where(probs > t, torch.maximum(sharpened, probs), probs)
