"""Mean-teacher distillation with AALS (Wang et al.): a trainer that learns from a labeled and an unlabeled batch
per iteration while an exponential moving average of the student acts as the teacher, and an evaluator that
scores the student and the teacher in one pass over the validation data.

Each iteration: supervised loss on the labeled batch, plus ``w(t)`` times the Bernoulli KL divergence between the
teacher's (AALS-sharpened) probabilities on the unlabeled batch and the student's; then the optimizer step and the
teacher update ``θ' ← α θ' + (1 − α) θ``. ``w(t)`` ramps up from 0 with the usual mean-teacher sigmoid schedule.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader

from monai_cxr_ssl.losses import BernoulliKLDivLoss
from monai_cxr_ssl.sharpening import aals, check_aals_parameters, sharpening_strength

__all__ = ["MeanTeacherEvaluator", "MeanTeacherTrainer", "check_ema_decay", "ema_update", "sigmoid_rampup"]

TEACHER_VIEW = "image_teacher"  # the unlabeled batch's teacher view (``transforms.TwoViewsd``); else "image"
SHARPEN_MASK = "sharpen"  # per item and class: 1 where AALS applies (``data.weak_labels``); absent: everywhere


def check_ema_decay(alpha: float) -> None:
    """Raise ``ValueError`` unless the teacher's EMA decay α is in [0, 1)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"ema_decay (the teacher's EMA decay α) must be in [0, 1), got {alpha}; the paper uses 0.999 "
            "(0 makes the teacher a copy of the student, 1 would never update it)."
        )


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(−5 (1 − s)²)`` for ``s = step / length`` clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola); 1 when
    ``length`` is 0."""
    if length <= 0:
        return 1.0
    s = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - s) ** 2)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """``θ' ← α θ' + (1 − α) θ`` for parameters and floating-point buffers (BatchNorm statistics); other buffers
    (batch counters) are copied."""
    for t_param, s_param in zip(teacher.parameters(), student.parameters(), strict=True):
        t_param.lerp_(s_param, 1.0 - alpha)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers(), strict=True):
        if t_buf.dtype.is_floating_point:
            t_buf.lerp_(s_buf, 1.0 - alpha)
        else:
            t_buf.copy_(s_buf)


class MeanTeacherTrainer(SupervisedTrainer):
    """A ``SupervisedTrainer`` whose iterations also take a batch from ``unlabeled_data_loader`` and distil the EMA
    teacher's sharpened predictions on it into the student (``network``).

    Args:
        teacher_network: the teacher, updated as the EMA of ``network`` after every optimizer step; initialise both
            from the same supervised checkpoint.
        unlabeled_data_loader: batches with ``"image"`` (the student's view), optionally ``"image_teacher"`` (the
            teacher's, separately augmented) and ``"sharpen"`` (where AALS applies); read from the start every epoch
            and cycled when the epoch is longer, so that an epoch's batches do not depend on the epochs before.
        ema_decay: α in [0, 1); the paper's 0.999.
        consistency_weight: the weight of the distillation term after ramp-up.
        rampup_epochs: epochs over which the weight rises from 0 (sigmoid ramp-up); 0 for none.
        aals_t, aals_a0: AALS centre and strength (``sharpening.aals``); ``aals_a0=1`` turns sharpening off.
        aals_per_image: one AALS strength per image (max over classes) instead of per class.
        consistency_loss: the distillation loss ``(student_logits, teacher_targets)``; default Bernoulli KL.
        kwargs: the rest of ``SupervisedTrainer``'s arguments (``network``, ``optimizer``, ``loss_function`` for
            the labeled batch, ``train_data_loader``, ``epoch_length``, handlers ...).

    The iteration output adds ``supervised_loss``, ``consistency_loss``, ``consistency_weight``, ``aals_a`` (mean
    sharpening strength over the sharpened targets) and ``aals_raised`` (fraction of them that sharpening raised),
    so that ``ignite.metrics.Average`` can report them per epoch.
    """

    def __init__(
        self,
        teacher_network: torch.nn.Module,
        unlabeled_data_loader: DataLoader,
        ema_decay: float = 0.999,
        consistency_weight: float = 1.0,
        rampup_epochs: float = 0.0,
        aals_t: float = 0.4,
        aals_a0: float = 4.0,
        aals_per_image: bool = False,
        consistency_loss: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        check_ema_decay(ema_decay)
        check_aals_parameters(aals_t, aals_a0)
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}.")
        if rampup_epochs < 0:
            raise ValueError(f"rampup_epochs must be >= 0, got {rampup_epochs}.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("MeanTeacherTrainer updates the teacher after every step; use accumulation_steps=1.")
        super().__init__(**kwargs)
        self.teacher_network = teacher_network
        self.unlabeled_data_loader = unlabeled_data_loader
        self.ema_decay = ema_decay
        self.consistency_weight = consistency_weight
        self.rampup_epochs = rampup_epochs
        self.aals_t, self.aals_a0, self.aals_per_image = aals_t, aals_a0, aals_per_image
        self.consistency_loss = BernoulliKLDivLoss() if consistency_loss is None else consistency_loss
        self._unlabeled: Iterator | None = None
        self.add_event_handler(Events.EPOCH_STARTED, self._restart_unlabeled)
        for p in self.teacher_network.parameters():
            p.requires_grad_(False)

    def _restart_unlabeled(self) -> None:
        self._unlabeled = None

    def _next_unlabeled(self) -> dict:
        """The next unlabeled batch, starting the loader over when it runs out."""
        for _ in range(2):
            if self._unlabeled is None:
                self._unlabeled = iter(self.unlabeled_data_loader)
            try:
                return next(self._unlabeled)
            except StopIteration:
                self._unlabeled = None
        raise ValueError("the unlabeled data loader is empty: mean-teacher training needs unlabeled images.")

    def current_weight(self, engine: MeanTeacherTrainer) -> float:
        """The consistency weight at the current iteration (ramped up over ``rampup_epochs``)."""
        epoch_length = engine.state.epoch_length or 1
        return self.consistency_weight * sigmoid_rampup(engine.state.iteration - 1, self.rampup_epochs * epoch_length)

    def sharpened_targets(self, probs: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """AALS targets for the teacher's ``probs`` where ``mask`` is set (everywhere when None), and their stats."""
        sharpened = aals(probs, self.aals_t, self.aals_a0, per_image=self.aals_per_image)
        where = torch.ones_like(probs, dtype=torch.bool) if mask is None else mask.to(probs.device) > 0
        targets = torch.where(where, sharpened, probs)
        y_max = probs.amax(dim=-1, keepdim=True).expand_as(probs) if self.aals_per_image else probs
        n = int(where.sum())
        stats = {
            "aals_a": float(sharpening_strength(y_max, self.aals_a0)[where].mean()) if n else float("nan"),
            "aals_raised": float((targets > probs)[where].float().mean()) if n else float("nan"),
        }
        return targets, stats

    def _iteration(self, engine: MeanTeacherTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, *_ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking,
                                                   **engine.to_kwargs)
        unlabeled = self._next_unlabeled()
        student_view = unlabeled[Keys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        teacher_view = unlabeled.get(TEACHER_VIEW, unlabeled[Keys.IMAGE])
        teacher_view = teacher_view.to(engine.state.device, non_blocking=engine.non_blocking)
        weight = self.current_weight(engine)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, "consistency_weight": weight}

        def forward() -> torch.Tensor:
            with eval_mode(self.teacher_network):
                probs = torch.sigmoid(engine.inferer(teacher_view, self.teacher_network).float())
            soft, stats = self.sharpened_targets(probs, unlabeled.get(SHARPEN_MASK))
            # one forward for both batches: BatchNorm sees labeled and unlabeled images together
            logits = engine.inferer(torch.cat([inputs, student_view]), engine.network)
            pred, pred_unlabeled = logits[: len(inputs)], logits[len(inputs):]
            engine.state.output[Keys.PRED] = pred
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            supervised = engine.loss_function(pred, targets).mean()
            consistency = self.consistency_loss(pred_unlabeled.float(), soft)
            engine.state.output.update(stats, supervised_loss=supervised.detach(),
                                       consistency_loss=consistency.detach())
            engine.state.output[Keys.LOSS] = supervised + weight * consistency
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return engine.state.output[Keys.LOSS]

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                loss = forward()
            engine.scaler.scale(loss).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss = forward()
            loss.backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        ema_update(self.teacher_network, engine.network, self.ema_decay)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class MeanTeacherEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` that also runs ``teacher_network`` on every batch, as ``"pred_teacher"``.

    One pass over the validation data scores both models: the student's predictions stay under ``"pred"``, so
    the usual metrics and post-processing apply to it, and a second metric reads ``"pred_teacher"``. The teacher
    runs right after the student's forward pass, before post-processing.
    """

    def __init__(self, teacher_network: torch.nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.teacher_network = teacher_network
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._teacher_forward)

    def _teacher_forward(self, engine: MeanTeacherEvaluator) -> None:
        output = engine.state.output
        amp = torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else contextlib.nullcontext()
        with eval_mode(self.teacher_network), amp:
            output["pred_teacher"] = engine.inferer(output[Keys.IMAGE], self.teacher_network)
