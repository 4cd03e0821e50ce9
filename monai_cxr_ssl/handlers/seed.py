"""Per-epoch seeding, so that a resumed run draws the same random numbers as one that never stopped.

Without it an epoch's augmentations and shuffling depend on every random number drawn since the run started;
a run resumed from a checkpoint starts those streams afresh and diverges from the uninterrupted run. Seeding each
epoch from ``(seed, epoch)`` makes it depend on nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from monai_cxr_ssl import distributed
from monai_cxr_ssl.data.sampling import epoch_seed


class EpochSeed:
    """At the start of every epoch, seed Python, NumPy and torch from ``(seed, epoch)`` (and the rank, under
    torchrun), and the random transforms of the loaders that load in the main process (``num_workers=0``; worker
    processes seed theirs from torch's generator when the epoch's iterator starts them).

    Args:
        seed: the run's seed.
        data_loaders: the loaders the engine reads in an epoch; default the one it runs on. Their
            workers must not be persistent: a persistent worker keeps its random state from the epoch before.
    """

    def __init__(self, seed: int, data_loaders: Sequence[DataLoader] | None = None) -> None:
        self.seed = seed
        self.data_loaders = data_loaders

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._check_loaders)
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def _loaders(self, engine: Engine) -> Sequence[DataLoader]:
        return [engine.state.dataloader] if self.data_loaders is None else self.data_loaders

    def _check_loaders(self, engine: Engine) -> None:
        if any(getattr(loader, "persistent_workers", False) for loader in self._loaders(engine)):
            raise ValueError("EpochSeed cannot reseed persistent loader workers; set persistent_workers=False.")

    def __call__(self, engine: Engine) -> None:
        # each rank its own augmentations (the samplers split the images, EpochSampler)
        ranks = (distributed.rank(),) if distributed.is_distributed() else ()
        seed = epoch_seed(self.seed, engine.state.epoch, *ranks)
        set_determinism(seed=seed)
        for loader in self._loaders(engine):
            if getattr(loader, "num_workers", 0) == 0:  # any iterable the engine runs on; workers seed themselves
                set_rnd(getattr(loader, "dataset", loader), seed)
