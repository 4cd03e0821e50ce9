"""Checkpoints that survive interruption: atomic files, the best model by a validation metric,
and the full training state after every epoch so that a killed run resumes where it stopped."""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from monai_cxr_ssl import distributed
from monai_cxr_ssl.checkpoints import (
    PROVENANCE_FILE,
    TRAINING_CHECKPOINT,
    changed_settings,
    read_checkpoint,
    read_provenance,
    write_provenance,
)
from monai_cxr_ssl.methods import epoch_settings
from monai_cxr_ssl.utils import disk_full_error, is_disk_full

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
        if distributed.rank() != self.save_on_rank:  # DiskSaver writes on one rank only
            return
        try:
            super().__call__(checkpoint, self.filename, metadata)
        except (OSError, RuntimeError) as err:  # torch reports a full disk as "file write failed" (RuntimeError)
            needed = _nbytes(checkpoint)
            if is_disk_full(err) or shutil.disk_usage(self.dirname).free < needed:
                raise disk_full_error(os.path.join(self.dirname, self.filename), needed) from err
            raise
        os.chmod(os.path.join(self.dirname, self.filename), 0o644)  # tempfile creates it 0600

    def remove(self, filename: str) -> None:
        """Nothing to remove: the next save replaces the file."""


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


class _ModelWeights:
    """What a stage saves as its model: the weights of the network ``network()`` returns when it saves (for
    ``BestCheckpoint``, the candidate its latest evaluation scored best), without DDP's ``module.`` prefix."""

    def __init__(self, network: Callable[[], torch.nn.Module]) -> None:
        self.network = network

    def state_dict(self) -> dict[str, Any]:
        return distributed.unwrap(self.network()).state_dict()


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
            to_save={"model": _ModelWeights(lambda: self.candidates[self.chosen])},
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


class FinalModel:
    """Saves ``network``'s weights to ``save_dir/filename`` when training completes, in the format of
    ``BestCheckpoint``'s file: the model of a stage without a validation metric (a label-free pre-training).

    Attach it to the trainer. A file left by an earlier run is removed when training starts, so that the file
    exists only once a run has completed (a resumed run that had finished writes it again). MONAI's
    ``CheckpointSaver(save_final=True)`` also saves when an exception is raised, leaving a model of a failed run.
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt") -> None:
        self.path = os.path.join(save_dir, filename)
        self.checkpoint = Checkpoint(to_save={"model": _ModelWeights(lambda: network)},
                                     save_handler=_AtomicFileSaver(save_dir, filename), n_saved=None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._remove)
        engine.add_event_handler(Events.COMPLETED, self._save)

    def _remove(self, engine: Engine) -> None:
        if distributed.is_main_process() and os.path.exists(self.path):
            os.unlink(self.path)

    def _save(self, engine: Engine) -> None:
        self.checkpoint(engine)
        if distributed.is_main_process():
            logger.info("%s: the model after epoch %d (the last).", self.path, engine.state.epoch)


class ResumableCheckpoint:
    """Saves the trainer and ``save_dict`` (network, optimizer, scheduler, best-model tracker...) to
    ``save_dir/filename`` after every epoch, and restores them when the trainer starts if the file exists.

    The engine it is attached to is saved as ``"trainer"``, so configs need no reference from the
    handler back to the trainer; a ``save_dict`` entry that is None is left out (a stage without labels has no
    best-model tracker). Attach it last in the trainer's handlers so the saved state
    includes that epoch's validation and learning-rate step.

    Under torchrun rank 0 writes, every rank reads, and the ranks wait for each other after each save (so that a
    kill between epochs finds the same ``last.pt`` on every rank); the network is saved unwrapped (ignite's
    ``Checkpoint`` unwraps DDP), the files are those of one process.

    ``settings`` (the stage's params, ``monai_cxr_ssl.config_items.run_params``) and ``split_fingerprint`` are
    recorded in ``save_dir``'s ``provenance.json`` when training starts. A ``last.pt`` is resumed only when it was
    made with the same settings (the epoch counts may differ: a longer run continues, since every epoch is seeded on
    its own); otherwise the stage stops, naming the settings that changed. With ``resume=False`` an earlier
    ``last.pt`` and best model are deleted when training starts, and the stage starts over.
    """

    # settings that may differ on resume: the epoch counts (``methods.epoch_settings``), and where the data lives
    # (its fingerprint is compared)
    RESUMABLE_CHANGES = frozenset({"num_epochs", "datasource"})

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        filename: str = "last.pt",
        resume: bool = True,
        settings: Mapping[str, Any] | None = None,
        split_fingerprint: str | None = None,
    ) -> None:
        self.save_dir = save_dir
        self.filename = filename
        self.path = os.path.join(save_dir, filename)
        self.save_dict = {key: obj for key, obj in save_dict.items() if obj is not None}  # null: nothing to save
        self.resume = resume
        self.settings = dict(settings or {})
        self.split_fingerprint = split_fingerprint
        if self.resuming:
            self._check_resumable()

    @property
    def resuming(self) -> bool:
        """Whether this run continues from ``last.pt`` (other handlers, such as the MLflow run, follow it)."""
        return self.resume and os.path.exists(self.path)

    def _check_resumable(self) -> None:
        """Refuse a ``last.pt`` made for another split or with other settings, before any work starts."""
        remedy = ("use another output_dir, restore the earlier settings, or pass resume=false (--resume false) to "
                  "start this stage over")
        record = read_provenance(self.save_dir)
        if record is None:
            raise ValueError(f"{self.path} has no record of the settings it was made with ({PROVENANCE_FILE}; made "
                             f"by an earlier version or another tool), so it cannot be resumed safely: {remedy}.")
        if self.split_fingerprint is not None and record.get("split_fingerprint") != self.split_fingerprint:
            raise ValueError(f"{self.path} was made on another split (split fingerprint "
                             f"{record.get('split_fingerprint')}, now {self.split_fingerprint}): {remedy}.")
        changed = [k for k in changed_settings(record.get("settings") or {}, self.settings)
                   if k not in self.RESUMABLE_CHANGES and k not in epoch_settings()]
        if changed:
            raise ValueError(f"{self.path} was made with other settings (changed: {', '.join(changed)}): {remedy}.")

    def attach(self, engine: Engine) -> None:
        self.save_dict["trainer"] = engine
        checkpoint = Checkpoint(
            to_save=self.save_dict, save_handler=_AtomicFileSaver(self.save_dir, self.filename), n_saved=1
        )
        if self.resuming:
            engine.add_event_handler(Events.STARTED, self._load)
        else:
            engine.add_event_handler(Events.STARTED, self._start_over)
        engine.add_event_handler(Events.STARTED, self._record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
        engine.add_event_handler(Events.EPOCH_COMPLETED, distributed.barrier)

    def _load(self, engine: Engine) -> None:
        checkpoint = read_checkpoint(self.path, TRAINING_CHECKPOINT)
        max_epochs = engine.state.max_epochs
        try:
            Checkpoint.load_objects(to_load=self.save_dict, checkpoint=checkpoint)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise ValueError(f"{self.path} does not fit this stage's network and optimizer ({err}); pass "
                             "resume=false to start the stage over.") from None
        if engine.state.epoch > (max_epochs or 0):
            raise ValueError(f"{self.path} has already trained {engine.state.epoch} epochs, more than num_epochs="
                             f"{max_epochs}; set num_epochs >= {engine.state.epoch} or pass resume=false.")
        engine.state.max_epochs = max_epochs
        if engine.state.epoch >= (max_epochs or 0):
            logger.info("%s: training already finished (%d epochs); nothing to do.", self.path, engine.state.epoch)
        else:
            logger.info("Resuming from %s after epoch %d of %d.", self.path, engine.state.epoch, max_epochs)

    def _start_over(self, engine: Engine) -> None:
        """Delete what an earlier run left in ``save_dir`` (its ``last.pt`` and best model), so nothing stale stays."""
        if not distributed.is_main_process():
            return
        names = {self.filename, PROVENANCE_FILE}
        names |= {obj.checkpoint.save_handler.filename for obj in self.save_dict.values()
                  if isinstance(obj, BestCheckpoint)}
        removed = [name for name in sorted(names) if os.path.exists(os.path.join(self.save_dir, name))]
        for name in removed:
            os.unlink(os.path.join(self.save_dir, name))
        if removed:
            logger.info("resume=false: starting over; removed %s from %s.", ", ".join(removed), self.save_dir)

    def _record(self, engine: Engine) -> None:
        if distributed.is_main_process():
            write_provenance(self.save_dir, self.split_fingerprint, self.settings)
        distributed.barrier()
