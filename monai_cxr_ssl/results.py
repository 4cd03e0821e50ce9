"""Table I of the teacher-student paper: test AUROC per labeled fraction λ for the teacher, the intermediate
model (student trained on pseudo-labels only) and the student (fine-tuned), mean ± std over seeds; the same
layout holds other methods' models (their columns come from ``monai_cxr_ssl.methods``) and the AALS ablation's
variants as columns."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from monai_cxr_ssl import methods

FEW_POSITIVES = 10  # a test AUROC resting on fewer positive images is flagged under the table
COLUMN_TAG = "table1_column"  # the MLflow tag of an evaluation run: its pipeline's column (``simclr + teacher``)


def columns(rounds: int = 1, method: str | None = None) -> list[str]:
    """The model columns of a pipeline of ``method`` (``methods.names()``, default ``methods.DEFAULT_METHOD``) run
    for ``rounds`` rounds: the teacher's, then the method's (``methods.columns``)."""
    return methods.columns(rounds, method)


def table1(results: Sequence[dict]) -> list[dict]:
    """Aggregate pipeline results (``{"labeled_fraction", "seed", "auroc": {column: value}}``) into one row per λ,
    highest λ last: ``{"labeled_fraction", "seeds", column: (mean, std) or None}`` over the columns the results
    have; std is the sample standard deviation over seeds (0 for a single seed). Results of pipelines run with
    ``labeled_per_class`` make rows of their own (after the λ rows, fewest first) that carry it."""
    by_size: dict[tuple, list[dict]] = defaultdict(list)
    for result in results:
        per_class = result.get("labeled_per_class")
        key = (0, float(result["labeled_fraction"])) if per_class is None else (1, int(per_class))
        by_size[key].append(result)
    cols = list(dict.fromkeys(col for r in results for col in r["auroc"]))  # in first-seen order
    rows = []
    for key in sorted(by_size):
        group = by_size[key]
        row: dict = {"labeled_fraction": float(group[0]["labeled_fraction"]),
                     **({"labeled_per_class": key[1]} if key[0] else {}), "seeds": sorted(r["seed"] for r in group)}
        for col in cols:
            values = np.array([r["auroc"][col] for r in group if r["auroc"].get(col) is not None], dtype=float)
            if len(values) == 0:
                row[col] = None
            else:
                row[col] = (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0)
        rows.append(row)
    return rows


def merge_methods(results: Sequence[dict]) -> dict:
    """The results of several pipelines run in one output folder (one split: one λ and seed; a method each) as one
    result whose columns are all of theirs, in Table I's order: nothing a finished method wrote is lost when
    another method runs in the folder. A column they share (the teacher) takes the last result's value."""
    merged = dict(results[-1])
    auroc: dict = {}
    classes: dict = {}
    for result in results:
        auroc.update(result["auroc"])
        classes.update(result.get("test_classes") or {})
    order = sorted(auroc, key=methods.column_order)
    merged["auroc"] = {col: auroc[col] for col in order}
    merged["test_classes"] = {col: classes[col] for col in order if col in classes}
    merged["methods"] = list(dict.fromkeys(
        methods.composed_column(r["pretrain"], r["method"]) if r.get("pretrain") else r["method"] for r in results))
    return merged


def coverage(report: dict, dropped: dict | None = None) -> dict:
    """What an evaluation report's mean AUROC rests on: ``{"covered", "left_out", "dropped", "positives"}``
    (classes whose test AUROC is defined; those left out: undefined on the test images, or ``dropped`` by the split
    for too few labeled positives, its ``left_out_classes``: ``{name: {"pool", "labeled"}}``; positive test images
    per class)."""
    auroc = report["auroc"]
    left_out = list(report.get("classes_left_out", [c for c, v in auroc.items() if v is None]))
    dropped = dict(dropped or {})
    return {
        "covered": report.get("classes_covered", [c for c, v in auroc.items() if v is not None]),
        "left_out": left_out + [c for c in dropped if c not in left_out],
        "dropped": dropped,
        "positives": dict(report["positives"]),
    }


def class_notes(coverages: Iterable[dict], few: int = FEW_POSITIVES) -> list[str]:
    """Lines for under a table of mean test AUROCs: which classes the means cover, those left out (AUROC undefined
    on the test images; or dropped by the split, with their training-pool and labeled positives), and the covered
    classes whose AUROC rests on fewer than ``few`` positive test images (with their count, or its range over the
    runs)."""
    coverages = [c for c in coverages if c]
    if not coverages:
        return []
    sets: dict[tuple, int] = defaultdict(int)
    for c in coverages:
        sets[tuple(c["covered"])] += 1
    dropped = {name: counts for c in coverages for name, counts in (c.get("dropped") or {}).items()}
    undefined = list(dict.fromkeys(name for c in coverages for name in c["left_out"] if name not in dropped))
    if len(sets) == 1:
        (covered,) = sets
        line = f"Mean AUROC over {len(covered)} class(es): {', '.join(covered)}"
    else:
        line = "Mean AUROC over different classes per run: " + "; ".join(
            f"{', '.join(covered)} ({n} run{'s' if n > 1 else ''})" for covered, n in sets.items())
    if undefined:
        line += f"; left out (test AUROC undefined, one label value only): {', '.join(undefined)}"
    if dropped:
        line += ("; left out of training and testing (too few labeled positives, setting min_positives): "
                 + ", ".join(f"{name} ({v['labeled']} labeled of {v['pool']} in the training pool)"
                             for name, v in dropped.items()))
    lines = [line + "."]
    counts: dict[str, list[int]] = defaultdict(list)
    for c in coverages:
        for name in c["covered"]:
            if c["positives"].get(name) is not None:  # runs logged before positives were recorded lack them
                counts[name].append(int(c["positives"][name]))
    rare = {name: (min(n), max(n)) for name, n in counts.items() if min(n) < few}
    if rare:
        lines.append(f"Fewer than {few} positive test images (AUROC uncertain): " + ", ".join(
            f"{name} ({lo}{'' if lo == hi else f'-{hi}'})" for name, (lo, hi) in rare.items()) + ".")
    return lines


def table1_notes(results: Sequence[dict]) -> list[str]:
    """``class_notes`` over the test reports of pipeline results (their ``test_classes``: column -> coverage), and
    the sources of runs with an ``eval_source`` (labeled images from one, the rest from the other)."""
    notes = class_notes(c for r in results for c in (r.get("test_classes") or {}).values())
    for sources in dict.fromkeys(json.dumps(r["sources"]) for r in results if r.get("sources")):
        site = json.loads(sources)
        notes.append(f"Labeled images: {site['labeled']}; unlabeled, validation and test images: {site['evaluated']} "
                     "(eval_source).")
    return notes


def format_table1(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    """Markdown table in the paper's layout: ``| labeled | teacher | intermediate | student |``, values
    ``mean ± std`` when a row has several seeds, ``-`` where a model does not exist (λ = 100%); ``notes``
    (``table1_notes``) follow the table as lines of their own."""
    cols = ([k for k in rows[0] if k not in ("labeled_fraction", "labeled_per_class", "seeds")] if rows
            else columns(1))
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
        if "labeled_per_class" in row:
            label = f"{row['labeled_per_class']} per class"
        else:
            label = "100% (supervised)" if row["labeled_fraction"] >= 1 else f"{row['labeled_fraction'] * 100:g}%"
        seeds = ",".join(str(s) for s in row["seeds"])
        lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
