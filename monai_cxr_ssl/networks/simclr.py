"""The SimCLR network: the classifier's DenseNet121 encoder and a projection head."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from monai_cxr_ssl.networks.densenet import CXRDenseNet121

__all__ = ["SimCLRNetwork"]


class SimCLRNetwork(CXRDenseNet121):
    """``CXRDenseNet121``'s encoder (its 1024-d pooled features) followed by SimCLR's projection head, 1024 → 1024 →
    ReLU → 128: the embeddings the contrastive loss compares.

    The encoder's keys are the classifier's (``features.*``), so ``networks.load_encoder`` initialises any stage's
    classifier from this network's checkpoint as it is; the projection head (``projection.*``) is left behind, and
    the classifier's output layer is not made.

    Args:
        in_channels: image channels (1 for grey chest X-rays).
        hidden_dim, out_dim: the projection head's hidden and output sizes (seed 003: 1024 and 128).
        pretrained_weights, encoder_init: as ``CXRDenseNet121``'s (local ImageNet weights; an encoder to start from).
        kwargs: further ``CXRDenseNet121`` arguments.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden_dim: int = 1024,
        out_dim: int = 128,
        pretrained_weights: str | os.PathLike | None = None,
        encoder_init: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes=1, in_channels=in_channels, pretrained_weights=pretrained_weights,
                         encoder_init=encoder_init, **kwargs)
        features = self.class_layers.out.in_features
        del self.class_layers.out  # no classifier: the projection head takes the pooled features
        self.projection = nn.Sequential(nn.Linear(features, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.pooled_features(x))
