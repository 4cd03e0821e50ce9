"""Checkpoints that survive interruption: atomic files, the best model by a validation metric,
and the full training state after every epoch so that a killed run resumes where it stopped."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

logger = logging.getLogger("monai_cxr_ssl")


class _AtomicFileSaver(DiskSaver):
    """A ``DiskSaver`` that always writes one file name, atomically (temporary file, then rename).

    The new file replaces the old one in a single rename, so there is nothing to remove and no
    moment at which the checkpoint is missing or half-written.
    """

    def __init__(self, dirname: str, filename: str) -> None:
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename, metadata)
        os.chmod(os.path.join(self.dirname, self.filename), 0o644)  # tempfile creates it 0600

    def remove(self, filename: str) -> None:
        """Nothing to remove: the next save replaces the file."""


class _ChosenModel:
    """What ``BestCheckpoint`` saves: the weights of the candidate its latest evaluation scored best."""

    def __init__(self, owner: BestCheckpoint) -> None:
        self.owner = owner

    def state_dict(self) -> dict[str, Any]:
        return self.owner.candidates[self.owner.chosen].state_dict()


class BestCheckpoint:
    """Saves ``network``'s weights to ``save_dir/filename`` whenever an evaluator run improves ``metric_name``.

    ``candidates`` (``{metric name: network}``) add more models scored by the same evaluator, such as the EMA
    teacher of mean-teacher training: the file then holds whichever model has the best score so far.

    Attach it to the validation evaluator. It has a ``state_dict`` (the best score so far and ``best_epoch``, the
    trainer epoch of the saved model), so a trainer checkpoint that includes it resumes with the right best score
    rather than overwriting the best model with the first epoch after a restart.

    A NaN score raises ``ValueError``: NaN never compares greater, so the file would silently keep an old model
    (MONAI's ``ROCAUC`` is NaN when a validation class lacks positives; use ``monai_cxr_ssl.metrics.MeanDefinedAUROC``).
    """

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        metric_name: str,
        filename: str = "model.pt",
        candidates: Mapping[str, torch.nn.Module] | None = None,
    ) -> None:
        self.metric_name = metric_name
        self.candidates = {metric_name: network, **(candidates or {})}
        self.chosen = metric_name  # the candidate scored best by the latest evaluation
        self.best_epoch: int | None = None  # the trainer epoch whose model the file holds
        self.checkpoint = Checkpoint(
            to_save={"model": _ChosenModel(self)},
            save_handler=_AtomicFileSaver(save_dir, filename),
            score_function=self._score,
            score_name=metric_name,
            n_saved=1,
        )

    def _score(self, engine: Engine) -> float:
        missing = [name for name in self.candidates if name not in engine.state.metrics]
        if missing:
            raise KeyError(f"BestCheckpoint: metric(s) {missing} not in {sorted(engine.state.metrics)}.")
        scores = {name: float(engine.state.metrics[name]) for name in self.candidates}
        nan = [name for name, score in scores.items() if math.isnan(score)]
        if nan:
            raise ValueError(
                f"BestCheckpoint: validation metric(s) {nan} are NaN at epoch {engine.state.epoch}, so the best model "
                "cannot be chosen; use monai_cxr_ssl.metrics.MeanDefinedAUROC (mean over the classes whose AUROC is "
                "defined) as the validation key metric."
            )
        self.chosen = max(scores, key=scores.__getitem__)
        return scores[self.chosen]

    @property
    def best_score(self) -> float | None:
        return self.checkpoint._saved[-1].priority if self.checkpoint._saved else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _save(self, engine: Engine) -> None:
        """Save when the score improves; record and log the epoch (the evaluator's epoch is the trainer's)."""
        before = self.best_score
        self.checkpoint(engine)
        if self.best_score != before:
            self.best_epoch = engine.state.epoch
            logger.info("%s: best %s %.4f at epoch %d (%s)", self.checkpoint.save_handler.filename, self.metric_name,
                        self.best_score, self.best_epoch, self.chosen)

    def state_dict(self) -> dict[str, Any]:
        return {**self.checkpoint.state_dict(), "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.best_epoch = state_dict.get("best_epoch")  # absent in checkpoints written before it was recorded
        self.checkpoint.load_state_dict({k: v for k, v in state_dict.items() if k != "best_epoch"})


class ResumableCheckpoint:
    """Saves the trainer and ``save_dict`` (network, optimizer, scheduler, best-model tracker...) to
    ``save_dir/filename`` after every epoch, and restores them when the trainer starts if the file exists.

    The engine it is attached to is saved as ``"trainer"``, so configs need no reference from the
    handler back to the trainer. Attach it last in the trainer's handlers so the saved state
    includes that epoch's validation and learning-rate step.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], filename: str = "last.pt", resume: bool = True):
        self.save_dir = save_dir
        self.filename = filename
        self.path = os.path.join(save_dir, filename)
        self.save_dict = dict(save_dict)
        self.resume = resume

    @property
    def resuming(self) -> bool:
        """Whether this run continues from ``last.pt`` (other handlers, such as the MLflow run, follow it)."""
        return self.resume and os.path.exists(self.path)

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        checkpoint = Checkpoint(
            to_save=self.save_dict, save_handler=_AtomicFileSaver(self.save_dir, self.filename), n_saved=1
        )
        if self.resuming:
            CheckpointLoader(load_path=self.path, load_dict=self.save_dict, map_location="cpu").attach(engine)
            engine.add_event_handler(Events.STARTED, self._log_resume)
        engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)

    def _log_resume(self, engine: Engine) -> None:
        if engine.state.epoch >= (engine.state.max_epochs or 0):
            logger.info("%s: training already finished (%d epochs); nothing to do.", self.path, engine.state.epoch)
        else:
            state = engine.state
            logger.info("Resuming from %s after epoch %d of %d.", self.path, state.epoch, state.max_epochs)
