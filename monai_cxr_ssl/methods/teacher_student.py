"""The teacher-student method (self-training with a balanced filter): per round the teacher pseudo-labels the
unlabeled split and the balanced filter keeps the confident ones, a student trains on them (the paper's
"intermediate" model) and is fine-tuned on the labeled split (its "student"). From round 2 on the previous
fine-tuned student is the teacher and the stages are suffixed ``_r<N>`` (Table I's ``intermediate rN``,
``student rN``)."""

from __future__ import annotations

import re

from monai_cxr_ssl.methods import TEACHER_STAGE, Method, StageKind, Step, evaluation, register
from monai_cxr_ssl.rules import BOOL, choice, interval

# the balanced filter's settings (``handlers.BalancedFilter``; defaults in pseudo_label.json)
PSEUDO_LABEL = StageKind("pseudo_label", ("train.json", "predict.json", "pseudo_label.json"), reads="teacher_stage",
                         unlabeled=True, rules={
                             "keep_fraction": interval(0, 1, False, True),
                             "soft_labels": BOOL,
                             "filter_threshold": interval(0, 1, True, True, nullable=True),
                             "sharpening": choice(None, "aals"),
                             "report_true_labels": BOOL,
                         })
STUDENT = StageKind("student", ("train.json", "student.json"), reads="pseudo_label_stage", epochs="student_epochs")
FINETUNE = StageKind("finetune", ("train.json", "finetune.json"), reads="init_stage", epochs="finetune_epochs")

_COLUMNS = {STUDENT.name: "intermediate", FINETUNE.name: "student"}  # the paper's names of the two models
_STAGE = re.compile(rf"({STUDENT.name}|{FINETUNE.name})(?:_r(\d+))?")
_COLUMN = re.compile(r"(intermediate|student)(?: r(\d+))?")


def column_of(stage: str) -> str | None:
    """``student`` → ``intermediate``, ``finetune`` → ``student``, ``student_r2`` → ``intermediate r2`` ...;
    None for a stage of another method."""
    match = _STAGE.fullmatch(stage)
    if match is None:
        return None
    return _COLUMNS[match[1]] + ("" if match[2] is None else f" r{match[2]}")


def column_order(column: str) -> tuple | None:
    """Intermediate then student, round by round."""
    match = _COLUMN.fullmatch(column)
    return None if match is None else (int(match[2] or 1), match[1] == "student")


def steps(rounds: int) -> list[Step]:
    """Pseudo-label, student and its evaluation, fine-tune and its evaluation, for each round."""
    out: list[Step] = []
    teacher = TEACHER_STAGE
    for r in range(1, rounds + 1):
        suffix = "" if r == 1 else f"_r{r}"
        pseudo, student, finetune = (kind.name + suffix for kind in (PSEUDO_LABEL, STUDENT, FINETUNE))
        out += [
            PSEUDO_LABEL.step(pseudo, teacher),
            STUDENT.step(student, pseudo),
            evaluation(student, STUDENT, column_of(student)),
            FINETUNE.step(finetune, student),
            evaluation(finetune, FINETUNE, column_of(finetune)),
        ]
        teacher = finetune
    return out


METHOD = register(Method(
    name="teacher_student",
    help="teacher → pseudo-labels (balanced filter) → student → fine-tune; rounds=N for N rounds",
    kinds=(PSEUDO_LABEL, STUDENT, FINETUNE),
    steps=steps,
    rounds=True,
    column_of=column_of,
    column_order=column_order,
))
