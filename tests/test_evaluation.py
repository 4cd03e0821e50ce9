"""AUROC report: per-class values against scikit-learn, undefined classes, files written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from monai_cxr_ssl.evaluation import auroc_report, operating_point, write_report


def test_auroc_report_per_class_and_mean():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(50, 2)).astype(float)
    probs = np.clip(labels * 0.3 + rng.random((50, 2)) * 0.7, 0, 1)
    report = auroc_report(labels, probs, ["A", "B"])
    expected = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(2)]
    assert report["auroc"]["A"] == pytest.approx(expected[0])
    assert report["auroc"]["B"] == pytest.approx(expected[1])
    assert report["mean_auroc"] == pytest.approx(np.mean(expected))
    assert report["positives"] == {"A": int(labels[:, 0].sum()), "B": int(labels[:, 1].sum())}


def test_auroc_report_skips_single_valued_class():
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    probs = np.array([[0.9, 0.1], [0.2, 0.3], [0.7, 0.2], [0.1, 0.4]])
    report = auroc_report(labels, probs, ["A", "B"])
    assert report["auroc"]["B"] is None
    assert report["mean_auroc"] == report["auroc"]["A"] == 1.0


def test_auroc_report_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="do not match"):
        auroc_report(np.zeros((4, 1)), np.zeros((4, 2)), ["A"])


def test_write_report_files(tmp_path):
    labels = np.array([0, 1, 0, 1, 1], dtype=float)
    probs = np.array([0.1, 0.8, 0.4, 0.35, 0.9])
    report = write_report(labels, probs, ["Effusion"], tmp_path, "test")
    assert json.loads((tmp_path / "test_metrics.json").read_text()) == report
    assert (tmp_path / "test_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_metrics.json", "test_predictions.npz", "test_roc.png"]
    saved = np.load(tmp_path / "test_predictions.npz")
    np.testing.assert_allclose(saved["probs"].ravel(), probs, rtol=1e-6)
    assert saved["labels"].ravel().tolist() == labels.tolist() and saved["class_names"].tolist() == ["Effusion"]


def test_operating_point_uses_the_validation_threshold_on_test_data():
    val_labels = np.array([0, 0, 0, 1, 1, 1])
    val_probs = np.array([0.1, 0.2, 0.3, 0.15, 0.6, 0.7])  # Youden's J is highest at threshold 0.6 (2/3 − 0)
    test_labels = np.array([0, 0, 1, 1, 1, 1])
    test_probs = np.array([0.65, 0.1, 0.61, 0.59, 0.9, 0.2])
    point = operating_point(val_labels, val_probs, test_labels, test_probs)
    assert point == {"threshold": 0.6, "sensitivity": 0.5, "specificity": 0.5}
    with pytest.raises(ValueError, match="positive and negative"):
        operating_point(np.ones(3), np.ones(3), test_labels, test_probs)


def test_report_names_covered_and_left_out_classes(tmp_path, caplog):
    import logging

    import torch
    from ignite.engine import Engine

    from monai_cxr_ssl.handlers import AUROCReport

    labels = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=float)
    probs = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.5], [0.7, 0.2, 0.5], [0.1, 0.4, 0.5]])
    report = auroc_report(labels, probs, ["A", "Hernia", "Edema"])
    assert report["classes_covered"] == ["A"] and report["classes_left_out"] == ["Hernia", "Edema"]
    assert report["positives"] == {"A": 2, "Hernia": 0, "Edema": 4}

    handler = AUROCReport(str(tmp_path), ["A", "Hernia", "Edema"])
    engine = Engine(lambda e, batch: batch)
    handler.attach(engine)
    batches = [[{"pred": torch.as_tensor(probs[i]), "label": torch.as_tensor(labels[i])} for i in (j, j + 1)]
               for j in (0, 2)]  # decollated, as MONAI evaluators give them
    with caplog.at_level(logging.INFO, logger="monai_cxr_ssl"):
        metrics = engine.run(batches).metrics
    assert metrics["test_mean_auroc"] == 1.0 and "test_auroc_Hernia" not in metrics
    assert {k: metrics[f"test_positives_{k}"] for k in ("A", "Hernia", "Edema")} == report["positives"]
    assert "test AUROC on 4 images: mean 1.0000 over A (left out, undefined: Hernia, Edema)" in caplog.text
    stored = json.loads((tmp_path / "test_metrics.json").read_text())
    assert stored["classes_covered"] == ["A"] and stored["classes_left_out"] == ["Hernia", "Edema"]
