"""A trainer handler for bench/distributed.py: the training time of every epoch (first batch to last step, no
validation or checkpoint) and the images it trained on, summed over the ranks, written by rank 0 to ``path``."""

from __future__ import annotations

import json
import time

import torch
from ignite.engine import Engine, Events

from monai_cxr_ssl import distributed


class EpochTimer:
    def __init__(self, path: str) -> None:
        self.path, self.epochs, self._start, self._images = path, [], 0.0, 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=1), self._completed)

    def _started(self, engine: Engine) -> None:
        distributed.barrier()
        self._start, self._images, self._last = time.perf_counter(), 0, time.perf_counter()

    def _count(self, engine: Engine) -> None:
        self._images += len(engine.state.batch["image"])
        self._last = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        images = torch.tensor([self._images])
        if distributed.is_distributed():
            torch.distributed.all_reduce(images)
        self.epochs.append({"epoch": engine.state.epoch, "seconds": self._last - self._start,
                            "images": int(images)})
        if distributed.is_main_process():
            with open(self.path, "w") as f:
                json.dump(self.epochs, f)
