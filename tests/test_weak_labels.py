"""Weak image-level positive labels: CSV manifest and list file, the weak-positive set P, and bad input."""

from __future__ import annotations

import pytest

from monai_cxr_ssl.data import load_weak_labels, unlabeled_datalist

CLASSES = ["Effusion", "Mass"]


def _split(n: int = 6, classes=("PNEUMONIA",)) -> dict:
    items = [{"image": f"/data/img{i}.png", "id": f"img{i}.png", "label": [float(i % 2)] * len(classes)}
             for i in range(n)]
    return {"classes": list(classes), "unlabeled": items}


def test_csv_manifest_single_and_multi_class(tmp_path):
    binary = tmp_path / "weak.csv"
    binary.write_text("image,weak_label\nimg0.png,1\nimg1.png,0\nimg2.png,true\nimg3.png,\n")
    assert load_weak_labels(binary, ["PNEUMONIA"]) == {"img0.png": [1.0], "img2.png": [1.0]}
    multi = tmp_path / "multi.csv"
    multi.write_text("path,findings\na.png,Effusion|Mass\nb.png,Mass\nc.png,\n")
    weak = load_weak_labels(multi, CLASSES, column="findings", image_column="path")
    assert weak == {"a.png": [1.0, 1.0], "b.png": [0.0, 1.0]}


def test_list_file_with_and_without_class_names(tmp_path):
    listed = tmp_path / "weak.txt"
    listed.write_text("# weak positives from reports\na.png\nb.png\tMass\n\n")
    assert load_weak_labels(listed, CLASSES) == {"a.png": [1.0, 1.0], "b.png": [0.0, 1.0]}


def test_missing_column_names_the_file_and_the_setting(tmp_path):
    manifest = tmp_path / "weak.csv"
    manifest.write_text("image,report_positive\nimg0.png,1\n")
    with pytest.raises(ValueError, match=r"weak\.csv: missing column\(s\) \['weak_label'\].*weak_label_column"):
        load_weak_labels(manifest, ["PNEUMONIA"])


def test_unknown_class_and_missing_file(tmp_path):
    manifest = tmp_path / "weak.csv"
    manifest.write_text("image,weak_label\na.png,Efusion\n")
    with pytest.raises(ValueError, match=r"line 2: weak label 'Efusion' names unknown class\(es\) \['Efusion'\]"):
        load_weak_labels(manifest, CLASSES)
    with pytest.raises(FileNotFoundError, match="weak-label file not found"):
        load_weak_labels(tmp_path / "absent.txt", CLASSES)


def test_unlabeled_datalist_is_all_images_or_the_weak_positive_set(tmp_path):
    split = _split()
    assert unlabeled_datalist(split) == split["unlabeled"]
    assert len(unlabeled_datalist(split, max_unlabeled=4)) == 4
    listed = tmp_path / "weak.txt"
    listed.write_text("img1.png\n/data/img3.png\nlabeled_elsewhere.png\n")  # ids or absolute paths
    positive = unlabeled_datalist(split, listed)
    assert [it["id"] for it in positive] == ["img1.png", "img3.png"]
    assert all(it["sharpen"] == [1.0] for it in positive)


def test_no_weak_positive_in_the_unlabeled_split_is_a_clear_error(tmp_path):
    listed = tmp_path / "weak.txt"
    listed.write_text("images/img1.png\n")
    with pytest.raises(ValueError, match=r"none of its 1 weak-positive image\(s\) is in the unlabeled split.*'img0"):
        unlabeled_datalist(_split(), listed)
