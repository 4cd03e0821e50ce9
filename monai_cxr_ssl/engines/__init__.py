"""Ignite engines beyond MONAI's supervised ones: a semi-supervised trainer and mean-teacher distillation."""

from monai_cxr_ssl.engines.mean_teacher import (
    MeanTeacherEvaluator,
    MeanTeacherTrainer,
    check_ema_decay,
    sigmoid_rampup,
    teacher_ema,
)
from monai_cxr_ssl.engines.semi_supervised import SemiSupervisedTrainer

__all__ = ["MeanTeacherEvaluator", "MeanTeacherTrainer", "SemiSupervisedTrainer", "check_ema_decay",
           "sigmoid_rampup", "teacher_ema"]
