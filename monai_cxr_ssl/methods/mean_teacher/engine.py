"""Mean-teacher distillation with AALS (Wang et al.): a trainer that learns from a labeled and an unlabeled batch
per iteration while an exponential moving average of the student acts as the teacher, and an evaluator that
scores the student and the teacher in one pass over the validation data.

Each iteration: supervised loss on the labeled batch, plus ``w(t)`` times the Bernoulli KL divergence between the
teacher's (AALS-sharpened) probabilities on the unlabeled batch and the student's; then the optimizer step and the
teacher update ``θ' ← α θ' + (1 − α) θ`` by ignite's ``EMAHandler`` (:func:`teacher_ema`; the teacher is its
``ema_model``). ``w(t)`` ramps up from 0 with the usual mean-teacher sigmoid schedule.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from ignite.handlers import EMAHandler
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.networks.utils import eval_mode
from monai.utils.enums import CommonKeys as Keys

from monai_cxr_ssl.engines.semi_supervised import SemiSupervisedTrainer
from monai_cxr_ssl.losses import BernoulliKLDivLoss, ProbabilityMSELoss
from monai_cxr_ssl.probabilities import check_kind
from monai_cxr_ssl.probabilities import probabilities as class_probabilities
from monai_cxr_ssl.sharpening import aals, check_aals_parameters, sharpening_strength

__all__ = ["CONSISTENCIES", "RAMPUPS", "MeanTeacherEvaluator", "MeanTeacherTrainer", "check_ema_decay",
           "linear_rampup", "sigmoid_rampup", "teacher_ema"]

TEACHER_VIEW = "image_teacher"  # the unlabeled batch's teacher view (``transforms.TwoViewsd``); else "image"
CONSISTENCIES = ("kl", "mse")  # the consistency terms MeanTeacherTrainer computes
RAMPUPS = ("sigmoid", "linear")  # how its weight rises
SHARPEN_MASK = "sharpen"  # per item and class: 1 where AALS applies (``data.weak_labels``); absent: everywhere


def check_ema_decay(alpha: float) -> None:
    """Raise ``ValueError`` unless the teacher's EMA decay α is in (0, 1) (ignite's ``EMAHandler`` momentum 1 − α
    must be in (0, 1))."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(
            f"ema_decay (the teacher's EMA decay α) must be in (0, 1), got {alpha}; the paper uses 0.999 "
            "(values near 0 make the teacher follow the student, 1 would never update it)."
        )


def teacher_ema(network: torch.nn.Module, ema_decay: float) -> EMAHandler:
    """Ignite's ``EMAHandler`` keeping the mean teacher (its ``ema_model``, a copy of ``network`` made now: create it
    after loading the student's weights) as ``θ' ← α θ' + (1 − α) θ`` after every iteration, for the parameters and
    the floating-point buffers (BatchNorm statistics; the batch counters follow the student's)."""
    check_ema_decay(ema_decay)
    return EMAHandler(network, momentum=1.0 - ema_decay, handle_buffers="update")


def linear_rampup(epoch: int, epochs: float) -> float:
    """``epoch / epochs`` clipped to [0, 1] (epochs counted from 1): S²MTS²'s w = epoch / epochs; 1 when ``epochs``
    is 0."""
    return 1.0 if epochs <= 0 else min(max(epoch / epochs, 0.0), 1.0)


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(−5 (1 − s)²)`` for ``s = step / length`` clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola); 1 when
    ``length`` is 0."""
    if length <= 0:
        return 1.0
    s = min(max(step / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - s) ** 2)


class MeanTeacherTrainer(SemiSupervisedTrainer):
    """A ``SemiSupervisedTrainer`` that distils the teacher's sharpened predictions on each unlabeled batch into the
    student (``network``), on one forward of the labeled and unlabeled images together.

    Args:
        teacher_network: the teacher: the ``ema_model`` of a :func:`teacher_ema` handler attached to this trainer
            (in ``train_handlers``), which updates it after every optimizer step.
        unlabeled_data_loader: batches with ``"image"`` (the student's view), optionally ``"image_teacher"`` (the
            teacher's, separately augmented) and ``"sharpen"`` (where AALS applies).
        consistency_weight: the weight of the distillation term after ramp-up.
        rampup_epochs: epochs over which the weight rises from 0 (sigmoid ramp-up); 0 for none.
        aals_t, aals_a0: AALS centre and strength (``sharpening.aals``); ``aals_a0=1`` turns sharpening off.
        aals_per_image: one AALS strength per image (max over classes) instead of per class.
        consistency_loss: the distillation loss ``(student_logits, teacher_targets)``; default: ``consistency``'s.
        consistency: ``"kl"`` (the Bernoulli KL to the AALS-sharpened targets on the unlabeled images, Wang et al.)
            or ``"mse"`` (the squared difference of student and teacher probabilities on every image of the step,
            labeled and unlabeled: S²MTS²'s fine-tuning).
        rampup: ``"sigmoid"`` (over ``rampup_epochs``, per iteration) or ``"linear"`` (weight × epoch /
            ``rampup_epochs``, per epoch: S²MTS²'s w = epoch / epochs).
        probabilities: how the teacher's logits become its probabilities (``monai_cxr_ssl.probabilities.KINDS``);
            another than ``"sigmoid"`` needs a ``consistency_loss`` for such targets.
        kwargs: the rest of ``SupervisedTrainer``'s arguments (``network``, ``optimizer``, ``loss_function`` for
            the labeled batch, ``train_data_loader``, ``epoch_length``, handlers ...).

    The iteration output adds ``supervised_loss``, ``consistency_loss``, ``consistency_weight``, ``aals_a`` (mean
    sharpening strength over the sharpened targets) and ``aals_raised`` (fraction of them that sharpening raised),
    so that ``ignite.metrics.Average`` can report them per epoch.
    """

    def __init__(
        self,
        teacher_network: torch.nn.Module,
        unlabeled_data_loader: torch.utils.data.DataLoader,
        consistency_weight: float = 1.0,
        rampup_epochs: float = 0.0,
        aals_t: float = 0.4,
        aals_a0: float = 4.0,
        aals_per_image: bool = False,
        consistency_loss: torch.nn.Module | None = None,
        probabilities: str = "sigmoid",
        consistency: str = "kl",
        rampup: str = "sigmoid",
        **kwargs: Any,
    ) -> None:
        check_aals_parameters(aals_t, aals_a0)
        if consistency not in CONSISTENCIES:
            raise ValueError(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {consistency!r}.")
        if rampup not in RAMPUPS:
            raise ValueError(f"consistency_rampup must be one of {', '.join(RAMPUPS)}, got {rampup!r}.")
        if consistency_weight < 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}.")
        if rampup_epochs < 0:
            raise ValueError(f"rampup_epochs must be >= 0, got {rampup_epochs}.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError("MeanTeacherTrainer updates the teacher after every step; use accumulation_steps=1.")
        if check_kind(probabilities) != "sigmoid" and consistency_loss is None:
            raise ValueError("the default consistency loss (Bernoulli KL) is for independent classes; give a "
                             f"consistency_loss for probabilities={probabilities!r}.")
        super().__init__(unlabeled_data_loader=unlabeled_data_loader, joint_key=Keys.IMAGE, **kwargs)
        self.teacher_network = teacher_network
        self.consistency_weight = consistency_weight
        self.rampup_epochs = rampup_epochs
        self.aals_t, self.aals_a0, self.aals_per_image = aals_t, aals_a0, aals_per_image
        default = BernoulliKLDivLoss() if consistency == "kl" else ProbabilityMSELoss()
        self.consistency_loss = default if consistency_loss is None else consistency_loss
        self.consistency, self.rampup = consistency, rampup
        self.probabilities = probabilities
        for p in self.teacher_network.parameters():
            p.requires_grad_(False)

    def current_weight(self, engine: MeanTeacherTrainer) -> float:
        """The consistency weight at the current iteration (ramped up over ``rampup_epochs``)."""
        if self.rampup == "linear":
            return self.consistency_weight * linear_rampup(engine.state.epoch, self.rampup_epochs)
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

    def unlabeled_loss(
        self, engine: MeanTeacherTrainer, inputs: torch.Tensor, unlabeled: dict, pred: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict]:
        """``w(t)`` times the consistency loss between the student's logits ``pred`` on the unlabeled images and the
        teacher's sharpened probabilities on its view of them."""
        teacher_view = unlabeled.get(TEACHER_VIEW, unlabeled[Keys.IMAGE])
        mask = unlabeled.get(SHARPEN_MASK)
        if self.consistency == "mse":  # every image of the step: the labeled ones too
            teacher_view, pred = torch.cat([inputs, teacher_view]), torch.cat([self.labeled_pred, pred])
            mask = None if mask is None else torch.cat([torch.zeros(len(inputs), *mask.shape[1:]).to(mask), mask])
        with eval_mode(self.teacher_network):
            logits = engine.student_inferer(teacher_view, self.teacher_network)
        targets, stats = self.sharpened_targets(class_probabilities(logits.float(), self.probabilities), mask)
        consistency = self.consistency_loss(pred.float(), targets)
        weight = self.current_weight(engine)
        return weight * consistency, {**stats, "consistency_loss": consistency.detach(), "consistency_weight": weight}


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
