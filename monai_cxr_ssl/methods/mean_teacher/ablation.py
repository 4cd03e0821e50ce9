"""The AALS ablation of Wang et al. (their Tables 2 and 3) as one resumable command.

One teacher, then one mean-teacher run per AALS setting, all started from that teacher and evaluated on the test
split, under one MLflow parent run (so in one experiment). By default the settings are the paper's: the centre t
varied with a0 at its default, and a0 varied with t at its default; ``grid=True`` runs every (t, a0) pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai_cxr_ssl.methods import TEACHER_COLUMN, teacher_steps
from monai_cxr_ssl.methods.mean_teacher import MEAN_TEACHER, variant
from monai_cxr_ssl.pipeline import Pipeline
from monai_cxr_ssl.sharpening import check_aals_parameters
from monai_cxr_ssl.tracking import tracking_client
from monai_cxr_ssl.utils import atomic_write, write_json
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE

__all__ = ["aals_settings", "format_ablation", "run_aals_ablation"]

PAPER_TS = (0.2, 0.3, 0.4, 0.5)
PAPER_A0S = (1.0, 4.0, 8.0, 16.0)


def aals_settings(
    ts: Sequence[float] = PAPER_TS, a0s: Sequence[float] = PAPER_A0S, grid: bool = False, t: float = 0.4,
    a0: float = 4.0,
) -> list[tuple[float, float]]:
    """The (t, a0) pairs to run: each t with ``a0``, then each a0 with ``t`` (no pair twice), or the full grid."""
    pairs = [(x, y) for x in ts for y in a0s] if grid else [(x, a0) for x in ts] + [(t, y) for y in a0s]
    pairs = list(dict.fromkeys((float(x), float(y)) for x, y in pairs))
    for x, y in pairs:
        check_aals_parameters(x, y)
    return pairs


def _column(t: float, a0: float) -> str:
    """The results column (and MLflow metric suffix) of one setting, as its stage folder: ``t0.4_a4``."""
    return f"t{t:g}_a{a0:g}"


def format_ablation(auroc: dict[str, float | None], pairs: Sequence[tuple[float, float]]) -> str:
    """Markdown: test AUROC in a grid, rows t and columns a0 (``-`` for pairs not run), plus the teacher's."""
    ts = sorted({t for t, _ in pairs})
    a0s = sorted({a0 for _, a0 in pairs})
    lines = ["| t \\ a0 | " + " | ".join(f"{a0:g}" for a0 in a0s) + " |", "|---" * (len(a0s) + 1) + "|"]
    for t in ts:
        cells = []
        for a0 in a0s:
            value = auroc.get(_column(t, a0)) if (t, a0) in pairs else None
            cells.append("-" if value is None else f"{value:.3f}")
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    teacher = auroc.get(TEACHER_COLUMN)
    if teacher is not None:
        lines.append(f"\nteacher (the supervised starting point): {teacher:.3f}")
    return "\n".join(lines) + "\n"


def run_command(args: Any, overrides: dict[str, Any], echo: Callable[[str], None]) -> dict:
    """``monai-cxr-ssl aals-ablation``: ``run_aals_ablation`` with the command's arguments."""
    values = {k: v for k, v in (("ts", args.t), ("a0s", args.a0)) if v is not None}
    return run_aals_ablation(args.configs, overrides, grid=args.grid, bundle=args.bundle, echo=echo, **values)


def run_aals_ablation(
    overlays: Sequence[str],
    overrides: dict[str, Any],
    ts: Sequence[float] = PAPER_TS,
    a0s: Sequence[float] = PAPER_A0S,
    grid: bool = False,
    bundle: str | Path = DEFAULT_BUNDLE,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the teacher and a mean teacher per AALS setting (``aals_settings``) in ``output_dir`` (stages
    ``mean_teacher_t<t>_a<a0>``), then write, log and print ``ablation.md`` (test AUROC, rows t, columns a0)."""
    pairs = aals_settings(ts, a0s, grid)
    steps = teacher_steps()
    for t, a0 in pairs:
        stage = f"{MEAN_TEACHER.name}_{_column(t, a0)}"
        steps += variant(stage, _column(t, a0), aals_t=t, aals_a0=a0)
    pipeline = Pipeline(overlays, overrides, bundle, echo=echo, steps=steps, name="aals-ablation")
    results = pipeline.run()
    table = format_ablation(results["auroc"], pairs)
    results["aals_settings"] = [{"t": t, "a0": a0, "column": _column(t, a0)} for t, a0 in pairs]
    write_json(pipeline.output_dir / "ablation.json", results)
    with atomic_write(pipeline.output_dir / "ablation.md") as f:
        f.write(table)
    client = tracking_client(pipeline.tracking_uri)
    for name in ("ablation.md", "ablation.json"):
        client.log_artifact(results["run_id"], str(pipeline.output_dir / name))
    echo(f"\nAALS ablation (test AUROC of the mean teacher, ten-crop TTA), {pipeline.run_name}:\n{table}")
    return results
