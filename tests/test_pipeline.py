"""The one-command pipeline: plan, overrides, stage keys, Table I, and end-to-end runs through the console script
(killed with SIGKILL and resumed, re-run with a changed setting, a λ × seed sweep with an empty unlabeled split)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import PAUSE_AFTER_EPOCH_1, wait_for_pause

from monai_cxr_ssl.compare import run_compare
from monai_cxr_ssl.pipeline import metric_name, plan, split_overrides, used_config
from monai_cxr_ssl.results import format_table1, table1
from monai_cxr_ssl.workflow import make_workflow

SUFFIX = "-lambda0.4-seed0"


def _chained(steps) -> None:
    """Every step reads only what steps before it made, and the ids that name the stages it reads name its inputs."""
    made: list[str] = []
    for step in steps:
        assert set(step.inputs) <= set(made), (step.name, step.inputs, made)
        assert set(step.settings.values()) <= set(step.inputs), step
        made += [step.name, step.stage]


def test_rounds_chain_each_round_to_the_previous_rounds_student():
    for rounds in (1, 2, 3):
        steps = plan(rounds)
        _chained(steps)
        names = [s.name for s in steps]
        assert len(names) == len(set(names))
        # per round a pseudo-label stage reading the previous round's model, one more trained model per stage read
        pseudo = [s for s in steps if "teacher_stage" in s.settings]
        assert len(pseudo) == rounds
        assert pseudo[0].inputs == ("teacher",)
        for later in pseudo[1:]:
            # the round's teacher is the last model trained before its pseudo-labels: the fine-tuned student
            trained = [s for s in steps[:names.index(later.name)] if s.column is None and s not in pseudo]
            assert later.inputs == (trained[-1].stage,) and trained[-1].stage.startswith("finetune")
        # every model is evaluated once, right after it is trained, under a column of its own
        evaluations = [s for s in steps if s.column]
        assert [s.stage for s in evaluations] == [s.stage for s in steps if s.column is None and s not in pseudo]
        assert len({s.column for s in evaluations}) == len(evaluations) == 1 + 2 * rounds
        for s in evaluations:
            assert s.kinds[-1] == "evaluate" and s.kinds[0] in steps[names.index(s.stage)].kinds
    with pytest.raises(ValueError, match="rounds"):
        plan(0)


def test_plan_of_the_mean_teacher_method():
    steps = plan(method="mean_teacher")
    _chained(steps)
    trained = [s for s in steps if s.column is None]
    assert [s.stage for s in trained][0] == "teacher" and trained[-1].settings == {"init_stage": "teacher"}
    assert steps[-1].stage == trained[-1].stage and steps[-1].column == "mean teacher"
    with pytest.raises(ValueError, match="method must be one of"):
        plan(method="fixmatch")
    with pytest.raises(ValueError, match="rounds applies to the teacher_student method only"):
        plan(2, "mean_teacher")


def test_aals_ablation_settings():
    from monai_cxr_ssl.methods.mean_teacher.ablation import aals_settings, format_ablation

    pairs = aals_settings()  # the paper's tables: t varied at a0 = 4, a0 varied at t = 0.4
    assert pairs == [(0.2, 4.0), (0.3, 4.0), (0.4, 4.0), (0.5, 4.0), (0.4, 1.0), (0.4, 8.0), (0.4, 16.0)]
    assert len(aals_settings(grid=True)) == 16
    with pytest.raises(ValueError, match="AALS centre t must be in"):
        aals_settings(ts=[0.0])
    table = format_ablation({"teacher": 0.8, "t0.2_a4": 0.81, "t0.4_a1": 0.79, "t0.4_a4": 0.83},
                            [(0.2, 4.0), (0.4, 1.0), (0.4, 4.0)])
    assert "| 0.2 | - | 0.810 |" in table and "| 0.4 | 0.790 | 0.830 |" in table and "teacher" in table


def test_column_names_become_valid_mlflow_metric_keys(tmp_path):
    key = metric_name("test_auroc_mean teacher a0=1 (10%)")
    assert key == "test_auroc_mean_teacher_a0_1__10__"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("keys")).info.run_id
    client.log_metric(run, key, 0.5)  # MLflow refuses "=", "(" and "%"
    assert client.get_run(run).data.metrics == {key: 0.5}


def test_split_overrides():
    common, per_kind = split_overrides({"num_epochs": 2, "student:num_epochs": 3, "train::trainer#max_epochs": 1})
    assert common == {"num_epochs": 2, "train::trainer#max_epochs": 1}
    assert per_kind["student"] == {"num_epochs": 3} and per_kind["teacher"] == {}
    with pytest.raises(ValueError, match="unknown stage 'studnet'"):
        split_overrides({"studnet:num_epochs": 3})


def test_stage_keys_cover_only_the_settings_a_stage_uses():
    teacher = used_config(make_workflow(["train"], keep_fraction=0.5, num_workers=3).parser)
    pseudo = used_config(make_workflow(["pseudo_label"], keep_fraction=0.5).parser)
    assert "num_epochs" in teacher and "labeled_fraction" in teacher and "datasource" in teacher
    assert "keep_fraction" not in teacher and "num_workers" not in teacher and "tracking_uri" not in teacher
    assert pseudo["keep_fraction"] == 0.5 and "max_unlabeled" in pseudo
    student = used_config(make_workflow(["student"], student_epochs=7).parser)
    assert student["student_epochs"] == 7


def test_table1_mean_and_std_over_seeds():
    results = [
        {"labeled_fraction": 0.05, "seed": 0, "auroc": {"teacher": 0.70, "intermediate": 0.72, "student": 0.80}},
        {"labeled_fraction": 0.05, "seed": 1, "auroc": {"teacher": 0.74, "intermediate": 0.76, "student": 0.82}},
        {"labeled_fraction": 1.0, "seed": 0, "auroc": {"teacher": 0.9, "intermediate": None, "student": None}},
    ]
    rows = table1(results)
    assert [r["labeled_fraction"] for r in rows] == [0.05, 1.0]
    assert rows[0]["teacher"] == pytest.approx((0.72, 0.0282842712))
    assert rows[1]["student"] is None and rows[1]["teacher"] == (0.9, 0.0)
    text = format_table1(rows)
    assert "| 5% | 0,1 | 0.720 ± 0.028 | 0.740 ± 0.028 | 0.810 ± 0.014 |" in text
    assert "| 100% (supervised) | 0 | 0.900 | - | - |" in text
    mean_teacher = table1([{"labeled_fraction": 0.05, "seed": 0, "auroc": {"teacher": 0.7, "mean teacher": 0.75}}])
    assert "| labeled | seeds | teacher | mean teacher |" in format_table1(mean_teacher)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("pipeline")
    data = make_synthetic_dataset(root / "data", n_train=80, n_test=30, image_size=48, prevalence=0.4, seed=2)
    settings = {
        "dataset_dir": data, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment_name": "pipeline",
        "image_size": 40, "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.4, "num_workers": 0,
        "num_epochs": 1,
    }
    return root, settings


def _command(command: str, settings: dict, *extra: str) -> list[str]:
    return [sys.executable, "-m", "monai_cxr_ssl.cli", command, "demo", *extra, "--set",
            *(f"{k}={v}" for k, v in settings.items())]


def _pipeline(settings: dict, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_command("pipeline", settings, *extra), cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _lines(output: str) -> dict[str, str]:
    """Step name -> what the pipeline said about it (``[3/12] student: skipped...``)."""
    steps = {}
    for line in output.splitlines():
        if line.startswith("[") and "] " in line:
            name, _, said = line.split("] ", 1)[1].partition(": ")
            steps[name] = said
    return steps


@pytest.mark.slow
def test_pipeline_killed_and_resumed_then_rerun_with_a_changed_setting(tiny):
    root, settings = tiny
    out = root / "out"
    settings = {**settings, "output_dir": out, "rounds": 2, "student:num_epochs": 3, "pause_file": root / "pause",
                "pause_stage": "student"}
    pause = str(PAUSE_AFTER_EPOCH_1)
    proc = subprocess.Popen(_command("pipeline", settings, pause), cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # Kill it in the middle of the student's training, paused after its epoch 1 (no race with a fast stage): the
    # teacher and pseudo-label stages are finished by then.
    wait_for_pause(proc, root / "pause")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "student" / ".student.done.json").exists()
    teacher_marker = (out / "teacher" / ".train.done.json").read_bytes()
    teacher_model = (out / "teacher" / "models" / "model.pt").stat().st_mtime_ns
    pseudo_labels = (out / "pseudo_label" / "pseudo_labels.jsonl").stat().st_mtime_ns

    said = _lines(_pipeline(settings, root, pause).stdout)
    for name in ("teacher", "teacher/evaluate", "pseudo_label"):
        assert said[name].startswith("done earlier"), (name, said[name])
    assert said["student"].startswith("resuming an interrupted run")
    for name in ("student/evaluate", "finetune", "pseudo_label_r2", "student_r2", "finetune_r2/evaluate"):
        assert said[name] == "running", (name, said[name])
    assert (out / "teacher" / ".train.done.json").read_bytes() == teacher_marker
    assert (out / "teacher" / "models" / "model.pt").stat().st_mtime_ns == teacher_model
    assert (out / "pseudo_label" / "pseudo_labels.jsonl").stat().st_mtime_ns == pseudo_labels

    results = json.loads((out / "results.json").read_text())
    assert set(results["auroc"]) == {"teacher", "intermediate", "student", "intermediate r2", "student r2"}
    assert all(0.0 <= v <= 1.0 for v in results["auroc"].values())
    # round 2 learns from the fine-tuned student of round 1
    header = json.loads((out / "pseudo_label_r2" / "pseudo_labels.jsonl").read_text().splitlines()[0])
    assert header["teacher_checkpoint"].endswith("finetune/models/model.pt")
    assert "| 40% | 0 |" in (out / "table1.md").read_text()

    # MLflow: one parent run, a nested run per stage, the table as an artifact
    client = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"])
    experiment = client.get_experiment_by_name("pipeline").experiment_id
    runs = client.search_runs([experiment], filter_string=f"attributes.run_name LIKE '%{SUFFIX}%'")
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    parent = by_name[f"pipeline{SUFFIX}"][0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_auroc_student_r2"] == pytest.approx(results["auroc"]["student r2"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"table1.md", "results.json"}
    stages = {n: r for n, r in by_name.items() if not n.startswith("pipeline")}
    # one MLflow run per step the pipeline reported, named after its stage
    assert set(stages) == {f"{name.removesuffix('/evaluate')}{SUFFIX}{'-evaluate' * name.endswith('/evaluate')}"
                           for name in said}
    assert len(by_name[f"student{SUFFIX}"]) == 1  # the killed student run was continued, not duplicated
    for name, group in stages.items():
        assert group[0].data.tags.get("mlflow.parentRunId") == parent.info.run_id, name
        assert group[0].info.status == "FINISHED", name

    # Unchanged: nothing runs. A fine-tune setting: only the fine-tunes and what reads them re-run, and it says why.
    steps = said
    said = _lines(_pipeline(settings, root, pause).stdout)
    assert all(v.startswith("done earlier") for v in said.values()) and said.keys() == steps.keys()
    said = _lines(_pipeline({**settings, "finetune:num_epochs": 2}, root, pause).stdout)
    for name in ("teacher", "pseudo_label", "student", "student/evaluate"):
        assert said[name].startswith("done earlier"), (name, said[name])
    # finetune:num_epochs sets the fine-tune's own epoch setting (finetune_epochs)
    assert said["finetune"] == "re-running (settings changed: finetune_epochs)"
    assert said["finetune/evaluate"] == "re-running (settings changed: num_epochs; input re-made: finetune)"
    assert said["pseudo_label_r2"] == "re-running (input re-made: finetune)"
    assert said["finetune_r2"] == "re-running (settings changed: finetune_epochs; input re-made: student_r2)"

    # compare, reading the evaluations from MLflow, tables each model as the pipeline's results.json does
    results = json.loads((out / "results.json").read_text())
    compared = run_compare(["pipeline"], root / "compare", {"params.labeled_fraction": "0.4"},
                           method="teacher_student", tracking_uri=settings["tracking_uri"], log_summary=False)
    (row,) = compared["rows"]
    assert list(row)[1:] == list(results["auroc"])
    for column, value in results["auroc"].items():
        assert row[column]["mean"] == pytest.approx(value) and row[column]["n"] == 1

    # A second method in the same folder shares the teacher and loses nothing the first wrote: each method keeps its
    # results file and MLflow run, and the folder's Table I holds both methods' figures.
    mean_teacher = {k: v for k, v in settings.items() if k not in ("rounds", "student:num_epochs")}
    said = _lines(_pipeline({**mean_teacher, "method": "mean_teacher"}, root, pause).stdout)
    assert said["teacher"].startswith("done earlier") and said["mean_teacher"] == "running"
    assert json.loads((out / "results-teacher_student.json").read_text()) == results
    second = json.loads((out / "results-mean_teacher.json").read_text())
    assert json.loads((out / "results.json").read_text()) == second  # the last finished pipeline's (export's)
    assert second["auroc"]["teacher"] == results["auroc"]["teacher"]
    table = (out / "table1.md").read_text().splitlines()
    both = {**results["auroc"], "mean teacher": second["auroc"]["mean teacher"]}
    assert table[0] == f"| labeled | seeds | {' | '.join(both)} |"
    assert table[2] == "| 40% | 0 | " + " | ".join(f"{v:.3f}" for v in both.values()) + " |"
    assert second["run_id"] != results["run_id"]
    assert client.get_run(results["run_id"]).data.tags["method"] == "teacher_student"


@pytest.mark.slow
def test_sweep_over_seeds_with_an_empty_unlabeled_split(tiny):
    root, settings = tiny
    settings = {**settings, "output_dir": root / "sweep"}
    done = subprocess.run(_command("sweep", settings, "--lambdas", "1.0", "--seeds", "0", "1"), cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("the unlabeled split is empty (labeled_fraction=1.0)") == 2
    assert "| 100% (supervised) | 0,1 | " in done.stdout and "| - | - |" in done.stdout
    table = json.loads((root / "sweep" / "table1.json").read_text())
    assert [r["seed"] for r in table["results"]] == [0, 1]
    assert all(r["auroc"]["intermediate"] is None for r in table["results"])

    client = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"])
    experiment = client.get_experiment_by_name("pipeline").experiment_id
    sweep = client.search_runs([experiment], filter_string="attributes.run_name = 'sweep-sweep'")[0]
    assert "table1.md" in {a.path for a in client.list_artifacts(sweep.info.run_id)}
    pipelines = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.parentRunId = '{sweep.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in pipelines) == ["pipeline-lambda1.0-seed0", "pipeline-lambda1.0-seed1"]
    for pipeline in pipelines:
        children = client.search_runs(
            [experiment], filter_string=f"tags.mlflow.parentRunId = '{pipeline.info.run_id}'"
        )
        assert sorted(r.info.run_name.split("-")[0] for r in children) == ["teacher", "teacher"]


def test_pipeline_options_are_arguments_not_stage_settings():
    from monai_cxr_ssl.pipeline import Pipeline, pipeline_options

    assert pipeline_options({"method": "mean_teacher", "rounds": 2, "seed": 1}) == (
        {"method": "mean_teacher", "rounds": 2}, {"seed": 1})
    with pytest.raises(ValueError, match=r"pass Pipeline\(\.\.\., method='mean_teacher'\)"):
        Pipeline([], {"method": "mean_teacher"})


def test_labeled_per_class_is_refused_beside_labeled_fraction_and_in_a_sweep(tmp_path):
    from monai_cxr_ssl.pipeline import Pipeline, run_sweep

    with pytest.raises(ValueError, match="labeled_fraction and labeled_per_class both size the labeled part"):
        Pipeline([], {"labeled_fraction": 0.1, "labeled_per_class": 10})
    with pytest.raises(ValueError, match="a sweep varies labeled_fraction, which labeled_per_class replaces"):
        run_sweep([], {"labeled_per_class": 10, "output_dir": str(tmp_path)}, [0.1, 0.2])
    assert not any(tmp_path.iterdir())  # refused before any work
