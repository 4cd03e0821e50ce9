"""Ignite handler that streams a teacher's predictions on the unlabeled split into a pseudo-label file."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from ignite.engine import Engine, Events
from monai.handlers import from_engine
from monai.utils import convert_to_numpy

from monai_cxr_ssl import distributed
from monai_cxr_ssl.evaluation import auroc_report
from monai_cxr_ssl.pseudo_labels import PseudoLabelFileWriter, pseudo_label_header, read_pseudo_labels
from monai_cxr_ssl.utils import atomic_write

logger = logging.getLogger("monai_cxr_ssl")

NUM_BINS = 20


class PseudoLabelWriter:
    """Writes the evaluator's probabilities, one row per image, into a pseudo-label file as the epoch runs.

    The file (see :mod:`monai_cxr_ssl.pseudo_labels`) is opened at ``EPOCH_STARTED`` and renamed into place at
    ``EPOCH_COMPLETED``, the end of the pass over the data; a run that is terminated early or raises leaves no
    file behind, and the temporary file of a killed run is removed when the pass is made again. At
    ``EPOCH_COMPLETED`` it also draws the per-class histograms of the probabilities into ``<stem>_hist.png``
    beside the file, keeps the numbers in ``summary`` and adds ``pseudo_label_count`` (and,
    with ``include_labels``, ``pseudo_label_accuracy`` and ``pseudo_label_auroc``, means over the classes) to
    ``engine.state.metrics``, so that a metrics logger attached after it (``MLFlowHandler``) records them and can
    log ``output_file`` and ``histogram_file`` as artifacts.

    Under torchrun (each rank pseudo-labelling its share, ``multi_gpu.json``) the rows are gathered at
    ``EPOCH_COMPLETED`` and rank 0 writes them in the dataset's order: the file is the one a single process writes.

    Attach it before handlers that re-raise on ``EXCEPTION_RAISED`` (``StatsHandler``): ignite runs only the
    handlers of that event up to the first that raises, and this one must delete its temporary file.

    Args:
        output_file: the pseudo-label file to write.
        class_names: one name per output of the network.
        dataset_fingerprint: fingerprint of the split the images come from (``split["fingerprint"]``).
        teacher_checkpoint: the checkpoint the evaluator loads; its SHA-256 goes into the file's header.
        teacher_run_id: the MLflow run that trained the teacher, if known.
        split_fingerprint: the split's own fingerprint (``split["split_fingerprint"]``: the ids of each part), so
            that the filter and the student refuse pseudo-labels made for another split.
        include_labels: also store the true labels, for benchmarks where those of the unlabeled images are known,
            and report the accuracy at 0.5 and the AUROC of the pseudo-labels. Images without a label (an
            ``unlabeled_source``) have none to store: the file then holds no labels and nothing is reported.
        output_transform: maps ``engine.state.output`` to ``(probabilities, labels)``; the default suits the
            bundle's evaluators, whose post-processing turns logits into probabilities
            (``monai_cxr_ssl.probabilities``).
        id_transform: maps ``engine.state.batch`` to the batch's image ids; the default takes each item's ``"id"``.
    """

    def __init__(
        self,
        output_file: str | os.PathLike,
        class_names: Sequence[str],
        dataset_fingerprint: str,
        teacher_checkpoint: str | os.PathLike,
        teacher_run_id: str | None = None,
        split_fingerprint: str | None = None,
        include_labels: bool = False,
        output_transform: Callable | None = None,
        id_transform: Callable | None = None,
    ) -> None:
        self.output_file = Path(output_file)
        self.histogram_file = self.output_file.with_name(f"{self.output_file.stem}_hist.png")
        self.class_names = list(class_names)
        self.dataset_fingerprint = dataset_fingerprint
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher_run_id = teacher_run_id
        self.split_fingerprint = split_fingerprint
        self.include_labels = include_labels
        self.output_transform = output_transform or from_engine(["pred", "label"])
        self.id_transform = id_transform or from_engine(["id"])
        self.bin_edges = np.linspace(0.0, 1.0, NUM_BINS + 1)
        self.summary: dict | None = None
        self._writer: PseudoLabelFileWriter | None = None
        self._with_labels = False  # whether the batches came with true labels
        self._histogram = np.zeros((len(self.class_names), NUM_BINS), dtype=np.int64)
        self._prob_sum = np.zeros(len(self.class_names))
        self._predicted_positive = np.zeros(len(self.class_names), dtype=np.int64)
        self._rows: list[tuple] = []  # under torchrun, this rank's rows until the pass ends

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._commit)
        engine.add_event_handler(Events.TERMINATE, self._abort)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def _open(self, engine: Engine) -> None:
        self._abort(engine)
        self._rows = []
        self._histogram[:] = 0
        self._prob_sum[:] = 0
        self._predicted_positive[:] = 0
        self._with_labels = False
        self.summary = None
        if not distributed.is_main_process():
            return
        # A killed run (SIGKILL, power loss) cannot delete its temporary file; the run that redoes the pass does.
        # Only one run writes into an output folder at a time (monai_cxr_ssl.locking), so none of these is live.
        for stale in self.output_file.parent.glob(f".{self.output_file.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        header = pseudo_label_header(
            self.class_names, self.dataset_fingerprint, self.teacher_checkpoint, self.teacher_run_id,
            self.split_fingerprint,
        )
        self._writer = PseudoLabelFileWriter(self.output_file, header)

    def _write(self, engine: Engine) -> None:
        probs, labels = self.output_transform(engine.state.output)
        probs = np.stack([convert_to_numpy(p, dtype=np.float32) for p in probs]).reshape(len(probs), -1)
        if self.include_labels and labels is not None and not any(y is None for y in labels):
            labels = np.stack([convert_to_numpy(y, dtype=np.float32) for y in labels])
        else:
            labels = None
        ids = self.id_transform(engine.state.batch)
        if distributed.is_distributed():  # rows wait for the other ranks' (_commit)
            self._rows += [(i, p, None if labels is None else y)
                           for i, p, y in zip(ids, probs, labels if labels is not None else probs, strict=True)]
        else:
            self._add(ids, probs, labels)

    def _add(self, ids: list[str], probs: np.ndarray, labels: np.ndarray | None) -> None:
        """Write rows to the file and count them into the histograms."""
        self._with_labels = labels is not None
        self._writer.write(ids, probs, labels)
        for k in range(len(self.class_names)):
            self._histogram[k] += np.histogram(probs[:, k], bins=self.bin_edges)[0]
        self._prob_sum += probs.sum(axis=0)
        self._predicted_positive += (probs >= 0.5).sum(axis=0)

    def _commit(self, engine: Engine) -> None:
        if distributed.is_distributed():
            rows = distributed.gather_in_order(self._rows)  # the dataset's order, as one process writes it
            self._rows = []
            if not distributed.is_main_process():
                return
            if rows:
                labels = None if rows[0][2] is None else np.stack([r[2] for r in rows])
                self._add([r[0] for r in rows], np.stack([r[1] for r in rows]), labels)
        self._writer.commit()
        count = self._writer.count
        self._writer = None
        self.summary = {
            "num_images": count,
            "classes": self.class_names,
            "bin_edges": self.bin_edges.tolist(),
            "histogram": {name: self._histogram[k].tolist() for k, name in enumerate(self.class_names)},
            "mean_probability": {
                name: float(self._prob_sum[k] / count) if count else None for k, name in enumerate(self.class_names)
            },
            "predicted_positive": {name: int(self._predicted_positive[k]) for k, name in enumerate(self.class_names)},
        }
        engine.state.metrics["pseudo_label_count"] = count
        if self.include_labels and count and not self._with_labels:
            logger.info("pseudo-labels: the images have no true labels, so their accuracy is not reported")
        if self._with_labels and count:
            # AUROC needs every value: read them back from the file just written rather than keep them in memory
            _, _, probs, labels = read_pseudo_labels(self.output_file)
            accuracy = ((probs >= 0.5) == (labels >= 0.5)).mean(axis=0)
            self.summary["accuracy"] = {name: float(accuracy[k]) for k, name in enumerate(self.class_names)}
            self.summary["mean_accuracy"] = float(accuracy.mean())
            self.summary.update(auroc_report(labels, probs, self.class_names))
            engine.state.metrics["pseudo_label_accuracy"] = self.summary["mean_accuracy"]
            if self.summary["mean_auroc"] is not None:
                engine.state.metrics["pseudo_label_auroc"] = self.summary["mean_auroc"]
        _plot_histograms(self._histogram, self.bin_edges, self.class_names, self.histogram_file)
        logger.info(
            "pseudo-labels for %d images written to %s; mean probability %s%s",
            count,
            self.output_file,
            ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in self.summary["mean_probability"].items()),
            f"; accuracy {self.summary['mean_accuracy']:.4f}" if "mean_accuracy" in self.summary else "",
        )

    def _abort(self, engine: Engine) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _exception_raised(self, engine: Engine, e: Exception) -> None:
        self._abort(engine)
        raise e


def _plot_histograms(histogram: np.ndarray, bin_edges: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """Draw one histogram of the probabilities per class into a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(class_names), 4)
    rows = -(-len(class_names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.5 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax, counts, name in zip(axes.flat, histogram, class_names, strict=False):
        ax.stairs(counts, bin_edges, fill=True)
        ax.set(title=f"{name} (n={int(counts.sum())})", xlabel="teacher probability", ylabel="images", xlim=(0, 1))
    for ax in axes.flat[len(class_names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
