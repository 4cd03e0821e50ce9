"""Smoke test on the real Kermany pediatric chest X-rays: split, train, ten-crop evaluation (skips without data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cxr_classifier" / "configs"


def test_kermany_teacher_smoke(shared_data, tmp_path):
    kermany = shared_data / "kermany_pneumonia"
    out = tmp_path / "out"
    args = [
        "--bundle_root", str(CONFIGS.parent), "--dataset_dir", str(kermany), "--output_dir", str(out),
        "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--labeled_fraction", "0.02",
        "--image_size", "40", "--crop_size", "32", "--num_epochs", "1", "--num_workers", "0",
    ]
    for configs in (["train.json"], ["train.json", "predict.json", "evaluate.json"]):
        files = [str(CONFIGS / c) for c in configs] + [str(REPO / "configs" / "kermany.json")]
        done = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    split = json.loads((out / "split.json").read_text())
    assert split["classes"] == ["PNEUMONIA"]
    assert split["counts"]["test"] == 624  # the official test split, untouched
    pool = sum(split["counts"][p] for p in ("labeled", "unlabeled", "validation"))
    assert pool == 5216
    assert split["positives"]["labeled"][0] > 0
    report = json.loads((out / "teacher" / "test_metrics.json").read_text())
    assert report["num_images"] == 624 and report["positives"] == {"PNEUMONIA": 390}
    # the reported AUROC is scikit-learn's on the saved predictions, whose labels are the official test split's
    saved = np.load(out / "teacher" / "test_predictions.npz")
    assert saved["labels"].ravel().tolist() == [it["label"][0] for it in split["test"]]
    assert saved["probs"].std() > 0
    assert report["mean_auroc"] == pytest.approx(roc_auc_score(saved["labels"].ravel(), saved["probs"].ravel()))
