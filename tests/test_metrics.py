"""Model selection on multi-label data: the mean AUROC over defined classes (against scikit-learn), the classes it
covers named before training, BestCheckpoint refusing NaN, and a bundle run where one class has no validation
positive still saving the best epoch's model."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import roc_auc_score

from monai_cxr_ssl.handlers import BestCheckpoint
from monai_cxr_ssl.metrics import MeanDefinedAUROC, auroc_classes, per_class_auroc


def _data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < 0.3).astype(float)
    labels[:, 2] = 0.0  # no positive
    labels[:, 3] = 1.0  # no negative
    probs = np.clip(0.5 * labels + 0.6 * rng.random((n, 4)), 0, 1)
    return labels, probs


def _run_metric(metric: MeanDefinedAUROC, labels: np.ndarray, probs: np.ndarray, batch: int, decollated: bool):
    engine = Engine(lambda e, b: b)
    metric.attach(engine, "auroc")
    batches = []
    for i in range(0, len(labels), batch):
        p, y = torch.as_tensor(probs[i:i + batch]), torch.as_tensor(labels[i:i + batch])
        batches.append((list(p), list(y)) if decollated else (p, y))
    return engine.run(batches).metrics["auroc"]


@pytest.mark.parametrize("decollated", [False, True])
def test_mean_defined_auroc_matches_sklearn(decollated):
    labels, probs = _data()
    expected = np.mean([roc_auc_score(labels[:, k], probs[:, k]) for k in (0, 1)])
    metric = MeanDefinedAUROC(class_names=["A", "B", "C", "D"])
    assert _run_metric(metric, labels, probs, batch=7, decollated=decollated) == pytest.approx(expected, abs=1e-12)
    assert metric.covered == ["A", "B"]
    assert per_class_auroc(labels, probs)[2:] == [None, None]


def test_mean_defined_auroc_binary_and_undefined():
    labels, probs = _data()
    metric = MeanDefinedAUROC()
    value = _run_metric(metric, labels[:, :1], probs[:, :1], batch=16, decollated=True)
    assert value == pytest.approx(roc_auc_score(labels[:, 0], probs[:, 0]))
    with pytest.raises(ValueError, match=r"mean AUROC is undefined: none of the classes \['class_0', 'class_1'\]"):
        _run_metric(MeanDefinedAUROC(), labels[:, 2:], probs[:, 2:], batch=16, decollated=False)


def test_auroc_classes_names_the_left_out_classes_once(caplog):
    labels, _ = _data(20)
    items = [{"label": row.tolist()} for row in labels]
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        covered = auroc_classes(items, ["A", "B", "Hernia", "D"])
    assert covered == ["A", "B"]
    assert caplog.text.count("left out") == 1
    assert "val_auroc is the mean over 2 of 4 classes (A, B)" in caplog.text
    assert "20 validation images: Hernia (0 positives), D (20 positives)" in caplog.text
    with pytest.raises(ValueError, match=r"val_auroc is undefined: none of the classes \['Hernia', 'D'\] has both "
                                         r"positive and negative images among the 20 validation images"):
        auroc_classes([{"label": row[2:].tolist()} for row in labels], ["Hernia", "D"])


def test_best_checkpoint_refuses_nan_and_records_the_best_epoch(tmp_path):
    net = torch.nn.Linear(2, 1)
    best = BestCheckpoint(str(tmp_path), net, "val_auroc")
    evaluator = Engine(lambda e, b: None)
    scores = iter([0.6, 0.8, 0.7, float("nan")])

    @evaluator.on(Events.EPOCH_COMPLETED)
    def _(e):
        e.state.metrics["val_auroc"] = next(scores)

    def validate(epoch: int) -> None:  # as SupervisedEvaluator.run(global_epoch): its epoch is the trainer's
        evaluator.state.max_epochs, evaluator.state.epoch, evaluator.state.iteration = epoch, epoch - 1, 0
        evaluator.run([0])

    best.attach(evaluator)
    for epoch in range(1, 4):
        validate(epoch)
    assert best.best_epoch == 2 and best.best_score == 0.8
    restored = BestCheckpoint(str(tmp_path), torch.nn.Linear(2, 1), "val_auroc")
    restored.load_state_dict(best.state_dict())
    assert restored.best_epoch == 2 and restored.best_score == 0.8
    with pytest.raises(ValueError, match=r"validation metric\(s\) \['val_auroc'\] are NaN at epoch 4"):
        validate(4)


# --- a bundle run on generated multi-label data whose class C has no validation positive ---------------------------

def _multilabel_dataset(root: Path) -> Path:
    """Synthetic images as a CSV source with classes A (the opacity), B (the opacity with a tenth flipped) and C
    (positives only in the training rows) and an explicit validation split."""
    from monai_cxr_ssl.data import make_synthetic_dataset

    data = Path(make_synthetic_dataset(root / "images", n_train=48, n_test=8, image_size=36, prevalence=0.5, seed=3))
    rng = np.random.default_rng(0)
    rows = []
    for i, path in enumerate(sorted(p for p in data.rglob("*.png"))):
        opacity = int(path.parent.name == "OPACITY")
        part = "test" if path.parts[-3] == "test" else ("val" if i % 3 == 0 else "train")
        c = int(part == "train" and rng.random() < 0.3)
        rows.append([str(path.relative_to(data)), opacity, opacity ^ int(rng.random() < 0.1), c, part])
    with open(data / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "A", "B", "C", "split"], *rows])
    return data / "labels.csv"


def _val_history(uri: str, experiment: str) -> tuple[dict, list[float]]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_auroc"))
    return run.data.params, [v for _, v in history]


@pytest.mark.slow
def test_bundle_selects_the_best_epoch_when_a_class_has_no_validation_positive(labels_csv, tmp_path):
    from monai_cxr_ssl.workflow import REPO_ROOT, make_workflow

    settings = {
        "datasource": {"_target_": "monai_cxr_ssl.data.CsvSource", "csv_path": str(labels_csv),
                       "label_columns": ["A", "B", "C"], "split_column": "split"},
        "output_dir": str(tmp_path / "out"), "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "experiment_name": "selection", "labeled_fraction": 1.0, "image_size": 32, "crop_size": 32,
        # seed 3: a split and sampling order where the validation AUROC improves after epoch 1 (what is tested)
        "batch_size": 12, "num_epochs": 3, "num_workers": 0, "learning_rate": 0.001, "seed": 3,
    }
    configs = REPO_ROOT / "bundles" / "cxr_classifier" / "configs"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.json"),
         "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
         *(f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in settings.items())],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("val_auroc is the mean over 2 of 3 classes (A, B); left out, AUROC undefined on the 16 "
                     "validation images: C (0 positives)") == 1
    params, history = _val_history(settings["tracking_uri"], "selection")
    assert params["val_auroc_classes"] == "A,B" and params["classes"] == "A,B,C" and params["num_classes"] == "3"
    assert len(history) == 3 and all(math.isfinite(v) for v in history)
    models = tmp_path / "out" / "teacher" / "models"
    best_epoch = torch.load(models / "last.pt", weights_only=True)["best_checkpoint"]["best_epoch"]
    assert best_epoch == int(np.argmax(history)) + 1 and best_epoch > 1, history  # a later, better epoch won

    # model.pt scores the best value of the history on the validation images (computed here with scikit-learn)
    parser = make_workflow(["train"], **settings).parser
    network = parser.get_parsed_content("network")
    network.load_state_dict(torch.load(models / "model.pt", map_location="cpu", weights_only=True))
    network.eval()
    probs, labels = [], []
    with torch.no_grad():
        for batch in parser.get_parsed_content("validate#dataloader"):
            probs.append(torch.sigmoid(network(batch["image"])).numpy())
            labels.append(batch["label"].numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    assert labels.shape == (16, 3) and labels[:, 2].sum() == 0
    expected = np.mean([roc_auc_score(labels[:, k], probs[:, k]) for k in (0, 1)])
    assert expected == pytest.approx(max(history), abs=1e-5)


def test_mean_teacher_validation_scores_both_models_over_defined_classes(tmp_path):
    """The mean-teacher evaluator's two metrics skip a class without validation positives, and BestCheckpoint saves
    whichever model scores better."""
    from monai.handlers import from_engine
    from monai.transforms import Activationsd

    from monai_cxr_ssl.methods.mean_teacher.engine import MeanTeacherEvaluator

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] > 0, np.zeros(40, bool)], axis=1).astype(np.float32)  # class 2: no positive
    student, teacher = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(3))
        teacher.bias.zero_()
    loader = [{"image": torch.from_numpy(x[i:i + 8]), "label": torch.from_numpy(y[i:i + 8])} for i in range(0, 40, 8)]
    best = BestCheckpoint(str(tmp_path), student, "val_auroc", candidates={"val_auroc_teacher": teacher})
    evaluator = MeanTeacherEvaluator(
        teacher_network=teacher, device=torch.device("cpu"), val_data_loader=loader, network=student,
        postprocessing=Activationsd(keys=["pred", "pred_teacher"], sigmoid=True),
        key_val_metric={"val_auroc": MeanDefinedAUROC(from_engine(["pred", "label"]), ["A", "B", "C"])},
        additional_metrics={"val_auroc_teacher": MeanDefinedAUROC(from_engine(["pred_teacher", "label"]))},
        val_handlers=[best],
    )
    evaluator.run()
    with torch.no_grad():
        s_probs = torch.sigmoid(student(torch.from_numpy(x))).numpy()
    metrics = evaluator.state.metrics
    assert metrics["val_auroc"] == pytest.approx(np.mean([roc_auc_score(y[:, k], s_probs[:, k]) for k in (0, 1)]))
    assert metrics["val_auroc_teacher"] == 1.0 and best.chosen == "val_auroc_teacher"
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.testing.assert_close(saved["weight"], teacher.weight.detach())


@pytest.mark.slow
def test_chestxray14_sample_teacher_keeps_the_classes_that_occur(shared_data, tmp_path):
    """A multi-label teacher run on real NIH images (32 px, 1 epoch, 10% labeled): classes without a labeled
    positive are left out of the split and the network, val_auroc averages the classes defined on validation."""
    configs = Path(__file__).resolve().parents[1] / "bundles" / "cxr_classifier" / "configs"
    overlay = Path(__file__).resolve().parents[1] / "configs" / "chestxray14_multilabel.json"
    settings = {
        "dataset_dir": shared_data / "chestxray14_sample", "output_dir": tmp_path / "out",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment_name": "cxr14", "labeled_fraction": 0.1,
        "val_fraction": 0.05, "image_size": 32, "crop_size": 32, "batch_size": 16, "num_epochs": 1, "num_workers": 0,
        "seed": 0,
    }
    files = repr([str(configs / "train.json"), str(overlay)])
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", files,
         "--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf"),
         *(f"--{k}={v}" for k, v in settings.items())],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    left_out = split["left_out_classes"]
    assert left_out and all(v["labeled"] == 0 and v["pool"] > 0 for v in left_out.values())
    assert len(split["classes"]) + len(left_out) == 14
    assert "leaving out class(es) " + str(list(left_out)) in done.stdout + done.stderr
    weights = torch.load(tmp_path / "out" / "teacher" / "models" / "model.pt", weights_only=True)
    assert [w.shape[0] for k, w in weights.items() if k.endswith("weight")][-1] == len(split["classes"])
    params, history = _val_history(settings["tracking_uri"], "cxr14")
    assert params["num_classes"] == str(len(split["classes"])) and params["left_out_classes"] == ",".join(left_out)
    labels = np.array([it["label"] for it in split["validation"]])
    defined = [c for k, c in enumerate(split["classes"]) if 0 < labels[:, k].sum() < len(labels)]
    assert params["val_auroc_classes"] == ",".join(defined)
    # val_auroc is scikit-learn's mean over those classes, on the epoch's (the best) model's validation outputs
    from monai.transforms import Compose, Resized
    from sklearn.metrics import roc_auc_score

    from monai_cxr_ssl.data import LoadCXRImaged
    from monai_cxr_ssl.networks import CXRDenseNet121

    net = CXRDenseNet121(num_classes=len(split["classes"]))
    net.load_state_dict(weights)
    net.eval()
    load = Compose([LoadCXRImaged("image"), Resized("image", [32, 32], mode="area")])  # crop 32 of 32: no crop
    x = torch.stack([torch.as_tensor(load({"image": it["image"]})["image"]) for it in split["validation"]])
    with torch.no_grad():
        probs = torch.sigmoid(net(x)).numpy()
    expected = np.mean([roc_auc_score(labels[:, k], probs[:, k]) for k, c in enumerate(split["classes"])
                        if c in defined])
    assert len(history) == 1 and history[0] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> Path:
    return _multilabel_dataset(tmp_path_factory.mktemp("multilabel"))


@pytest.mark.slow
@pytest.mark.parametrize("case, setting, message", [
    ("no_validation_class", [], "val_auroc is undefined: none of the classes ['A', 'B', 'C'] has both positive and "
                                "negative images among the 16 validation images"),
    ("num_classes", ["num_classes=14"], "num_classes is 14 but the split keeps 3 class(es) ['A', 'B', 'C']"),
])
def test_bad_multilabel_settings_fail_before_training(labels_csv, tmp_path, case, setting, message):
    images = labels_csv.parent
    if case == "no_validation_class":  # every validation label 0
        rows = list(csv.reader(labels_csv.open()))
        rows = [rows[0]] + [r if r[-1] != "val" else [r[0], 0, 0, 0, "val"] for r in rows[1:]]
        labels_csv = tmp_path / "labels.csv"
        with open(labels_csv, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    source = {"_target_": "monai_cxr_ssl.data.CsvSource", "csv_path": str(labels_csv), "root": str(images),
              "label_columns": ["A", "B", "C"], "split_column": "split"}
    overlay = tmp_path / "overlay.json"
    overlay.write_text(json.dumps({"datasource": source}))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "monai_cxr_ssl.cli", "run", "train", str(overlay), "--set", f"output_dir={out}",
         f"tracking_uri=sqlite:///{tmp_path / 'm.db'}", "labeled_fraction=1.0", "num_workers=0", *setting],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.splitlines()[-1]
    assert last.startswith("monai-cxr-ssl: error: ") and message in last, last
    assert not (out / "teacher" / "models").exists()  # nothing trained
