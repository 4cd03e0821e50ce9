"""Domain adaptation (``eval_source``): labeled images from site A, unlabeled, validation and test images from site
B. The split by hand (A's labeled part unchanged, B's validation and test apart from its unlabeled images), the
refusals, and two methods end to end on two generated sites: the test metrics are scikit-learn's on B's test images,
and B's validation images never reach training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monai_cxr_ssl.data import ClassFolders, make_synthetic_dataset, prepare_split
from monai_cxr_ssl.data.splits import EVAL_ID_PREFIX

TINY = {"image_size": 36, "crop_size": 32, "batch_size": 4, "num_workers": 0, "num_epochs": 1,
        "labeled_fraction": 0.5, "student_epochs": 1, "finetune_epochs": 1, "gan_base_channels": 8}


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sites")
    a = make_synthetic_dataset(root / "a", n_train=40, n_test=12, image_size=36, prevalence=0.4, seed=1)
    b = make_synthetic_dataset(root / "b", n_train=30, n_test=14, image_size=36, prevalence=0.5, seed=2)
    return Path(a), Path(b)


def test_the_split_takes_labeled_images_from_a_and_the_rest_from_b(sites, tmp_path):
    a, b = sites
    plain = prepare_split(ClassFolders(str(a), "OPACITY"), tmp_path / "plain.json", 0.5, seed=3)
    split = prepare_split(ClassFolders(str(a), "OPACITY"), tmp_path / "split.json", 0.5, seed=3,
                          eval_source=ClassFolders(str(b), "OPACITY"))
    assert split["labeled"] == plain["labeled"]  # the same labeled images as without it
    b_test = sorted(p.relative_to(b).as_posix() for p in (b / "test").rglob("*.png"))
    assert [it["id"] for it in split["test"]] == [EVAL_ID_PREFIX + i for i in b_test]  # B's official test list
    b_train = {EVAL_ID_PREFIX + p.relative_to(b).as_posix() for p in (b / "train").rglob("*.png")}
    validation, unlabeled = ({it["id"] for it in split[k]} for k in ("validation", "unlabeled"))
    assert validation and unlabeled and validation | unlabeled == b_train and not validation & unlabeled
    assert all("label" not in it for it in split["unlabeled"])
    assert [it["label"] for it in split["test"]] == [[float("OPACITY" in i)] for i in b_test]
    record = split["eval_source"]
    assert record["counts"] == {"unlabeled": len(unlabeled), "validation": len(validation), "test": 14}
    assert record["replaced"]["test"] == 12  # A's own test images are not used
    again = prepare_split(ClassFolders(str(a), "OPACITY"), tmp_path / "split.json", 0.5, seed=3,
                          eval_source=ClassFolders(str(b), "OPACITY"))
    assert again["split_fingerprint"] == split["split_fingerprint"]
    with pytest.raises(ValueError, match="made from different data"):
        prepare_split(ClassFolders(str(a), "OPACITY"), tmp_path / "split.json", 0.5, seed=3)


def test_eval_sources_that_cannot_test_the_model_are_refused(sites, tmp_path):
    a, b = sites
    with pytest.raises(ValueError, match=r"eval_source='/x' is not a dataset source with labels: .*Images without "
                                          r"labels go to unlabeled_source"):
        prepare_split(ClassFolders(str(a), "OPACITY"), tmp_path / "s.json", 0.5, eval_source="/x")
    with pytest.raises(ValueError, match=r"has class\(es\) \['NORMAL'\] that the labeled source does not have \(its "
                                         r"classes: \['OPACITY'\]\)"):
        prepare_split(ClassFolders(str(a), "OPACITY"), tmp_path / "s.json", 0.5, eval_source=ClassFolders(str(b)))
    assert not (tmp_path / "s.json").exists()


def _pipeline(a: Path, b: Path, out: Path, method: str) -> None:
    site = {"_target_": "monai_cxr_ssl.data.ClassFolders", "root": str(b)}
    settings = {**TINY, "dataset_dir": str(a), "output_dir": str(out), "method": method, "experiment_name": "da",
                "tracking_uri": f"sqlite:///{out.parent / (out.name + '.db')}", "eval_source": json.dumps(site)}
    cmd = [sys.executable, "-m", "monai_cxr_ssl.cli", "pipeline", "demo", "multiclass", "--set",
           *(f"{k}={v}" for k, v in settings.items())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_methods_are_tested_on_b_only_and_never_train_on_b_s_validation(sites, tmp_path):
    """teacher_student, then ssl_gan in the same folder (the teacher shared), on two mutually exclusive classes."""
    from sklearn.metrics import roc_auc_score

    a, b = sites
    out = tmp_path / "out"
    for method in ("teacher_student", "ssl_gan"):
        _pipeline(a, b, out, method)
    split = json.loads((out / "split.json").read_text())
    assert split["classes"] == ["NORMAL", "OPACITY"]
    assert all(it["id"].startswith(EVAL_ID_PREFIX) for it in split["test"] + split["validation"])
    for stage in ("teacher", "finetune", "supervised_discriminator", "ssl_gan"):
        saved = np.load(out / stage / "test_predictions.npz")
        # the test images are B's, in the split's order: their labels, and the AUROC is scikit-learn's on them
        assert np.array_equal(saved["labels"].reshape(len(split["test"]), -1), [it["label"] for it in split["test"]])
        report = json.loads((out / stage / "test_metrics.json").read_text())
        for k, name in enumerate(split["classes"]):
            assert report["auroc"][name] == pytest.approx(roc_auc_score(saved["labels"][:, k], saved["probs"][:, k]))
    validation = {it["id"] for it in split["validation"]}
    trained_on = {it["id"] for it in split["labeled"] + split["unlabeled"]}
    assert not validation & trained_on and {i.startswith(EVAL_ID_PREFIX) for i in trained_on} == {True, False}
    # what the student learnt from: pseudo-labels of B's unlabeled images only
    kept = {it["id"] for it in json.loads((out / "pseudo_label" / "filtered.json").read_text())["items"]}
    assert kept and not kept & validation and all(i.startswith(EVAL_ID_PREFIX) for i in kept)
    table = (out / "table1.md").read_text()
    assert "| teacher | intermediate | student | supervised discriminator | ssl-gan |" in table
    assert f"Labeled images: ClassFolders(root={str(a)!r}" in table and "(eval_source)." in table
    assert f"test images: ClassFolders(root={str(b)!r}" in table
    # MLflow names both sites on every stage's run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out.db'}")
    runs = client.search_runs([client.get_experiment_by_name("da").experiment_id], "attributes.status = 'FINISHED'")
    params = {r.info.run_name.split("-lambda")[0]: r.data.params for r in runs}
    for stage in ("teacher", "student", "supervised_discriminator", "ssl_gan"):
        assert f"root={str(a)!r}" in params[stage]["datasource"], stage
        assert f"root={str(b)!r}" in params[stage]["eval_source"], stage
