"""SimCLR's training step on MONAI's ``SupervisedTrainer``, unchanged: ``TwoViewBatch`` puts an image's two views in
one batch (2N images, one forward, so that BatchNorm sees both), ``ViewPairLoss`` splits the 2N projections into the
two views for ``losses.NTXentLoss``; amp, gradient accumulation and the iteration events stay MONAI's. The pure
functions score a batch of projections (``contrastive_accuracy``, ``embedding_std``); ``CollapseWarning`` warns when
the embeddings collapse."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch

__all__ = ["CollapseWarning", "TwoViewBatch", "ViewPairLoss", "check_batches", "contrastive_accuracy", "embedding_std"]

logger = logging.getLogger("monai_cxr_ssl")


class TwoViewBatch(PrepareBatch):
    """The trainer's inputs: the views ``keys`` of every image, one after the other (2N images); no targets."""

    def __init__(self, keys: Sequence[Hashable] = ("image", "image_2")) -> None:
        self.keys = tuple(keys)

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        views = [torch.as_tensor(batchdata[key]) for key in self.keys]
        return torch.cat(views).to(device=device, non_blocking=non_blocking, **kwargs), None


class ViewPairLoss(torch.nn.Module):
    """``loss(z1, z2)`` of the two halves of the trainer's 2N projections (``TwoViewBatch`` order)."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, pred: torch.Tensor, target: Any = None) -> torch.Tensor:
        z1, z2 = pred.chunk(2)
        return self.loss(z1, z2)


def _views(z: torch.Tensor) -> torch.Tensor:
    if z.ndim != 2 or len(z) % 2:
        raise ValueError(f"expected the (2N, D) projections of two views of N images, got {tuple(z.shape)}.")
    return F.normalize(z.detach().float(), dim=1)


def contrastive_accuracy(z: torch.Tensor) -> torch.Tensor:
    """The fraction of the 2N anchors of ``z`` (two views of N images, ``TwoViewBatch`` order) whose positive, the
    other view of its image, is the most similar of the 2N − 1 other embeddings (cosine similarity)."""
    z = _views(z)
    n = len(z) // 2
    similarity = (z @ z.T).fill_diagonal_(float("-inf"))
    positive = torch.arange(2 * n, device=z.device).roll(n)
    return (similarity.argmax(dim=1) == positive).float().mean()


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """The mean over dimensions of the standard deviation of the L2-normalised embeddings ``z`` (N, D) over the
    batch: about 1/√D when they spread over the sphere, 0 when they collapse to one point."""
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"expected (N, D) embeddings of N >= 2 images, got {tuple(z.shape)}.")
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


class CollapseWarning:
    """Warns after an epoch whose metric ``metric_name`` (``embedding_std``) fell under ``threshold``: the encoder
    maps every image to about the same point, and the loss learns nothing more."""

    def __init__(self, threshold: float, metric_name: str = "embedding_std") -> None:
        self.threshold = threshold
        self.metric_name = metric_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = engine.state.metrics.get(self.metric_name)
        if value is not None and value < self.threshold:
            logger.warning("epoch %d: the embeddings collapse (%s %.4g < %.4g): lower the learning rate, raise the "
                           "batch size or the temperature.", engine.state.epoch, self.metric_name, value,
                           self.threshold)


def check_batches(batch_size: int, num_images: int) -> None:
    """Refuse, before any work, fewer images than one batch (the shared settings' check refuses a batch of one,
    which would have no negatives)."""
    if num_images < batch_size:
        raise ValueError(f"the stage has {num_images} images to learn from without labels, fewer than one batch "
                         f"(batch_size={batch_size}): add unlabeled images (unlabeled_source) or lower batch_size.")
