"""A ``SupervisedTrainer`` that also learns from a second, unlabeled loader: the base of the semi-supervised methods.

MONAI's step is kept as it is (``SupervisedTrainer._iteration``: ``prepare_batch`` with ``to_kwargs`` and
``non_blocking``, amp with the GradScaler, ``optim_set_to_none``, ``compile``, gradient accumulation and the
``IterationEvents``), not copied: the trainer draws the iteration's unlabeled batch when the iteration starts and
wraps the inferer and the loss function the step calls. When ``joint_key`` names an image of the unlabeled batch,
the wrapped inferer runs the student once on the labeled and those images together (so BatchNorm sees both); the
wrapped loss adds what :meth:`unlabeled_loss`, the one hook a method implements, returns for the unlabeled batch.
Both run inside the step's autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DistributedSampler

__all__ = ["SemiSupervisedTrainer", "UnlabeledBatches"]


class UnlabeledBatches:
    """A trainer's second data loader: one batch per iteration, read from the start every epoch (so an epoch's
    batches do not depend on the epochs before) and cycled when the epoch is longer. Attach it to the trainer."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self._iterator: Iterator | None = None

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.restart)

    def restart(self, engine: Any) -> None:
        self._iterator = None
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):  # MONAI sets the epoch of the main loader's sampler only
            sampler.set_epoch(engine.state.epoch)

    def next(self, engine: Any) -> dict:
        """The next batch, its tensors moved to the engine's device (as its ``prepare_batch`` would)."""
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                continue
            return {k: v.to(engine.state.device, non_blocking=engine.non_blocking, **engine.to_kwargs)
                    if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        raise ValueError(f"the unlabeled data loader is empty: {type(engine).__name__} needs unlabeled images.")


class SemiSupervisedTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` on ``train_data_loader`` plus, per iteration, one batch of ``unlabeled_data_loader``.

    Args:
        unlabeled_data_loader: batches of unlabeled items (dicts); read from the start every epoch and cycled when
            the epoch is longer, so that an epoch's batches do not depend on the epochs before. None: plain
            supervised training.
        joint_key: the unlabeled batch's image that joins the labeled images in the student's forward (one forward,
            so BatchNorm statistics see labeled and unlabeled images together); its logits are passed to
            :meth:`unlabeled_loss`. None: no joint forward (the hook runs the networks it needs itself).
        kwargs: ``SupervisedTrainer``'s arguments (``train_data_loader``, ``network``, ``optimizer``,
            ``loss_function`` for the labeled batch, ``inferer`` for the student, ...).

    The iteration output adds ``supervised_loss`` (the labeled batch's loss) and what the hook returns beside its
    loss term; ``loss`` is their sum, ``pred`` the student's logits on the labeled batch.
    """

    def __init__(
        self,
        unlabeled_data_loader: torch.utils.data.DataLoader | None = None,
        joint_key: str | None = Keys.IMAGE,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.unlabeled_data_loader = unlabeled_data_loader
        self.joint_key = joint_key
        self.student_inferer: Callable = self.inferer
        self.labeled_loss: Callable = self.loss_function
        self._batch: dict | None = None
        self._unlabeled_pred: torch.Tensor | None = None
        self.labeled_pred: torch.Tensor | None = None  # the student's logits on the step's labeled batch, for the hook
        if unlabeled_data_loader is not None:
            self.inferer, self.loss_function = self._forward, self._loss  # type: ignore[assignment]
            self._unlabeled = UnlabeledBatches(unlabeled_data_loader)
            self._unlabeled.attach(self)
            self.add_event_handler(Events.ITERATION_STARTED, self._next_unlabeled)

    def unlabeled_loss(
        self, engine: SemiSupervisedTrainer, inputs: torch.Tensor, unlabeled: dict, pred: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict]:
        """The loss term of the unlabeled batch (added to the labeled loss) and extra iteration outputs.

        Args:
            engine: this trainer (its ``network``, ``inferer``, ``state``).
            inputs: the labeled images of the iteration, on the device.
            unlabeled: the unlabeled batch, its tensors on the device.
            pred: the student's logits on ``unlabeled[joint_key]`` from the joint forward; None without one.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement unlabeled_loss to use unlabeled data.")

    def _next_unlabeled(self) -> None:
        """Take the iteration's unlabeled batch (after the labeled batch is drawn, before the step: outside its
        autocast)."""
        self._batch = self._unlabeled.next(self)

    def _forward(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The student's forward in the step: the labeled images, joined by the unlabeled ones of ``joint_key``."""
        if self.joint_key is None:
            self._unlabeled_pred = None
            return self.student_inferer(inputs, network, *args, **kwargs)
        extra = self._batch[self.joint_key]
        if self.compile and isinstance(extra, MetaTensor):  # as SupervisedTrainer does for the labeled images
            extra = extra.as_tensor()
        logits = self.student_inferer(torch.cat([inputs, extra]), network, *args, **kwargs)
        self._unlabeled_pred = logits[len(inputs):]
        return logits[: len(inputs)]

    def _loss(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The labeled loss plus the hook's term; records both parts in the iteration output."""
        supervised = self.labeled_loss(pred, targets).mean()
        self.labeled_pred = pred
        term, outputs = self.unlabeled_loss(self, self.state.output[Keys.IMAGE], self._batch, self._unlabeled_pred)
        self.state.output.update(outputs, supervised_loss=supervised.detach())
        self._batch = self._unlabeled_pred = self.labeled_pred = None
        return supervised + term

