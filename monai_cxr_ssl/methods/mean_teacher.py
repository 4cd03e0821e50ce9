"""The mean-teacher method with adaptive asymmetric label sharpening (AALS): a student initialised from the
teacher learns from the labeled split and from the sharpened predictions of its exponential moving average on the
unlabeled split (Table I's ``mean teacher``)."""

from __future__ import annotations

from typing import Any

from monai_cxr_ssl.methods import TEACHER_STAGE, Method, StageKind, Step, evaluation, register

MEAN_TEACHER = StageKind("mean_teacher", ("train.json", "mean_teacher.json"), reads="init_stage",
                         epochs="mean_teacher_epochs", unlabeled=True)
COLUMN = "mean teacher"


def mean_teacher_step(stage: str = MEAN_TEACHER.name, **settings: Any) -> Step:
    """Mean-teacher distillation initialised from the teacher; ``settings`` override its config (AALS t, a0 ...)."""
    return MEAN_TEACHER.step(stage, TEACHER_STAGE, **settings)


def variant(stage: str, column: str, **settings: Any) -> list[Step]:
    """A mean teacher in the stage folder ``stage`` with ``settings`` and its evaluation for ``column`` (the AALS
    ablation's variants)."""
    return [mean_teacher_step(stage, **settings), evaluation(stage, MEAN_TEACHER, column)]


def column_of(stage: str) -> str | None:
    """``mean_teacher`` → ``mean teacher``; a variant (``mean_teacher_t0.4_a4``) keeps its stage name."""
    if stage == MEAN_TEACHER.name:
        return COLUMN
    return stage if stage.startswith(MEAN_TEACHER.name) else None


METHOD = register(Method(
    name="mean_teacher",
    help="teacher → mean-teacher distillation with AALS",
    kinds=(MEAN_TEACHER,),
    steps=lambda rounds: variant(MEAN_TEACHER.name, COLUMN),
    column_of=column_of,
))
