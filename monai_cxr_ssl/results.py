"""Table I of the teacher-student paper: test AUROC per labeled fraction λ for the teacher, the intermediate
model (student trained on pseudo-labels only) and the student (fine-tuned), mean ± std over seeds; the same
layout holds other methods' models (the mean teacher) and the AALS ablation's variants as columns."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def columns(rounds: int = 1, method: str = "teacher_student") -> list[str]:
    """The model columns of a pipeline: for ``teacher_student``, Table I's for ``rounds`` rounds (round r > 1 adds
    ``intermediate rN`` and ``student rN``); for ``mean_teacher``, the teacher and the mean teacher."""
    if method == "mean_teacher":
        return ["teacher", "mean teacher"]
    cols = ["teacher", "intermediate", "student"]
    for r in range(2, rounds + 1):
        cols += [f"intermediate r{r}", f"student r{r}"]
    return cols


def table1(results: Sequence[dict]) -> list[dict]:
    """Aggregate pipeline results (``{"labeled_fraction", "seed", "auroc": {column: value}}``) into one row per λ,
    highest λ last: ``{"labeled_fraction", "seeds", column: (mean, std) or None}`` over the columns the results
    have; std is the sample standard deviation over seeds (0 for a single seed)."""
    by_fraction: dict[float, list[dict]] = defaultdict(list)
    for result in results:
        by_fraction[float(result["labeled_fraction"])].append(result)
    cols = list(dict.fromkeys(col for r in results for col in r["auroc"]))  # in first-seen order
    rows = []
    for fraction in sorted(by_fraction):
        group = by_fraction[fraction]
        row: dict = {"labeled_fraction": fraction, "seeds": sorted(r["seed"] for r in group)}
        for col in cols:
            values = np.array([r["auroc"][col] for r in group if r["auroc"].get(col) is not None], dtype=float)
            if len(values) == 0:
                row[col] = None
            else:
                row[col] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def format_table1(rows: Sequence[dict]) -> str:
    """Markdown table in the paper's layout: ``| labeled | teacher | intermediate | student |``, values
    ``mean ± std`` when a row has several seeds, ``-`` where a model does not exist (λ = 100%)."""
    cols = [k for k in rows[0] if k not in ("labeled_fraction", "seeds")] if rows else columns(1)
    lines = ["| labeled | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for row in rows:
        cells = []
        for col in cols:
            value = row.get(col)
            if value is None:
                cells.append("-")
            elif len(row["seeds"]) > 1:
                cells.append(f"{value[0]:.3f} ± {value[1]:.3f}")
            else:
                cells.append(f"{value[0]:.3f}")
        label = "100% (supervised)" if row["labeled_fraction"] >= 1 else f"{row['labeled_fraction'] * 100:g}%"
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
