"""Class probabilities from a classifier's logits, in one place.

How logits become class probabilities is a property of the method, the bundle setting ``probabilities``:

- ``sigmoid`` (the default): one sigmoid per class, for findings that may co-occur (multi-label and binary tasks);
- ``softmax``: a softmax over mutually exclusive classes (one per image);
- ``softmax_drop_last``: K + 1 logits whose last is the generated class of a semi-supervised GAN; the class
  probabilities of a real image are the softmax over the K real classes' logits (the generated class dropped).

Every consumer reads that setting: the ten-crop inferer, the post-processing (MONAI's ``Activationsd`` with
:func:`probability_layer` as its ``other`` function), the mean teacher's targets and the exported network, whose
probabilities the reports, the pseudo-label files and the deploy app read. A method with other probabilities than
the default sets it in its overlay. torch is imported where used: the settings checks (and the CLI's help) read
``KINDS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["KINDS", "check_kind", "num_logits", "probabilities", "probability_layer", "probability_logits"]

KINDS = {
    "sigmoid": "one sigmoid probability per class",
    "softmax": "softmax probabilities of mutually exclusive classes",
    "softmax_drop_last": "softmax probabilities of mutually exclusive classes, the generated class dropped",
}


def check_kind(kind: str) -> str:
    """``kind`` if it is one of ``KINDS``, else a ``ValueError`` naming them."""
    if kind not in KINDS:
        raise ValueError(f"probabilities must be one of {', '.join(KINDS)}; got {kind!r}.")
    return kind


def num_logits(num_classes: int, kind: str = "sigmoid") -> int:
    """The network's outputs for ``num_classes`` classes: one more for the generated class of ``softmax_drop_last``."""
    return num_classes + 1 if check_kind(kind) == "softmax_drop_last" else num_classes


def probabilities(logits: torch.Tensor, kind: str = "sigmoid") -> torch.Tensor:
    """Per-class probabilities of ``logits`` (classes on the last dimension) as ``kind`` says (``KINDS``)."""
    import torch

    if check_kind(kind) == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits[..., :-1] if kind == "softmax_drop_last" else logits, dim=-1)


def probability_logits(probs: torch.Tensor, kind: str = "sigmoid", eps: float = 1e-6) -> torch.Tensor:
    """Logits whose :func:`probabilities` are ``probs`` (up to the clamp): ``logit(p)`` for ``sigmoid``, ``log(p)``
    for ``softmax`` (``softmax(log p) = p`` when the ``p`` sum to 1), and ``log(p)`` then ``log(eps)`` for the
    generated class of ``softmax_drop_last``. Probabilities are clamped to ``[eps, 1 − eps]`` first so that the
    logits stay finite."""
    import math

    import torch

    clamped = probs.clamp(eps, 1.0 - eps)
    if check_kind(kind) == "sigmoid":
        return torch.logit(clamped)
    logits = torch.log(clamped)
    if kind == "softmax_drop_last":
        logits = torch.cat([logits, torch.full_like(logits[..., :1], math.log(eps))], dim=-1)
    return logits


def probability_layer(kind: str = "sigmoid") -> torch.nn.Module:
    """The layer that ends a network returning :func:`probabilities` of its logits (scriptable, no parameters); the
    post-processing applies it to each decollated item."""
    import torch

    from monai_cxr_ssl.networks.layers import SoftmaxDropLast

    layers = {"sigmoid": torch.nn.Sigmoid, "softmax": lambda: torch.nn.Softmax(dim=-1),
              "softmax_drop_last": SoftmaxDropLast}
    return layers[check_kind(kind)]()
