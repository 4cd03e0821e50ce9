"""What a training epoch draws, in one process or split over the ranks of a torchrun job."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from monai_cxr_ssl import distributed

__all__ = ["EpochSampler", "epoch_seed", "loader_like", "samples_per_epoch"]


def epoch_seed(seed: int, epoch: int, *more: int) -> int:
    """A 32-bit seed for ``epoch`` of a run seeded ``seed`` (and ``more``, e.g. a rank), independent for every tuple."""
    return int(np.random.SeedSequence([seed, epoch, *more]).generate_state(1)[0])


def samples_per_epoch(num_images: int, batch_size: int, world_size: int | None = None) -> int:
    """How many images an epoch draws over all ranks: ``num_images``, less what would leave a rank's last batch with
    a single image, in a multiple of the number of ranks.

    Batch norm cannot normalise a batch of one image in training ("Expected more than 1 value per channel"), so
    such a last batch is dropped (in one process: one image fewer); every other incomplete last batch is kept, and a
    different image sits out in each epoch since the sampler shuffles. ``world_size``: default the process group's.
    """
    world = distributed.world_size() if world_size is None else world_size
    if num_images < 1:
        raise ValueError("the training set is empty; check the split (labeled_fraction, the data source).")
    if num_images == 1:
        raise ValueError("the training set holds a single image, and batch norm cannot train on a batch of one; "
                         "use a larger labeled_fraction or more images.")
    per_rank = -(-num_images // world)
    if per_rank % batch_size == 1:
        per_rank -= 1
    if per_rank < 1:
        raise ValueError(f"the training set holds {num_images} images, too few for {world} processes (batch norm "
                         "cannot train on a batch of one); use fewer processes or more images.")
    return per_rank * world


class EpochSampler(DistributedSampler):
    """A random sampler of ``num_samples`` indices per epoch over all ranks, seeded by ``(seed, epoch)``, split over
    the ranks as ``DistributedSampler`` splits (rank r takes every W-th index from r).

    The indices are permutations of the dataset laid end to end (so ``num_samples`` may exceed its size: the labeled
    loader of the mean teacher matches the unlabeled one), drawn from ``(seed, epoch)`` alone: every rank draws the
    same sequence, a resumed run the same as one that never stopped, and a run on W processes with batch B/W sees in
    each step the images a one-process run with batch B sees. torch's ``RandomSampler`` draws from the global RNG and
    does not split; ``DistributedSampler`` draws each index once per epoch; ignite's ``DistributedProxySampler``
    seeds the global RNG with the epoch alone, whatever the run's seed. MONAI's workflows call ``set_epoch``.

    Args:
        data_source: the dataset (its length).
        num_samples: indices per epoch over all ranks (``samples_per_epoch``); default the dataset's size. Rounded up
            to a multiple of the number of ranks.
        seed: the run's seed.
        num_replicas, rank: default the process group's (one process: 1 and 0).
    """

    def __init__(
        self,
        data_source: Sized,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        replicas = distributed.world_size() if num_replicas is None else num_replicas
        super().__init__(data_source, num_replicas=replicas, rank=distributed.rank() if rank is None else rank,
                         shuffle=True, seed=seed)
        if len(data_source) < 1:
            raise ValueError("EpochSampler: the dataset is empty.")
        total = len(data_source) if num_samples is None else num_samples
        self.num_samples = -(-total // replicas)  # per rank
        self.total_size = self.num_samples * replicas

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(epoch_seed(self.seed, self.epoch))
        n = len(self.dataset)
        indices = np.concatenate([rng.permutation(n) for _ in range(-(-self.total_size // n))])[: self.total_size]
        return iter(indices[self.rank:: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def loader_like(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """A loader over ``dataset`` that draws as ``loader`` draws: its ``EpochSampler``'s samples per epoch, seed and
    ranks, its batch size, workers and collation. A stage's second loader (the mean teacher's unlabeled images) is so
    written once; MONAI's ``%`` macro cannot do it, as it copies a loader with its dataset reference resolved."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError(f"loader_like copies a loader that draws with an EpochSampler, not a {type(sampler).__name__}.")
    return type(loader)(
        dataset, batch_size=loader.batch_size, num_workers=loader.num_workers,
        sampler=EpochSampler(dataset, sampler.total_size, sampler.seed, sampler.num_replicas, sampler.rank),
        collate_fn=loader.collate_fn, worker_init_fn=loader.worker_init_fn, pin_memory=loader.pin_memory,
        drop_last=loader.drop_last, persistent_workers=loader.persistent_workers,
    )
