"""``monai-cxr-ssl compare``: Table I, CSV, plots and the summary run from real MLflow stores — a local SQLite
store and an ``mlflow server`` started on loopback."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from monai_cxr_ssl import compare as compare_module
from monai_cxr_ssl.compare import comparison_table, evaluation_runs, run_compare
from monai_cxr_ssl.pipeline import plan

AUROC = {  # (stage, λ, seed) -> test AUROC
    ("teacher", 0.05, 0): 0.70, ("teacher", 0.05, 1): 0.74, ("finetune", 0.05, 0): 0.80, ("finetune", 0.05, 1): 0.82,
    ("student", 0.05, 0): 0.72, ("teacher", 0.2, 0): 0.85, ("finetune", 0.2, 0): 0.88,
    ("mean_teacher", 0.05, 0): 0.78,
}


def log_evaluations(client: mlflow.MlflowClient, experiment: str, tmp_path, auroc=AUROC, classes=("A",)) -> None:
    """Evaluation runs as the bundle's evaluate config logs them (params, test metrics, predictions artifact)."""
    rng = np.random.default_rng(0)
    for (stage, fraction, seed), value in auroc.items():
        run = client.create_run(experiment, run_name=f"{stage}-lambda{fraction}-seed{seed}-evaluate").info.run_id
        for key, param in {"stage": stage, "labeled_fraction": fraction, "seed": seed, "eval_split": "test",
                           "image_size": 64, "dataset_fingerprint": "abc"}.items():
            client.log_param(run, key, param)
        client.log_metric(run, "test_mean_auroc", value)
        for k, name in enumerate(classes):
            client.log_metric(run, f"test_auroc_{name}", value - 0.01 * k)
        labels = rng.integers(0, 2, size=(40, len(classes))).astype(np.float32)
        path = tmp_path / "test_predictions.npz"
        np.savez(path, labels=labels, probs=np.clip(labels * value + rng.random(labels.shape) * 0.5, 0, 1))
        client.log_artifact(run, str(path))
        client.set_terminated(run)


def test_compare_tables_each_evaluation_as_the_pipeline_does(tmp_path):
    """Evaluation runs of every stage a pipeline evaluates land in the column the pipeline's results give it, in the
    pipeline's order; another method's filter leaves them out, the teacher's excepted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    for method, rounds in (("teacher_student", 1), ("teacher_student", 3), ("mean_teacher", 1)):
        name = f"{method}-{rounds}"
        experiment = client.create_experiment(name, artifact_location=(tmp_path / name).as_uri())
        evaluated = [step for step in plan(rounds, method) if step.column]
        auroc = [0.5 + i / 100 for i in range(len(evaluated))]
        log_evaluations(client, experiment, tmp_path, {(s.stage, 0.1, 0): v for s, v in zip(evaluated, auroc,
                                                                                             strict=True)})
        for kept in (None, method):
            (row,) = comparison_table(evaluation_runs([name], method=kept, tracking_uri=uri))
            assert list(row)[1:] == [s.column for s in evaluated]
            assert [row[s.column]["mean"] for s in evaluated] == pytest.approx(auroc)
        other = next(m for m in ("teacher_student", "mean_teacher") if m != method)
        (row,) = comparison_table(evaluation_runs([name], method=other, tracking_uri=uri))
        assert list(row) == ["labeled_fraction", "teacher"]


def test_a_labeled_per_class_run_is_compared_at_the_share_it_labeled(tmp_path):
    """Its labeled_fraction param is the unused default; its row is the share of training images it labeled."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("per_class", artifact_location=(tmp_path / "a").as_uri())
    log_evaluations(client, experiment, tmp_path, {("teacher", 0.1, 0): 0.6, ("teacher", 0.1, 1): 0.8})
    for run in client.search_runs([experiment]):
        per_class = run.data.params["seed"] == "1"
        for key, value in {"labeled_per_class": 10 if per_class else None, "num_labeled": 20 if per_class else 40,
                           "num_unlabeled": 380 if per_class else 360}.items():
            client.log_param(run.info.run_id, key, value)
    rows = comparison_table(evaluation_runs(["per_class"], tracking_uri=uri))
    assert [(r["labeled_fraction"], r["teacher"]["mean"]) for r in rows] == [(0.05, 0.8), (0.1, 0.6)]


def test_compare_on_a_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cxr", artifact_location=(tmp_path / "artifacts").as_uri())
    log_evaluations(client, experiment, tmp_path)
    # a superseded (killed) evaluation and an older duplicate must not count
    killed = client.create_run(experiment, run_name="teacher-lambda0.05-seed0-evaluate-superseded").info.run_id
    for key, param in {"stage": "teacher", "labeled_fraction": 0.05, "seed": 0, "eval_split": "test"}.items():
        client.log_param(killed, key, param)
    client.log_metric(killed, "test_mean_auroc", 0.1)
    client.set_terminated(killed, "KILLED")

    result = run_compare(["cxr"], tmp_path / "out", tracking_uri=uri)
    low = result["rows"][0]
    assert low["labeled_fraction"] == 0.05 and low["teacher"]["n"] == 2
    assert low["teacher"]["mean"] == pytest.approx(0.72) and low["teacher"]["std"] == pytest.approx(0.0282842712)
    assert low["student"]["mean"] == pytest.approx(0.81) and low["intermediate"]["n"] == 1
    assert result["rows"][1]["intermediate"] is None and result["num_runs"] == len(AUROC)
    assert result["markdown"].splitlines()[0] == "| labeled | teacher | intermediate | student | mean teacher |"
    assert "| 5% | 0.720 ± 0.028 (n=2) | 0.720 ± 0.000 (n=1) | 0.810 ± 0.014 (n=2) | 0.780 ± 0.000 (n=1) |" in \
        result["markdown"]
    csv_lines = (tmp_path / "out" / "comparison.csv").read_text().splitlines()
    assert csv_lines[0] == "labeled_fraction,column,mean_auroc,std_auroc,runs,seeds,note"
    assert "0.05,teacher,0.720000,0.028284,2,0 1," in csv_lines  # no note: no pipeline runs to tell apart
    for name in ("auroc_vs_lambda.png", "roc.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    summary = client.get_run(result["summary_run_id"])
    artifacts = {a.path for a in client.list_artifacts(result["summary_run_id"])}
    assert {"comparison.md", "comparison.csv", "auroc_vs_lambda.png", "roc.png"} <= artifacts
    assert summary.data.params["num_runs"] == str(len(AUROC))

    # filters: one method, one λ; a summary run never counts as an evaluation
    mean_teacher = run_compare(["cxr"], tmp_path / "mt", method="mean_teacher", tracking_uri=uri, log_summary=False)
    assert set(mean_teacher["rows"][0]) == {"labeled_fraction", "teacher", "mean teacher"}
    only = run_compare(["cxr"], tmp_path / "l2", {"params.labeled_fraction": "0.2"}, tracking_uri=uri,
                       log_summary=False)
    assert [r["labeled_fraction"] for r in only["rows"]] == [0.2]
    with pytest.raises(ValueError, match="no finished test evaluations"):
        run_compare(["cxr"], tmp_path / "none", {"image_size": "512"}, tracking_uri=uri)
    with pytest.raises(ValueError, match=r"experiment\(s\) \['nope'\] not found"):
        run_compare(["nope"], tmp_path / "none", tracking_uri=uri)
    missing = tmp_path / "runs" / "mlflow.db"
    with pytest.raises(ValueError, match=rf"no MLflow store at sqlite:///{missing}: .*--tracking-uri"):
        run_compare(["cxr"], tmp_path / "none", tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # reading does not make an empty store


def test_per_class_bars_for_multilabel_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cxr14", artifact_location=(tmp_path / "artifacts").as_uri())
    log_evaluations(client, experiment, tmp_path, {("teacher", 0.1, 0): 0.7, ("finetune", 0.1, 0): 0.75},
                    classes=("Effusion", "Mass", "Nodule"))
    result = run_compare(["cxr14"], tmp_path / "out", tracking_uri=uri, log_summary=False)
    assert "per_class_auroc.png" in result["files"]
    assert (tmp_path / "out" / "per_class_auroc.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_compare_command_against_an_mlflow_server(mlflow_server, tmp_path):
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment("cxr")
    log_evaluations(client, experiment, tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    done = subprocess.run(
        [sys.executable, "-m", "monai_cxr_ssl.cli", "compare", "cxr", "--method", "teacher_student",
         "--output-dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 5% | 0.720 ± 0.028 (n=2) | 0.720 ± 0.000 (n=1) | 0.810 ± 0.014 (n=2) |" in done.stdout
    assert "mean teacher" not in done.stdout
    summaries = client.search_runs([experiment], "attributes.run_name = 'compare'")
    assert len(summaries) == 1
    assert "roc.png" in {a.path for a in client.list_artifacts(summaries[0].info.run_id)}


def test_comparison_table_names_covered_classes_and_flags_few_positives(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cxr14", artifact_location=(tmp_path / "artifacts").as_uri())
    log_evaluations(client, experiment, tmp_path, {("teacher", 0.1, 0): 0.7, ("finetune", 0.1, 0): 0.75},
                    classes=("Effusion", "Mass"))
    for run in client.search_runs([experiment]):  # as AUROCReport logs them; Hernia's test AUROC is undefined
        client.log_param(run.info.run_id, "classes", "Effusion,Mass,Hernia")
        for name, n in (("Effusion", 40), ("Mass", 6), ("Hernia", 0)):
            client.log_metric(run.info.run_id, f"test_positives_{name}", n)
    result = run_compare(["cxr14"], tmp_path / "out", tracking_uri=uri, log_summary=False)
    lines = result["markdown"].splitlines()
    assert lines[-2:] == [
        "Mean AUROC over 2 class(es): Effusion, Mass; left out (test AUROC undefined, one label value only): Hernia.",
        "Fewer than 10 positive test images (AUROC uncertain): Mass (6).",
    ]
    assert (tmp_path / "out" / "comparison.md").read_text() == result["markdown"]


def _pipeline_run(client, experiment: str, output_dir: str, **overrides) -> str:
    """A parent run as ``Pipeline`` tags it: the overlays and overrides it was given."""
    run = client.create_run(experiment, run_name="pipeline-lambda0.05-seed0").info.run_id
    client.set_tag(run, "overlays", json.dumps(["kermany", "cpu_small"]))
    client.set_tag(run, "overrides", json.dumps({"output_dir": output_dir, "labeled_fraction": 0.05, **overrides}))
    return run


def test_compare_warns_when_a_row_mixes_runs_of_different_settings(tmp_path, monkeypatch):
    """A 1-epoch sweep's teacher (newest, so kept) beside a mean teacher trained after a 25-epoch teacher: the row
    pairs two experiments. A pipeline with the same settings in another folder is no warning. Every plot draws a
    model in one colour."""
    import matplotlib.colors

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("mix", artifact_location=(tmp_path / "artifacts").as_uri())
    long_run = _pipeline_run(client, experiment, "runs/mt", method="mean_teacher")
    same = _pipeline_run(client, experiment, "runs/mt2", method="mean_teacher", num_workers=8)
    sweep = _pipeline_run(client, experiment, "runs/sweep/lambda0.05-seed0", num_epochs=1, student_epochs=1)
    for stage, parent in (("mean_teacher", long_run), ("finetune", same), ("teacher", sweep)):  # oldest first
        log_evaluations(client, experiment, tmp_path, {(stage, 0.05, 0): 0.7})
        (run,) = client.search_runs([experiment], f"params.stage = '{stage}'")
        client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
    figures = []
    save = compare_module._save
    monkeypatch.setattr(compare_module, "_save", lambda fig, path: (figures.append(fig), save(fig, path)))

    done = run_compare(["mix"], tmp_path / "out", tracking_uri=uri, log_summary=False)
    (warning,) = done["warnings"]
    assert warning.startswith("λ=0.05, seed 0 mixes runs of different settings: teacher from "
                              "runs/sweep/lambda0.05-seed0; student from runs/mt2; mean teacher from runs/mt")
    assert "num_epochs: 1 vs (default) vs (default)" in warning and "num_workers" not in warning
    assert f"Warning: {warning}" in (tmp_path / "out" / "comparison.md").read_text()
    with open(tmp_path / "out" / "comparison.csv") as f:
        notes = {row["column"]: row["note"] for row in csv.DictReader(f)}
    assert notes["teacher"] == "seed 0: from runs/sweep/lambda0.05-seed0, beside runs with other num_epochs, " \
                               "student_epochs"
    assert notes["mean teacher"].startswith("seed 0: from runs/mt,")

    # one colour per model in every plot: the error bars of auroc_vs_lambda, the curves of roc
    errorbars = {c.get_label(): matplotlib.colors.to_hex(c.lines[0].get_color()) for c in figures[0].axes[0].containers}
    curves = {line.get_label().split(" λ=")[0]: matplotlib.colors.to_hex(line.get_color())
              for line in figures[1].axes[0].get_lines() if " λ=" in line.get_label()}
    assert errorbars == curves and set(curves) == {"teacher", "student", "mean teacher"}, (errorbars, curves)
    assert len(set(curves.values())) == 3
