"""Ignite handler that writes an inference run's probabilities as a CSV file with a header."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_cxr_ssl.utils import atomic_write

__all__ = ["PredictionsCSV"]


class PredictionsCSV:
    """``predictions.csv`` of an evaluator run: a header, then one row per image.

    Columns: ``image`` (the item's ``id``), one probability column per class named by ``class_names`` and, when
    ``thresholds`` are known (a number, one per class, or a class-to-number mapping), one 0/1 column per class
    named ``<class>>=<threshold>``. MONAI's ``ClassificationSaver`` writes neither header nor class names. The file
    is written atomically at the end of the run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        thresholds: float | Sequence[float] | Mapping[str, float] | None = None,
        filename: str = "predictions.csv",
    ) -> None:
        self.path = os.path.join(output_dir, filename)
        self.class_names = [str(c) for c in class_names]
        self.thresholds = self._per_class(thresholds)
        self._ids: list[str] = []
        self._probs: list[np.ndarray] = []

    def _per_class(self, thresholds) -> list[float] | None:
        if thresholds is None:
            return None
        if isinstance(thresholds, Mapping):
            missing = [c for c in self.class_names if c not in thresholds]
            if missing:
                raise ValueError(f"thresholds has no value for class(es) {missing}; give one per class_names entry.")
            values = [float(thresholds[c]) for c in self.class_names]
        elif isinstance(thresholds, (int, float)):
            values = [float(thresholds)] * len(self.class_names)
        else:
            values = [float(t) for t in thresholds]
        if len(values) != len(self.class_names) or not all(0.0 <= t <= 1.0 for t in values):
            raise ValueError(f"thresholds must be numbers in [0, 1], one per class {self.class_names}; got "
                             f"{thresholds!r}.")
        return values

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._ids, self._probs = [], []

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output, strict=True):  # decollated, as MONAI does
            self._ids.append(str(item["id"]))
            self._probs.append(torch.as_tensor(out["pred"]).detach().cpu().float().reshape(-1).numpy())

    def _write(self, engine: Engine) -> None:
        probs = np.stack(self._probs) if self._probs else np.zeros((0, len(self.class_names)))
        if probs.shape[1] != len(self.class_names):
            raise ValueError(f"the model gives {probs.shape[1]} output(s) but class_names has "
                             f"{len(self.class_names)} ({self.class_names}); set class_names to match.")
        header = ["image", *self.class_names]
        if self.thresholds is not None:
            header += [f"{c}>={t:.4f}" for c, t in zip(self.class_names, self.thresholds, strict=True)]
        with atomic_write(self.path) as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for image, p in zip(self._ids, probs, strict=True):
                row = [image, *(f"{v:.6f}" for v in p)]
                if self.thresholds is not None:
                    row += [int(v >= t) for v, t in zip(p, self.thresholds, strict=True)]
                writer.writerow(row)
