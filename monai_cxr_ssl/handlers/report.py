"""Ignite handler that turns an evaluator's predictions into the AUROC report."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from monai_cxr_ssl import distributed
from monai_cxr_ssl.evaluation import auroc_report, write_report

logger = logging.getLogger("monai_cxr_ssl")


class AUROCReport:
    """Collects (probability, label) pairs over an evaluator run and writes the AUROC report.

    At the end of the run it writes ``<prefix>_metrics.json`` and ``<prefix>_roc.png`` into
    ``output_dir`` and adds ``<prefix>_auroc_<class>`` (classes whose AUROC is defined), ``<prefix>_mean_auroc``
    (their mean), ``<prefix>_positives_<class>`` (positive images per class) and, for mutually exclusive classes,
    ``<prefix>_accuracy`` to ``engine.state.metrics``, so a
    metrics logger attached after it (``MLFlowHandler``, ``StatsHandler``) records them and can log the files as
    artifacts.

    ``output_transform`` maps ``engine.state.output`` to ``(probabilities, labels)``; the default suits the
    bundle's evaluators, whose post-processing turns logits into probabilities (``monai_cxr_ssl.probabilities``).
    Under torchrun (each rank evaluating its share, ``multi_gpu.json``) the pairs are gathered first, in the
    dataset's order, and rank 0 writes the files: they are those of one process.
    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str],
        prefix: str = "test",
        output_transform: Callable | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.class_names = list(class_names)
        self.prefix = prefix
        self.output_transform = output_transform or from_engine(["pred", "label"])
        self._probs: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.report: dict | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._probs, self._labels = [], []

    def _collect(self, engine: Engine) -> None:
        probs, labels = self.output_transform(engine.state.output)
        self._probs.append(torch.stack([torch.as_tensor(p) for p in probs]).detach().cpu().float().numpy())
        self._labels.append(torch.stack([torch.as_tensor(y) for y in labels]).detach().cpu().float().numpy())

    def _write(self, engine: Engine) -> None:
        k = len(self.class_names)
        # under torchrun: every rank's rows in the dataset's order; rank 0 writes, every rank reports
        rows = [np.concatenate([p.reshape(-1, k), y.reshape(-1, k)], axis=1) for p, y in zip(self._probs, self._labels,
                                                                                           strict=True)]
        pairs = distributed.gather_in_order(np.concatenate(rows) if rows else np.zeros((0, 2 * k), np.float32))
        probs, labels = pairs[:, :k], pairs[:, k:]
        if distributed.is_main_process():
            self.report = write_report(labels, probs, self.class_names, self.output_dir, self.prefix)
        else:
            self.report = auroc_report(labels, probs, self.class_names)
        for name, value in self.report["auroc"].items():
            if value is not None:
                engine.state.metrics[f"{self.prefix}_auroc_{name}"] = value
            engine.state.metrics[f"{self.prefix}_positives_{name}"] = self.report["positives"][name]
        if self.report["mean_auroc"] is not None:
            engine.state.metrics[f"{self.prefix}_mean_auroc"] = self.report["mean_auroc"]
        if self.report["accuracy"] is not None:  # mutually exclusive classes
            engine.state.metrics[f"{self.prefix}_accuracy"] = self.report["accuracy"]
        left_out = self.report["classes_left_out"]
        logger.info(
            "%s AUROC on %d images: mean %s over %s%s; %s%s",
            self.prefix,
            self.report["num_images"],
            "n/a" if self.report["mean_auroc"] is None else f"{self.report['mean_auroc']:.4f}",
            ", ".join(self.report["classes_covered"]) or "no class",
            f" (left out, undefined: {', '.join(left_out)})" if left_out else "",
            ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'} ({self.report['positives'][k]} positives)"
                      for k, v in self.report["auroc"].items()),
            "" if self.report["accuracy"] is None else f"; accuracy {self.report['accuracy']:.4f}",
        )
