"""Teacher → pseudo-label (+ balanced filter) → student → fine-tune → evaluate, each stage run alone through
``python -m monai.bundle run`` on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import checkpoint_probabilities
from sklearn.metrics import roc_auc_score

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cxr_classifier" / "configs"
STAGES = {
    "teacher": ["train.json"],
    "pseudo_label": ["train.json", "predict.json", "pseudo_label.json"],
    "student": ["train.json", "student.json"],
    "finetune": ["train.json", "finetune.json"],
    "evaluate": ["train.json", "predict.json", "evaluate.json"],
}


def _run(name: str, common: dict, **extra) -> subprocess.CompletedProcess:
    files = [str(CONFIGS / f) for f in STAGES[name]] + [str(REPO / "configs" / "demo.json")]
    args = [f"--{k}={v}" for k, v in {**common, **extra}.items()]
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), *args],
        cwd=common["output_dir"].parent, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("stages")
    data = make_synthetic_dataset(root / "data", n_train=80, n_test=30, image_size=48, prevalence=0.4, seed=2)
    common = {
        "bundle_root": CONFIGS.parent, "dataset_dir": data, "output_dir": root / "out",
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment_name": "stages", "image_size": 40,
        "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.4, "num_workers": 0, "num_epochs": 1,
        "filter_threshold": 0.5,
    }
    results = {}
    for stage in ("teacher", "pseudo_label", "student", "finetune"):
        results[stage] = done = _run(stage, common)
        assert done.returncode == 0, f"{stage}: " + done.stderr[-3000:]
    results["evaluate"] = _run("evaluate", common, stage="finetune")
    return root / "out", common, results


def test_pseudo_label_stage_covers_the_unlabeled_split(pipeline):
    from monai_cxr_ssl.pseudo_labels import file_sha256, read_pseudo_labels

    out, _, _ = pipeline
    split = json.loads((out / "split.json").read_text())
    header, ids, probs, labels = read_pseudo_labels(
        out / "pseudo_label" / "pseudo_labels.jsonl",
        expected_fingerprint=split["fingerprint"],
        expected_checkpoint_sha256=file_sha256(out / "teacher" / "models" / "model.pt"),
    )
    assert ids == [it["id"] for it in split["unlabeled"]]
    # The teacher's ten-crop probabilities, computed here from its checkpoint.
    expected = checkpoint_probabilities(out / "teacher" / "models" / "model.pt",
                                        [it["image"] for it in split["unlabeled"]], 40, 32)
    assert expected.std() > 0
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    assert labels is not None and header["teacher_run_id"]
    assert (out / "pseudo_label" / "pseudo_labels_hist.png").exists()


def test_student_trains_on_the_filtered_pseudo_labels(pipeline):
    from monai_cxr_ssl.pseudo_labels import read_pseudo_labels

    out, common, _ = pipeline
    filtered = json.loads((out / "pseudo_label" / "filtered.json").read_text())
    counts = filtered["counts"]["OPACITY"]
    assert len(filtered["items"]) == counts["kept_positive"] + counts["kept_negative"] > 0
    assert counts["kept_positive"] <= counts["quota_positive"] and counts["kept_negative"] <= counts["quota_negative"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=common["tracking_uri"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("stages").experiment_id])}
    suffix = "-lambda0.4-seed0"
    assert set(runs) == {f"{s}{suffix}" for s in ("teacher", "pseudo_label", "student", "finetune")} | {
        f"finetune{suffix}-evaluate"
    }
    pl = runs[f"pseudo_label{suffix}"]
    assert pl.data.metrics["filter_kept"] == len(filtered["items"])
    assert pl.data.metrics["pseudo_label_count"] == len(json.loads((out / "split.json").read_text())["unlabeled"])
    assert "filter_flip_rate_OPACITY" in pl.data.metrics
    # the teacher's AUROC on the unlabeled split's true labels, which only the report sees
    _, _, probs, labels = read_pseudo_labels(out / "pseudo_label" / "pseudo_labels.jsonl")
    assert 0 < labels.sum() < len(labels)
    assert pl.data.metrics["pseudo_label_auroc"] == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))
    assert pl.data.params["teacher_run_id"] == runs[f"teacher{suffix}"].info.run_id
    assert runs[f"student{suffix}"].data.params["num_train"] == str(len(filtered["items"]))
    assert {a.path for a in client.list_artifacts(pl.info.run_id)} >= {"pseudo_labels.jsonl", "filtered.json"}


def test_finetune_starts_from_the_student(pipeline):
    out, common, results = pipeline
    student = torch.load(out / "student" / "models" / "model.pt", weights_only=True)
    finetuned = torch.load(out / "finetune" / "models" / "model.pt", weights_only=True)
    teacher = torch.load(out / "teacher" / "models" / "model.pt", weights_only=True)
    key = "features.conv0.weight"
    # One epoch of fine-tuning at lr 3e-4 moves the weights a little away from the student, far from the teacher.
    assert (finetuned[key] - student[key]).abs().mean() < (finetuned[key] - teacher[key]).abs().mean()
    assert results["evaluate"].returncode == 0, results["evaluate"].stderr[-3000:]
    report = json.loads((out / "finetune" / "test_metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    probs = checkpoint_probabilities(out / "finetune" / "models" / "model.pt", [it["image"] for it in split["test"]],
                                     40, 32)
    labels = [it["label"][0] for it in split["test"]]
    assert 0 < sum(labels) < len(labels) and probs.std() > 0
    assert report["mean_auroc"] == pytest.approx(roc_auc_score(labels, probs[:, 0]))


def test_bad_keep_fraction_fails_clearly(pipeline):
    _, common, _ = pipeline
    done = _run("pseudo_label", dict(common, output_dir=common["output_dir"]), keep_fraction=1.5)
    assert done.returncode != 0 and "keep_fraction (κ) must be in (0, 1]" in done.stderr
