"""The semi-supervised GAN's networks (seed 002, DCGAN-style): a generator from 100-d noise to grey images, and a
discriminator with K + 1 outputs (the K classes, then the generated class) whose pooled features feed the
generator's feature-matching loss, the out-of-distribution check and the deploy app as DenseNet121's do.

The discriminator's K + 1 logits are free; the trainer takes the K class logits relative to the last
(``real_class_logits``), which is the K + 1 formulation with the generated class's logit fixed at 0 and the same
softmax (``probabilities.KINDS["softmax_drop_last"]``), so the DenseNet121 discriminator is ``CXRDenseNet121``
itself and the exported models need no other layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from monai_cxr_ssl.probabilities import probability_layer

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "GENERATOR_SIZES", "check_generator_size", "gan_discriminator",
           "real_class_logits"]

GENERATOR_SIZES = (16, 32, 64, 128, 256)  # 4 x 4 doubled 2 to 6 times
DISCRIMINATORS = ("dcgan", "densenet121")


def check_generator_size(size: int) -> int:
    """``size`` if the generator can make images of it (``GENERATOR_SIZES``), else a ``ValueError`` saying what to
    set."""
    if size not in GENERATOR_SIZES:
        sizes = ", ".join(map(str, GENERATOR_SIZES))
        raise ValueError(f"crop_size={size}: the GAN's generator makes square images of {sizes} "
                         "pixels (4 x 4 doubled by each up-sampling convolution): set crop_size to one of them "
                         "(and image_size >= crop_size).")
    return size


def real_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """The K class logits of K + 1 discriminator outputs, relative to the generated class's (the last): the
    formulation with that logit fixed at 0, softmax unchanged."""
    return logits[:, :-1] - logits[:, -1:]


class DCGANGenerator(nn.Module):
    """Noise (B, ``latent_dim``) → a linear projection to a 4 x 4 map of ``base_channels·2^(n−1)`` channels (batch
    norm, ReLU), then n transposed convolutions, each doubling the size and halving the channels (batch norm, ReLU),
    to ``image_size`` (``GENERATOR_SIZES``); the last gives ``out_channels`` with tanh, mapped to [0, 1]: the range
    of the bundle's images."""

    def __init__(self, image_size: int = 64, latent_dim: int = 100, out_channels: int = 1, base_channels: int = 64
                 ) -> None:
        super().__init__()
        check_generator_size(image_size)
        self.latent_dim = latent_dim
        ups = int(math.log2(image_size // 4))
        widths = [base_channels * 2 ** i for i in reversed(range(ups))]  # e.g. 512 256 128 64 for 64 px
        self.project = nn.Sequential(nn.Linear(latent_dim, widths[0] * 16, bias=False),
                                     nn.BatchNorm1d(widths[0] * 16), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths, widths[1:], strict=False):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], out_channels, 4, 2, 1), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        self.start_channels = widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(len(z), self.start_channels, 4, 4)
        return (self.up(x) + 1.0) / 2.0


class DCGANDiscriminator(nn.Module):
    """Strided 4 x 4 convolutions (each halving the image and doubling the channels; dropout before each, leaky ReLU
    0.2; no batch norm, as seed 002's: a batch of real and generated images is then the same as each alone), global
    average pooling (``pooled_features``: what feature
    matching compares) and a linear layer to ``num_classes`` outputs (K + 1 for the semi-supervised GAN); any image
    size of at least ``2^num_layers`` pixels. It takes images in [0, 1], as the pipeline's and the generator's are,
    and maps them to [−1, 1] (DCGAN's range): without batch norm, uncentred inputs leave the pooled features nearly
    the same for every image and the network learns slowly (on 200 Kermany images at 64 px, 120 Adam steps at 1e-4
    took the training loss from 0.684 to 0.364 centred, 0.687 to 0.688 not).

    Args:
        num_classes: outputs (``probabilities.num_logits``).
        in_channels: image channels (1).
        base_channels: the first convolution's channels, doubled by each further one.
        num_layers: strided convolutions.
        dropout: dropout probability before each convolution (seed 002's discriminator uses dropout).
        probabilities: None for logits, or the probability layer to end with (as ``CXRDenseNet121``'s; export).
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 1, base_channels: int = 64, num_layers: int = 4,
                 dropout: float = 0.2, probabilities: str | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for i in range(num_layers):
            out = base_channels * 2 ** i
            layers += [nn.Dropout(dropout), nn.Conv2d(width, out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.class_layers = nn.Sequential()
        self.class_layers.add_module("out", nn.Linear(width, num_classes))
        if probabilities is not None:
            self.class_layers.add_module(probabilities, probability_layer(probabilities))

    @torch.jit.export
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, F)`` pooled features the output layer sees, of images in [0, 1] (mapped to [−1, 1] first)."""
        return self.pool(self.features(x * 2.0 - 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_layers(self.pooled_features(x))


def gan_discriminator(kind: str, num_classes: int, base_channels: int = 64, dropout: float = 0.2,
                      probabilities: str | None = None, **densenet: Any) -> nn.Module:
    """The discriminator ``kind``: ``"dcgan"`` (:class:`DCGANDiscriminator` with ``base_channels`` and ``dropout``)
    or ``"densenet121"`` (``CXRDenseNet121`` with the ``densenet`` arguments: the other methods' backbone, ImageNet
    weights or a pre-trained encoder allowed), with ``num_classes`` outputs. The bundle's ``network_def`` keeps
    DenseNet121's settings for the second; the first refuses those that would change it."""
    from monai_cxr_ssl.networks.densenet import CXRDenseNet121

    if kind not in DISCRIMINATORS:
        raise ValueError(f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {kind!r}.")
    if kind == "densenet121":
        return CXRDenseNet121(num_classes=num_classes, probabilities=probabilities, **densenet)
    # DenseNet121-only settings at their defaults are no choice; others would be ignored silently
    defaults = {"pretrained_weights": None, "encoder_init": None, "head": "linear", "frozen_encoder": False}
    changed = [k for k, v in densenet.items() if k in defaults and v != defaults[k]]
    if changed:
        raise ValueError(f"discriminator=dcgan: {', '.join(f'{k}={densenet[k]!r}' for k in changed)} "
                         "apply to DenseNet121 only; drop them or set discriminator=densenet121.")
    return DCGANDiscriminator(num_classes=num_classes, base_channels=base_channels, dropout=dropout,
                              probabilities=probabilities)
