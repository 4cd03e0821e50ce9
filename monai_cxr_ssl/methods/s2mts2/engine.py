"""S²MTS²'s momentum-contrast pre-training step on MONAI's ``SupervisedTrainer``, unchanged, as SimCLR's is:
``ViewsBatch`` hands the trainer an image's query view as its input and its M key views as its target, and
``MomentumContrastLoss`` encodes the key views with the key encoder (ignite's ``EMAHandler`` of the query network,
without gradient, BatchNorm shuffled), scores the query with ``losses.JointContrastiveLoss`` against the keys' mean
and covariance and the queue of earlier keys' means, then enqueues this step's means from every rank
(``KeyQueue``). ``JointLambda`` ramps λ over the epochs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch
from monai.utils import convert_to_tensor
from torch.nn.modules.batchnorm import _BatchNorm

from monai_cxr_ssl import distributed
from monai_cxr_ssl.losses import JointContrastiveLoss
from monai_cxr_ssl.methods.simclr.engine import embedding_std

__all__ = ["JointLambda", "KeyQueue", "MomentumContrastLoss", "ViewsBatch", "check_queue", "full_batches"]


def check_queue(queue_size: int, batch_size: int, world_size: int | None = None) -> None:
    """Refuse a queue that a step's keys (``batch_size`` per rank, from every rank) do not fill in whole steps."""
    world = distributed.world_size() if world_size is None else world_size
    if queue_size % (world * batch_size):
        raise ValueError(f"queue_size={queue_size} must be a multiple of the keys one step adds, processes x "
                         f"batch_size = {world} x {batch_size} = {world * batch_size}: change queue_size or "
                         "batch_size.")


def full_batches(num_images: int, batch_size: int, world_size: int | None = None) -> int:
    """The images an epoch draws over all ranks: whole batches on every rank (each step adds ``world x batch_size``
    keys to the queue); refuses fewer images than one batch per rank."""
    world = distributed.world_size() if world_size is None else world_size
    step = world * batch_size
    if num_images < step:
        raise ValueError(f"S²MTS² pre-training has {num_images} images to learn from, fewer than one batch on every "
                         f"process ({world} x batch_size={batch_size}): add unlabeled images (unlabeled_source) or "
                         "lower batch_size.")
    return num_images // step * step


class KeyQueue(torch.nn.Module):
    """The queue of negative keys: ``size`` rows of ``dim``, written in turn from ``pointer``; ``filled`` rows are
    in use. Buffers, so a checkpoint of the module restores the queue and its pointer exactly; ``steps`` counts the
    enqueues (the key shuffle's seed)."""

    def __init__(self, size: int = 65536, dim: int = 128) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue_size must be >= 1, got {size}.")
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def entries(self) -> torch.Tensor:
        """The rows in use (all of them once the queue is full)."""
        return self.keys[: int(self.filled)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (n, dim) at the pointer, the oldest rows first overwritten; n must divide the size."""
        size, n, start = len(self.keys), len(keys), int(self.pointer)
        if size % n:
            raise ValueError(f"{n} keys do not divide the queue's {size} rows.")
        self.keys[start: start + n] = keys.to(self.keys)
        self.pointer.fill_((start + n) % size)
        self.filled.fill_(min(int(self.filled) + n, size))
        self.steps += 1


class ViewsBatch(PrepareBatch):
    """The trainer's input, the query view ``query_key`` (B, C, H, W), and its target, the key views ``key_keys``
    stacked (B, M, C, H, W)."""

    def __init__(self, query_key: Hashable = "image", key_keys: Sequence[Hashable] = ("image_2", "image_3")) -> None:
        self.query_key, self.key_keys = query_key, tuple(key_keys)

    def __call__(self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        query = torch.as_tensor(batchdata[self.query_key])
        # plain tensors: the key views are gathered, shuffled and sliced, which MONAI's batch metadata would refuse
        keys = torch.stack([convert_to_tensor(batchdata[k], track_meta=False) for k in self.key_keys], dim=1)
        return (query.to(device=device, non_blocking=non_blocking, **kwargs),
                keys.to(device=device, non_blocking=non_blocking, **kwargs))


class MomentumContrastLoss(torch.nn.Module):
    """The loss of a step: the query projections ``pred`` (B, D) against the key encoder's projections of the key
    views (B, M, ...) and the queue; then this step's key means μ of every rank enter the queue, in rank order.

    The key encoder runs without gradient in training mode on the key views shuffled (MoCo's shuffling BatchNorm):
    under torchrun the views of every rank are gathered, permuted and split over the ranks, so a rank's key batch
    holds other images than its query batch; on one process the shuffled views are encoded in ``bn_splits`` parts
    (MoCo's one-GPU split BatchNorm), so no key is normalised with the statistics of its query's batch. The
    permutation is seeded by ``seed`` and the queue's step count: a resumed run draws what a straight run draws.
    ``last`` holds the step's metrics (``contrastive_accuracy``, ``queue_fill``, ``joint_lambda``,
    ``embedding_std``), ``means`` this rank's key means.
    """

    def __init__(self, key_network: torch.nn.Module, queue: KeyQueue, loss: JointContrastiveLoss,
                 bn_splits: int = 2, seed: int = 0) -> None:
        super().__init__()
        if bn_splits < 1:
            raise ValueError(f"bn_splits must be >= 1, got {bn_splits}.")
        self.key_network, self.queue, self.loss = key_network, queue, loss
        self.bn_splits, self.seed = bn_splits, seed
        self.last: dict[str, float] = {}
        self.means: torch.Tensor | None = None

    @torch.no_grad()
    def encode_keys(self, views: torch.Tensor) -> torch.Tensor:
        """The normalised key projections (B, M, D) of the key views (B, M, C, H, W), BatchNorm shuffled."""
        batch, m = views.shape[:2]
        flat = views.flatten(0, 1)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.queue.steps))
        was_training = self.key_network.training
        # ignite's EMAHandler hands integer buffers over by assigning .data: the key encoder's BatchNorm batch counters
        # are the query network's, and a key forward must not count as one of its batches
        counters = [(module, module.num_batches_tracked.clone()) for module in self.key_network.modules()
                    if isinstance(module, _BatchNorm) and module.num_batches_tracked is not None]
        self.key_network.train()
        if distributed.is_distributed():
            everyone = distributed.all_gather_with_grad(flat)  # no gradient here: a plain all-gather
            order = torch.randperm(len(everyone), generator=generator).to(flat.device)
            share, rank = len(flat), distributed.rank()
            mine = everyone[order[rank * share:(rank + 1) * share]]
            encoded = distributed.all_gather_with_grad(self.key_network(mine))
            keys = torch.empty_like(encoded)
            keys[order] = encoded
            keys = keys[rank * share:(rank + 1) * share]
        else:
            order = torch.randperm(len(flat), generator=generator).to(flat.device)
            encoded = torch.cat([self.key_network(flat[part]) for part in order.chunk(self.bn_splits)])
            keys = torch.empty_like(encoded)
            keys[order] = encoded
        self.key_network.train(was_training)
        for module, count in counters:
            module.num_batches_tracked.copy_(count)
        return F.normalize(keys.float(), dim=1).view(batch, m, -1)

    def forward(self, pred: torch.Tensor, key_views: torch.Tensor) -> torch.Tensor:
        q = F.normalize(pred.float(), dim=1)
        keys = self.encode_keys(key_views)
        negatives = self.queue.entries.clone()
        loss = self.loss(q, keys, negatives)
        with torch.no_grad():
            mu = self.means = keys.mean(dim=1)  # this rank's key means of the step
            positive = (q * mu).sum(dim=1)
            beaten = (q @ negatives.T).amax(dim=1) if len(negatives) else torch.full_like(positive, -2.0)
            self.queue.enqueue(distributed.all_gather_with_grad(mu))  # every rank's means, in rank order
            self.last = {"contrastive_accuracy": float((positive > beaten).float().mean()),
                         "queue_fill": float(self.queue.filled) / len(self.queue.keys),
                         "joint_lambda": float(self.loss.lam), "embedding_std": float(embedding_std(pred))}
        return loss


class JointLambda:
    """Sets the joint loss's λ when each epoch starts: ``lam x epoch / epochs`` (epochs counted from 1) with
    ``ramp``, the released S²MTS² code's 2·(e + 1)/E for ``lam`` = 2; else ``lam`` throughout."""

    def __init__(self, loss: JointContrastiveLoss, lam: float, epochs: int, ramp: bool = True) -> None:
        if lam < 0:
            raise ValueError(f"joint_lambda (λ) must be >= 0, got {lam}.")
        self.loss, self.lam, self.epochs, self.ramp = loss, lam, epochs, ramp

    def value(self, epoch: int) -> float:
        return self.lam * epoch / self.epochs if self.ramp else self.lam

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(self.loss, "lam", self.value(e.state.epoch)))
