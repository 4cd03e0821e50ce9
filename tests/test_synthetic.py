"""Synthetic demo dataset: layout, README, determinism, label balance, a learnable but not trivial signal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from monai_cxr_ssl.data.datasets import ClassFolders
from monai_cxr_ssl.data.synthetic import make_synthetic_dataset

SMALL = {"n_train": 40, "n_test": 20, "image_size": 64, "prevalence": 0.25}


def load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and 0/1 labels of one split."""
    paths = sorted((root / split).glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(p)) for p in paths])
    return images, np.array([p.parent.name == "OPACITY" for p in paths], dtype=int)


def test_layout_readme_and_balance(tmp_path):
    root = Path(make_synthetic_dataset(tmp_path / "synth", **SMALL))
    assert root == tmp_path / "synth"
    counts = {
        f"{s}/{c}": len(list((root / s / c).glob("*.png"))) for s in ("train", "test") for c in ("NORMAL", "OPACITY")
    }
    assert counts == {"train/NORMAL": 30, "train/OPACITY": 10, "test/NORMAL": 15, "test/OPACITY": 5}
    readme = (root / "README.txt").read_text()
    assert "SYNTHETIC" in readme and "not clinical" in readme.lower()
    assert json.loads((root / "synthetic.json").read_text())["params"] == {**SMALL, "seed": 0}
    with Image.open(next((root / "train/OPACITY").glob("*.png"))) as im:
        assert im.mode == "L" and im.size == (64, 64)
    data = ClassFolders(str(root), "OPACITY").load()
    assert len(data.pool) == 40 and sum(it["label"][0] for it in data.pool) == 10 and len(data.test) == 20


def test_deterministic_per_seed(tmp_path):
    a = load(Path(make_synthetic_dataset(tmp_path / "a", **SMALL)), "train")
    b = load(Path(make_synthetic_dataset(tmp_path / "b", **SMALL)), "train")
    c = load(Path(make_synthetic_dataset(tmp_path / "c", **SMALL, seed=1)), "train")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_positives_differ_but_not_from_one_pixel(tmp_path):
    root = Path(make_synthetic_dataset(tmp_path, n_train=200, n_test=20, image_size=64, prevalence=0.5))
    images, labels = load(root, "train")
    lung_mean = images[:, 16:44, 8:56].mean(axis=(1, 2))  # the window holding both lung fields
    assert roc_auc_score(labels, lung_mean) > 0.6
    ranks = rankdata(images.reshape(len(images), -1), axis=0)  # per-pixel AUROC from rank sums (Mann-Whitney)
    n_pos, n_neg = labels.sum(), len(labels) - labels.sum()
    pixel_auc = (ranks[labels == 1].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    assert np.maximum(pixel_auc, 1 - pixel_auc).max() < 0.9


def test_second_call_is_a_no_op_and_new_params_regenerate(tmp_path):
    make_synthetic_dataset(tmp_path, **SMALL)
    first = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    time.sleep(0.01)
    make_synthetic_dataset(tmp_path, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == first
    make_synthetic_dataset(tmp_path, **{**SMALL, "n_train": 20})
    assert len(list(tmp_path.glob("train/*/*.png"))) == 20


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not made by make_synthetic_dataset"):
        make_synthetic_dataset(tmp_path, **SMALL)
    with pytest.raises(ValueError, match="prevalence"):
        make_synthetic_dataset(tmp_path / "x", prevalence=1.0)
    with pytest.raises(ValueError, match="n_test"):
        make_synthetic_dataset(tmp_path / "x", n_test=2, prevalence=0.1)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_dataset(tmp_path / "x", image_size=8)
