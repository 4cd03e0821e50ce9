"""Parameter-free layers that end a network (``monai_cxr_ssl.probabilities.probability_layer``)."""

from __future__ import annotations

import torch

__all__ = ["SoftmaxDropLast"]


class SoftmaxDropLast(torch.nn.Module):
    """The softmax over every logit but the last: the class probabilities of a real image under a semi-supervised
    GAN's K + 1 logits, whose last is the generated class (scriptable)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits[..., :-1], dim=-1)
