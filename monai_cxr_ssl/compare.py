"""Compare methods across MLflow runs: Table I from the evaluation runs of an experiment, plots, a summary run.

Every stage's evaluation logs a run with the stage's hyperparameters as params (``stage``, ``labeled_fraction``,
``seed``, ``image_size``, ``datasource`` ...) and its test AUROC as metrics (``test_mean_auroc``,
``test_auroc_<class>``). ``compare`` reads them through the MLflow API, keeps the newest finished evaluation per
(stage, λ, seed, dataset) and aggregates over seeds.
"""

from __future__ import annotations

import csv
import io
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
from monai_cxr_ssl.results import class_notes
from monai_cxr_ssl.utils import atomic_write

__all__ = ["column_of", "comparison_notes", "comparison_table", "evaluation_runs", "format_markdown", "run_compare"]

logger = logging.getLogger("monai_cxr_ssl")

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
    ``stage``, ``column``, ``labeled_fraction``, ``seed``), newest per (stage, λ, seed, dataset) only.

    ``filters`` maps MLflow keys (``params.image_size``, ``tags.team``; a bare name means a param) to values;
    ``method`` keeps the stages of one method (``methods.names()``; the teacher is every method's). A stage's
    column is ``methods.column_of``'s.
    """
    if method is not None:
        methods.get(method)  # an unknown method is an error naming the registered ones
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
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
    runs["labeled_fraction"] = runs["params.labeled_fraction"].astype(float)
    runs["seed"] = runs["params.seed"].astype(int)
    runs["dataset"] = runs["params.dataset_fingerprint"] if "params.dataset_fingerprint" in runs else ""
    return runs.drop_duplicates(["stage", "labeled_fraction", "seed", "dataset"], keep="first")


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


def format_csv(rows: Sequence[dict]) -> str:
    """One line per (λ, column): labeled_fraction, column, mean, std, n, seeds."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["labeled_fraction", "column", "mean_auroc", "std_auroc", "runs", "seeds"])
    for row in rows:
        for col, value in row.items():
            if col != "labeled_fraction" and value is not None:
                writer.writerow([row["labeled_fraction"], col, f"{value['mean']:.6f}", f"{value['std']:.6f}",
                                 value["n"], " ".join(map(str, value["seeds"]))])
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


def plot_auroc_vs_lambda(rows: Sequence[dict], path: Path) -> None:
    """Test AUROC (mean ± std over seeds) against λ, one line per column, λ on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for col in [k for k in rows[0] if k != "labeled_fraction"]:
        points = [(r["labeled_fraction"], r[col]) for r in rows if r[col] is not None]
        ax.errorbar([p[0] for p in points], [p[1]["mean"] for p in points], yerr=[p[1]["std"] for p in points],
                    marker="o", capsize=3, label=col)
    ax.set(xscale="log", xlabel="labeled fraction λ", ylabel="test AUROC (mean over classes)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def plot_roc_overlay(runs: pd.DataFrame, path: Path, tracking_uri: str | None) -> list[str]:
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
            ax.plot(fpr, tpr, label=f"{run['column']} λ={run['labeled_fraction']:g} s{run['seed']} "
                                    f"(AUROC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="x-small")
    fig.tight_layout()
    _save(fig, path)
    return missing


def plot_per_class(runs: pd.DataFrame, path: Path) -> bool:
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
        ax.bar(x + i * width, values.to_numpy(dtype=float), width, label=col)
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
    ``per_class_auroc.png`` for multi-label runs) and log it all to a summary run in the first experiment."""
    runs = evaluation_runs(experiment_names, filters, method, tracking_uri)
    if runs.empty:
        raise ValueError(f"no finished test evaluations in experiment(s) {list(experiment_names)} match "
                         f"filters {filters or {}} (method {method}); run `monai-cxr-ssl pipeline` first.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_table(runs)
    markdown = format_markdown(rows, comparison_notes(runs))
    files = {"comparison.md": markdown, "comparison.csv": format_csv(rows)}
    for name, text in files.items():
        with atomic_write(output_dir / name) as f:
            f.write(text)
    plot_auroc_vs_lambda(rows, output_dir / "auroc_vs_lambda.png")
    roc_lambda = min(runs["labeled_fraction"]) if roc_lambda is None else roc_lambda
    chosen = runs[np.isclose(runs["labeled_fraction"], roc_lambda)].sort_values(["column", "seed"])
    chosen = chosen.drop_duplicates("column")
    missing = plot_roc_overlay(chosen, output_dir / "roc.png", tracking_uri)
    if missing:
        logger.warning("no test_predictions.npz artifact in run(s) %s: left out of roc.png", missing)
    plots = ["auroc_vs_lambda.png", "roc.png"]
    if plot_per_class(runs, output_dir / "per_class_auroc.png"):
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
            "summary_run_id": summary.run_id if summary else None}
