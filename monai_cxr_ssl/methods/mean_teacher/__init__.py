"""The mean-teacher method with adaptive asymmetric label sharpening (AALS): a student initialised from the
teacher learns from the labeled split and from the sharpened predictions of its exponential moving average on the
unlabeled split (Table I's ``mean teacher``).

Here: the stage kind and its settings' checks (defaults in the bundle's ``configs/mean_teacher.json``), the plan,
the engine (``engine``: the trainer, the evaluator of student and teacher, the EMA) and the AALS ablation
(``ablation``, ``monai-cxr-ssl aals-ablation``). AALS itself (``monai_cxr_ssl.sharpening``) is shared: the
teacher-student pseudo-labels can be sharpened with it too."""

from __future__ import annotations

from typing import Any

from monai_cxr_ssl.methods import TEACHER_STAGE, Command, Method, StageKind, Step, evaluation, register
from monai_cxr_ssl.rules import BOOL, NON_NEGATIVE, choice, interval, whole

MEAN_TEACHER = StageKind("mean_teacher", ("train.json", "mean_teacher.json"), reads="init_stage",
                         epochs="mean_teacher_epochs", unlabeled=True, rules={
                             "ema_decay": interval(0, 1, False, False),
                             "consistency": choice("kl", "mse"),
                             "consistency_weight": NON_NEGATIVE,
                             "consistency_rampup": choice("sigmoid", "linear"),
                             "rampup_epochs": whole(0),
                             "aals_per_image": BOOL,
                             "separate_views": BOOL,
                         })
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


def _ablation_arguments(parser: Any) -> None:
    parser.add_argument("--t", type=float, nargs="+", help="AALS centres t (default: the paper's 0.2 0.3 0.4 0.5)")
    parser.add_argument("--a0", type=float, nargs="+", help="AALS strengths a0 (default: the paper's 1 4 8 16)")
    parser.add_argument("--grid", action="store_true",
                        help="every (t, a0) pair instead of each t at a0=4 and each a0 at t=0.4")


ABLATION = Command(
    name="aals-ablation",
    help="mean teacher with each AALS centre t and strength a0 (the paper's Tables 2 and 3), one experiment",
    description="Example: monai-cxr-ssl aals-ablation kermany cpu_small --set output_dir=runs/aals "
    "labeled_fraction=0.05",
    arguments=_ablation_arguments,
    run="monai_cxr_ssl.methods.mean_teacher.ablation:run_command",
)

METHOD = register(Method(
    name="mean_teacher",
    help="teacher → mean-teacher distillation with AALS",
    kinds=(MEAN_TEACHER,),
    steps=lambda rounds: variant(MEAN_TEACHER.name, COLUMN),
    column_of=column_of,
    commands=(ABLATION,),
))
