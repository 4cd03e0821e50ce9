"""Compare methods across MLflow runs: Table I from the evaluation runs of an experiment, plots, a summary run.

Every stage's evaluation logs a run with the stage's hyperparameters as params (``stage``, ``labeled_fraction``,
``seed``, ``image_size``, ``datasource`` ...) and its test AUROC as metrics (``test_mean_auroc``,
``test_auroc_<class>``). ``compare`` reads them through the MLflow API, keeps the newest finished evaluation per
(stage, λ, seed, dataset) and aggregates over seeds. A row whose models come from pipeline runs with different
settings (a 1-epoch sweep's teacher beside a 25-epoch run's mean teacher) is named in a warning and in the notes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from monai_cxr_ssl import methods
from monai_cxr_ssl.methods import column_of
from monai_cxr_ssl.results import COLUMN_TAG, class_notes
from monai_cxr_ssl.settings import check_tracking_uri
from monai_cxr_ssl.utils import atomic_write

__all__ = ["column_of", "comparison_notes", "comparison_table", "evaluation_runs", "format_markdown", "mixed_runs",
           "run_compare"]

logger = logging.getLogger("monai_cxr_ssl")

PARENT_TAG = "tags.mlflow.parentRunId"  # the pipeline run a stage's run belongs to (mlflow_tags.MLFLOW_PARENT_RUN_ID)
# pipeline settings that say where a run writes or how it is tracked, not what it trains
_NOT_COMPARED = {"output_dir", "tracking_uri", "experiment_name", "num_workers", "method", "rounds", "dataset_dir"}


def _search(client: mlflow.MlflowClient, experiment_ids: list[str], filter_string: str) -> pd.DataFrame:
    """All runs matching ``filter_string``, newest first, flattened as ``mlflow.search_runs`` does."""
    records, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        for run in page:
            records.append({
                "run_id": run.info.run_id, "run_name": run.info.run_name, "start_time": run.info.start_time,
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
                **{f"tags.{k}": v for k, v in run.data.tags.items()},
            })
        token = page.token
        if not token:
            return pd.DataFrame.from_records(records)


def evaluation_runs(
    experiment_names: Sequence[str],
    filters: dict[str, str] | None = None,
    method: str | None = None,
    tracking_uri: str | None = None,
) -> pd.DataFrame:
    """The finished test evaluations of ``experiment_names`` as a DataFrame (``mlflow.search_runs`` columns plus
    ``stage``, ``column``, ``labeled_fraction``, ``seed``), newest per (column, λ, seed, dataset) only. A run made
    with ``labeled_per_class`` has as λ the share of its training images that were labeled (4 decimals).

    ``filters`` maps MLflow keys (``params.image_size``, ``tags.team``; a bare name means a param) to values;
    ``method`` keeps the stages of one method (``methods.names()``; the teacher is every method's). A stage's
    column is the one its pipeline tagged it with (``results.COLUMN_TAG``: ``simclr + teacher`` after a
    pre-training), else ``methods.column_of``'s.
    """
    if method is not None:
        methods.get(method)  # an unknown method is an error naming the registered ones
    uri = tracking_uri or mlflow.get_tracking_uri()
    check_tracking_uri(uri, "--tracking-uri")
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():  # reading must not make one
        raise ValueError(f"no MLflow store at {uri}: each run keeps its store in its output folder; pass "
                         "--tracking-uri sqlite:///<output_dir>/mlflow.db (e.g. sqlite:///$PWD/runs/sweep/mlflow.db).")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = {name: client.get_experiment_by_name(name) for name in experiment_names}
    missing = [name for name, experiment in experiments.items() if experiment is None]
    if missing:
        known = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"experiment(s) {missing} not found in {client.tracking_uri}; it has {known}.")
    clauses = ["attributes.status = 'FINISHED'", "params.eval_split = 'test'"]
    for key, value in (filters or {}).items():
        key = key if "." in key else f"params.{key}"
        clauses.append(f"{key} = '{value}'")
    runs = _search(client, [e.experiment_id for e in experiments.values()], " and ".join(clauses))
    if runs.empty or "metrics.test_mean_auroc" not in runs:
        return pd.DataFrame()
    runs = runs[runs["metrics.test_mean_auroc"].notna()].copy()
    runs["stage"] = runs["params.stage"]
    if method is not None:
        runs = runs[runs["stage"].map(lambda s: methods.belongs_to(method, str(s)))]
    runs["column"] = runs["stage"].map(column_of)
    if f"tags.{COLUMN_TAG}" in runs:  # a pipeline's column, such as a pre-trained model's (simclr + teacher)
        tagged = runs[f"tags.{COLUMN_TAG}"]
        runs["column"] = tagged.where(tagged.notna(), runs["column"])
    runs["labeled_fraction"] = runs["params.labeled_fraction"].astype(float)
    if "params.labeled_per_class" in runs:  # its labeled_fraction is unused: its λ is the share it labeled
        per_class = runs["params.labeled_per_class"].notna() & (runs["params.labeled_per_class"] != "None")
        labeled = runs["params.num_labeled"].astype(float)
        share = (labeled / (labeled + runs["params.num_unlabeled"].astype(float))).round(4)
        runs["labeled_fraction"] = runs["labeled_fraction"].where(~per_class, share)
    runs["seed"] = runs["params.seed"].astype(int)
    runs["dataset"] = runs["params.dataset_fingerprint"] if "params.dataset_fingerprint" in runs else ""
    return runs.drop_duplicates(["column", "labeled_fraction", "seed", "dataset"], keep="first")


def comparison_table(runs: pd.DataFrame) -> list[dict]:
    """Rows per λ (ascending): ``{"labeled_fraction", column: {"mean", "std", "n", "seeds"}}``; std is the sample
    standard deviation over seeds (0 for one)."""
    columns = sorted(set(runs["column"]), key=methods.column_order)
    rows = []
    for fraction, group in runs.groupby("labeled_fraction", sort=True):
        row: dict = {"labeled_fraction": float(fraction)}
        for col in columns:
            values = group.loc[group["column"] == col, "metrics.test_mean_auroc"].to_numpy(dtype=float)
            seeds = sorted(group.loc[group["column"] == col, "seed"])
            row[col] = None if len(values) == 0 else {
                "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "n": int(len(values)), "seeds": seeds,
            }
        rows.append(row)
    return rows


def _label(fraction: float) -> str:
    return "100% (supervised)" if fraction >= 1 else f"{fraction * 100:g}%"


def _cell(value: dict | None) -> str:
    if value is None:
        return "-"
    return f"{value['mean']:.3f} ± {value['std']:.3f} (n={value['n']})"


def format_markdown(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
    """Table I layout: ``| labeled | <column> ... |`` with ``mean ± std (n=runs)`` cells; ``notes``
    (``comparison_notes``) follow the table as lines of their own."""
    cols = [k for k in rows[0] if k != "labeled_fraction"] if rows else []
    lines = ["| labeled | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {_label(r['labeled_fraction'])} | " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def comparison_notes(runs: pd.DataFrame) -> list[str]:
    """``results.class_notes`` for evaluation runs: the classes each run's ``test_mean_auroc`` covers (those with a
    ``test_auroc_<class>`` metric, out of its ``classes`` param) and their ``test_positives_<class>`` counts."""
    coverages = []
    for _, run in runs.iterrows():
        logged = [c.removeprefix("metrics.test_auroc_") for c in runs.columns
                  if c.startswith("metrics.test_auroc_") and pd.notna(run[c])]
        param = run.get("params.classes")
        classes = str(param).split(",") if isinstance(param, str) and param else logged
        positives = {c: run.get(f"metrics.test_positives_{c}") for c in classes}
        coverages.append({
            "covered": [c for c in classes if c in logged],
            "left_out": [c for c in classes if c not in logged],
            "positives": {c: None if v is None or pd.isna(v) else int(v) for c, v in positives.items()},
        })
    return class_notes(coverages)


def _pipeline_settings(client: mlflow.MlflowClient, run_id: str) -> dict | None:
    """The settings a pipeline run was given (its ``overlays`` and ``overrides`` tags, less bookkeeping) and its
    output folder; None for a run that is not a pipeline's."""
    try:
        tags = client.get_run(run_id).data.tags
    except mlflow.exceptions.MlflowException:
        return None
    if "overrides" not in tags:
        return None
    overrides = json.loads(tags["overrides"])
    settings = {k: v for k, v in overrides.items() if k not in _NOT_COMPARED}
    return {"where": str(overrides.get("output_dir", run_id)),
            "settings": {"overlays": json.loads(tags.get("overlays", "[]")), **settings}}


def mixed_runs(runs: pd.DataFrame, tracking_uri: str | None = None) -> list[dict]:
    """The (λ, seed) pairs whose columns come from pipeline runs given different settings: ``{"labeled_fraction",
    "seed", "columns": {column: output folder}, "differ": {setting: [value per pipeline]}, "message"}``.

    Stage runs name their pipeline run (``mlflow.parentRunId``), which records the settings it was given; runs
    outside a pipeline are not checked. A setting left at its default shows as ``(default)``.
    """
    if PARENT_TAG not in runs:
        return []
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    pipelines = {pid: _pipeline_settings(client, pid) for pid in runs[PARENT_TAG].dropna().unique()}
    found = []
    for (fraction, seed, _), group in runs.groupby(["labeled_fraction", "seed", "dataset"], sort=True):
        by_pipeline: dict[str, list[str]] = {}
        for _, run in group.sort_values("column", key=lambda c: c.map(methods.column_order)).iterrows():
            if pipelines.get(run[PARENT_TAG]) is not None:
                by_pipeline.setdefault(run[PARENT_TAG], []).append(run["column"])
        if len(by_pipeline) < 2:
            continue
        settings = [pipelines[pid]["settings"] for pid in by_pipeline]
        keys = sorted(set().union(*settings), key=lambda k: (k != "overlays", k))
        differ = {k: [s.get(k, "(default)") for s in settings] for k in keys
                  if len({json.dumps(s.get(k, "(default)"), sort_keys=True) for s in settings}) > 1}
        if not differ:
            continue
        columns = {col: pipelines[pid]["where"] for pid, cols in by_pipeline.items() for col in cols}
        parts = "; ".join(f"{', '.join(cols)} from {pipelines[pid]['where']}" for pid, cols in by_pipeline.items())
        settings_text = "; ".join(f"{k}: {' vs '.join(map(str, v))}" for k, v in differ.items())
        found.append({"labeled_fraction": float(fraction), "seed": int(seed), "columns": columns, "differ": differ,
                      "message": f"λ={fraction:g}, seed {seed} mixes runs of different settings: {parts} "
                                 f"(different {settings_text}); compare them with care or re-run them alike."})
    return found


def format_csv(rows: Sequence[dict], mixed: Sequence[dict] = ()) -> str:
    """One line per (λ, column): labeled_fraction, column, mean, std, n, seeds, and a note when the cell's runs
    sit in a row beside runs of other settings (``mixed_runs``)."""
    notes: dict[tuple[float, str], list[str]] = {}
    for m in mixed:
        for col, where in m["columns"].items():
            notes.setdefault((m["labeled_fraction"], col), []).append(
                f"seed {m['seed']}: from {where}, beside runs with other {', '.join(m['differ'])}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["labeled_fraction", "column", "mean_auroc", "std_auroc", "runs", "seeds", "note"])
    for row in rows:
        for col, value in row.items():
            if col != "labeled_fraction" and value is not None:
                writer.writerow([row["labeled_fraction"], col, f"{value['mean']:.6f}", f"{value['std']:.6f}",
                                 value["n"], " ".join(map(str, value["seeds"])),
                                 "; ".join(notes.get((row["labeled_fraction"], col), []))])
    return out.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    _pyplot().close(fig)


def colours(columns: Sequence[str]) -> dict[str, str]:
    """One colour per model column, the same in every plot (matplotlib's cycle, in Table I's column order)."""
    ordered = sorted(set(columns), key=methods.column_order)
    return {col: f"C{i % 10}" for i, col in enumerate(ordered)}


def plot_auroc_vs_lambda(rows: Sequence[dict], path: Path, colour: dict[str, str]) -> None:
    """Test AUROC (mean ± std over seeds) against λ, one line per column, λ on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for col in [k for k in rows[0] if k != "labeled_fraction"]:
        points = [(r["labeled_fraction"], r[col]) for r in rows if r[col] is not None]
        ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points],
                    marker="o", capsize=3, label=col, color=colour[col])
    ax.set(xscale="log", xlabel="labeled fraction λ", ylabel="test AUROC (mean over classes)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def plot_roc_overlay(runs: pd.DataFrame, path: Path, tracking_uri: str | None, colour: dict[str, str]) -> list[str]:
    """ROC curves (first class) of ``runs`` overlaid, from their ``test_predictions.npz`` artifacts; returns the
    run ids that had none."""
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    missing = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, run in runs.iterrows():
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run["run_id"], artifact_path="test_predictions.npz",
                                                            dst_path=tmp, tracking_uri=tracking_uri)
            except (mlflow.exceptions.MlflowException, OSError):
                missing.append(run["run_id"])
                continue
            data = np.load(local)
            fpr, tpr, _ = roc_curve(data["labels"][:, 0], data["probs"][:, 0])
            ax.plot(fpr, tpr, color=colour[run["column"]], label=f"{run['column']} λ={run['labeled_fraction']:g} "
                                                                 f"s{run['seed']} (AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="x-small")
    fig.tight_layout()
    _save(fig, path)
    return missing


def plot_per_class(runs: pd.DataFrame, path: Path, colour: dict[str, str]) -> bool:
    """Bars of per-class test AUROC (mean over the runs of each column); False when the runs have one class."""
    class_cols = [c for c in runs.columns if c.startswith("metrics.test_auroc_")]
    if len(class_cols) < 2:
        return False
    means = runs.groupby("column", sort=False)[class_cols].mean()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(class_cols) * 0.6), 4), dpi=100)
    width = 0.8 / len(means)
    x = np.arange(len(class_cols))
    for i, (col, values) in enumerate(means.iterrows()):
        ax.bar(x + i * width, values.to_numpy(dtype=float), width, label=col, color=colour[col])
    ax.set_xticks(x + 0.4 - width / 2, [c.removeprefix("metrics.test_auroc_") for c in class_cols], rotation=45,
                  ha="right")
    ax.set(ylabel="test AUROC", ylim=(0.5, 1.0))
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return True


def run_compare(
    experiment_names: Sequence[str],
    output_dir: str | os.PathLike,
    filters: dict[str, str] | None = None,
    method: str | None = None,
    roc_lambda: float | None = None,
    tracking_uri: str | None = None,
    log_summary: bool = True,
) -> dict:
    """Build the comparison of ``experiment_names`` into ``output_dir`` (``comparison.md``, ``comparison.csv``,
    ``auroc_vs_lambda.png``, ``roc.png`` for the runs at ``roc_lambda`` (default: the smallest λ),
    ``per_class_auroc.png`` for multi-label runs; one colour per model in all) and log it all to a summary run in
    the first experiment. ``warnings`` in the result name the rows that mix runs of different settings."""
    runs = evaluation_runs(experiment_names, filters, method, tracking_uri)
    if runs.empty:
        raise ValueError(f"no finished test evaluations in experiment(s) {list(experiment_names)} match "
                         f"filters {filters or {}} (method {method}); run `monai-cxr-ssl pipeline` first.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_table(runs)
    mixed = mixed_runs(runs, tracking_uri)
    for m in mixed:
        logger.warning("%s", m["message"])
    markdown = format_markdown(rows, [*comparison_notes(runs), *(f"Warning: {m['message']}" for m in mixed)])
    files = {"comparison.md": markdown, "comparison.csv": format_csv(rows, mixed)}
    for name, text in files.items():
        with atomic_write(output_dir / name) as f:
            f.write(text)
    colour = colours(runs["column"])
    plot_auroc_vs_lambda(rows, output_dir / "auroc_vs_lambda.png", colour)
    roc_lambda = min(runs["labeled_fraction"]) if roc_lambda is None else roc_lambda
    chosen = runs[np.isclose(runs["labeled_fraction"], roc_lambda)].sort_values(["column", "seed"])
    chosen = chosen.drop_duplicates("column")
    missing = plot_roc_overlay(chosen, output_dir / "roc.png", tracking_uri, colour)
    if missing:
        logger.warning("no test_predictions.npz artifact in run(s) %s: left out of roc.png", missing)
    plots = ["auroc_vs_lambda.png", "roc.png"]
    if plot_per_class(runs, output_dir / "per_class_auroc.png", colour):
        plots.append("per_class_auroc.png")
    summary = None
    if log_summary:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(experiment_names[0]).experiment_id
        summary = client.create_run(experiment, run_name="compare", tags={"monai_cxr_ssl.summary": "compare"}).info
        client.log_param(summary.run_id, "experiments", ",".join(experiment_names))
        client.log_param(summary.run_id, "filters", repr(filters or {}))
        client.log_param(summary.run_id, "method", str(method))
        client.log_param(summary.run_id, "num_runs", len(runs))
        for name in [*files, *plots]:
            client.log_artifact(summary.run_id, str(output_dir / name))
        client.set_terminated(summary.run_id)
    return {"rows": rows, "markdown": markdown, "num_runs": len(runs), "files": [*files, *plots],
            "summary_run_id": summary.run_id if summary else None, "warnings": [m["message"] for m in mixed]}
