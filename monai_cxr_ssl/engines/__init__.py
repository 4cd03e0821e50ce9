"""Ignite engines beyond MONAI's supervised ones: mean-teacher distillation."""

from monai_cxr_ssl.engines.mean_teacher import (
    MeanTeacherEvaluator,
    MeanTeacherTrainer,
    check_ema_decay,
    ema_update,
    sigmoid_rampup,
)

__all__ = ["MeanTeacherEvaluator", "MeanTeacherTrainer", "check_ema_decay", "ema_update", "sigmoid_rampup"]
