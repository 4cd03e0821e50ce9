"""EpochSeed: an epoch draws the same augmentations, order and torch random numbers whether or not the run was
resumed before it, with the transforms in the main process or in loader workers."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandGaussianNoised

from monai_cxr_ssl.handlers import EpochSeed


def _loader(num_workers: int, persistent: bool = False) -> DataLoader:
    data = [{"image": torch.full((1, 2), float(i))} for i in range(6)]
    noise = Compose([RandGaussianNoised("image", prob=1.0)])
    return DataLoader(Dataset(data, noise), batch_size=2, shuffle=True, num_workers=num_workers,
                      persistent_workers=persistent)


def _epochs(num_workers: int, start_epoch: int, max_epochs: int = 3) -> dict[int, list[torch.Tensor]]:
    """The batches (plus one torch draw per iteration) of each epoch after ``start_epoch``, in a fresh process
    state: the random streams are first disturbed, as a restarted process's would differ."""
    torch.manual_seed(1234 + start_epoch)
    loader = _loader(num_workers)
    engine = Engine(lambda e, batch: torch.cat([batch["image"].flatten(), torch.rand(1)]))
    EpochSeed(seed=7).attach(engine)
    seen: dict[int, list[torch.Tensor]] = {}
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.setdefault(e.state.epoch, []).append(
        e.state.output))
    engine.load_state_dict({"epoch": start_epoch, "epoch_length": len(loader), "max_epochs": max_epochs})
    engine.run(loader)
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_is_the_same_after_a_resume(num_workers):
    straight = _epochs(num_workers, start_epoch=0)
    resumed = _epochs(num_workers, start_epoch=2)
    assert sorted(resumed) == [3]
    for a, b in zip(straight[3], resumed[3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and the epochs differ from each other: the seed depends on the epoch
    assert not torch.equal(torch.stack(straight[2]), torch.stack(straight[3]))


def test_persistent_workers_are_refused():
    engine = Engine(lambda e, b: None)
    EpochSeed(seed=0).attach(engine)
    with pytest.raises(ValueError, match="persistent_workers=False"):
        engine.run(_loader(1, persistent=True))
