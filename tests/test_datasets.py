"""Dataset sources: ChestX-ray14 label files, class folders and generic CSVs become datalists."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from monai_cxr_ssl.data.datasets import CHESTXRAY14_PATHOLOGIES, ChestXray14, ClassFolders, CsvSource

# (image, findings, patient); image 3 has only a non-target finding, so the binary Effusion task drops it.
CXR14_ROWS = [
    ("00000001_000.png", "Effusion", "1"),
    ("00000001_001.png", "Effusion|Mass", "1"),
    ("00000002_000.png", "No Finding", "2"),
    ("00000003_000.png", "Mass", "3"),
    ("00000004_000.png", "No Finding", "4"),
    ("00000005_000.png", "Cardiomegaly|Effusion", "5"),
]


def write_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)


def make_cxr14(root: Path, layout: str = "images", official_split: bool = False) -> Path:
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age"])
        for i, (name, findings, patient) in enumerate(CXR14_ROWS):
            writer.writerow([name, findings, i, patient, 50])
            folder = "images" if layout == "images" else f"images_00{1 + i % 2}/images"
            write_png(root / folder / name)
    if official_split:
        (root / "train_val_list.txt").write_text("\n".join(r[0] for r in CXR14_ROWS[:4]) + "\n")
        (root / "test_list.txt").write_text("\n".join(r[0] for r in CXR14_ROWS[4:]) + "\n")
    return root


def by_name(items: list[dict]) -> dict[str, dict]:
    return {Path(it["id"]).name: it for it in items}


@pytest.mark.parametrize("layout", ["images", "images_*/images"])
def test_chestxray14_binary_subset(tmp_path, layout):
    data = ChestXray14(str(make_cxr14(tmp_path, layout)), task="binary:Effusion").load()
    items = by_name(data.pool)
    assert data.classes == ["Effusion"]
    assert data.validation is None and data.test is None
    assert {k: v["label"] for k, v in items.items()} == {
        "00000001_000.png": [1.0],
        "00000001_001.png": [1.0],
        "00000002_000.png": [0.0],
        "00000004_000.png": [0.0],
        "00000005_000.png": [1.0],
    }
    it = items["00000001_001.png"]
    assert it["patient_id"] == "1" and Path(it["image"]).is_file() and Path(it["image"]).is_absolute()
    assert tmp_path / it["id"] == Path(it["image"])
    assert it["id"].startswith("images/" if layout == "images" else "images_00")


def test_chestxray14_multilabel_and_official_split(tmp_path):
    data = ChestXray14(str(make_cxr14(tmp_path, official_split=True)), task="multilabel").load()
    assert data.classes == list(CHESTXRAY14_PATHOLOGIES)
    assert set(by_name(data.pool)) == {r[0] for r in CXR14_ROWS[:4]}
    assert set(by_name(data.test)) == {r[0] for r in CXR14_ROWS[4:]}
    assert data.validation is None
    label = by_name(data.pool)["00000001_001.png"]["label"]
    assert [c for c, v in zip(data.classes, label, strict=True) if v == 1.0] == ["Effusion", "Mass"]
    assert by_name(data.pool)["00000002_000.png"]["label"] == [0.0] * 14


def test_chestxray14_official_split_with_binary_task(tmp_path):
    data = ChestXray14(str(make_cxr14(tmp_path, official_split=True)), task="binary:Effusion").load()
    assert set(by_name(data.pool)) == {"00000001_000.png", "00000001_001.png", "00000002_000.png"}
    assert set(by_name(data.test)) == {"00000004_000.png", "00000005_000.png"}


def test_chestxray14_image_dir(tmp_path):
    make_cxr14(tmp_path)
    (tmp_path / "images").rename(tmp_path / "pngs")
    data = ChestXray14(str(tmp_path), task="binary:Effusion", image_dir="pngs").load()
    assert all(it["id"].startswith("pngs/") for it in data.pool)


@pytest.mark.parametrize(
    "task, listed", [("binary:Efusion", "Atelectasis, Cardiomegaly"), ("binary:", "multilabel"), ("multi", "binary:")]
)
def test_chestxray14_unknown_task(tmp_path, task, listed):
    with pytest.raises(ValueError, match=listed):
        ChestXray14(str(tmp_path), task=task)


def test_chestxray14_missing_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017.csv"):
        ChestXray14(str(tmp_path)).load()
    make_cxr14(tmp_path, official_split=True)
    (tmp_path / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.txt"):
        ChestXray14(str(tmp_path)).load()


@pytest.mark.parametrize("layout", ["images", "images_*/images"])
def test_chestxray14_missing_images(tmp_path, layout):
    make_cxr14(tmp_path, layout)
    for path in sorted(tmp_path.glob("images*/**/00000001_*.png")):
        path.unlink()
    with pytest.raises(ValueError, match=r"2 image file\(s\).*00000001_00"):
        ChestXray14(str(tmp_path)).load()


def test_chestxray14_empty_selection(tmp_path):
    make_cxr14(tmp_path)
    entries = (tmp_path / "Data_Entry_2017.csv").read_text().splitlines()
    (tmp_path / "Data_Entry_2017.csv").write_text("\n".join([entries[0], entries[4]]) + "\n")  # only "Mass"
    with pytest.raises(ValueError, match="binary:Effusion"):
        ChestXray14(str(tmp_path), task="binary:Effusion").load()


def test_chestxray14_unknown_finding(tmp_path):
    make_cxr14(tmp_path)
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(path.read_text().replace("Cardiomegaly", "Cardiomegally"))
    with pytest.raises(ValueError, match="line 7: .*Cardiomegally"):
        ChestXray14(str(tmp_path)).load()


def make_class_folders(root: Path) -> Path:
    for name in ["train/NORMAL/a.png", "train/NORMAL/b.jpeg", "train/NORMAL/c.PNG", "train/PNEUMONIA/x.JPG"]:
        write_png(root / name)
    write_png(root / "train/PNEUMONIA/y.png")
    write_png(root / "train/OTHER/z.png")
    (root / "train/NORMAL/notes.txt").write_text("not an image")
    write_png(root / "test/NORMAL/t0.png")
    write_png(root / "test/PNEUMONIA/t1.png")
    return root


def test_class_folders(tmp_path):
    data = ClassFolders(str(make_class_folders(tmp_path)), positive_class="PNEUMONIA").load()
    assert data.classes == ["PNEUMONIA"]
    assert [(it["id"], it["label"]) for it in data.pool] == [
        ("train/NORMAL/a.png", [0.0]),
        ("train/NORMAL/b.jpeg", [0.0]),
        ("train/NORMAL/c.PNG", [0.0]),
        ("train/OTHER/z.png", [0.0]),
        ("train/PNEUMONIA/x.JPG", [1.0]),
        ("train/PNEUMONIA/y.png", [1.0]),
    ]
    assert [it["id"] for it in data.test] == ["test/NORMAL/t0.png", "test/PNEUMONIA/t1.png"]
    assert data.validation is None
    assert all(it["patient_id"] is None and Path(it["image"]).is_file() for it in data.pool + data.test)


def test_class_folders_negative_classes_and_val(tmp_path):
    make_class_folders(tmp_path)
    write_png(tmp_path / "val/NORMAL/v.png")
    data = ClassFolders(str(tmp_path), positive_class="PNEUMONIA", negative_classes=["NORMAL"]).load()
    assert "train/OTHER/z.png" not in {it["id"] for it in data.pool}
    assert [it["id"] for it in data.validation] == ["val/NORMAL/v.png"]


def test_class_folders_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        ClassFolders(str(tmp_path), positive_class="PNEUMONIA").load()
    make_class_folders(tmp_path)
    with pytest.raises(ValueError, match=r"'COVID'.*\['NORMAL', 'OTHER', 'PNEUMONIA'\]"):
        ClassFolders(str(tmp_path), positive_class="COVID").load()
    with pytest.raises(ValueError, match="negative_classes"):
        ClassFolders(str(tmp_path), positive_class="PNEUMONIA", negative_classes=["PNEUMONIA"]).load()


def test_class_folders_kermany():
    root = shared_path("kermany_pneumonia")
    data = ClassFolders(str(root), positive_class="PNEUMONIA").load()
    assert len(data.pool) == 1341 + 3875 and sum(it["label"][0] for it in data.pool) == 3875
    assert len(data.test) == 234 + 390 and sum(it["label"][0] for it in data.test) == 390


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_csv_source(tmp_path):
    for name in ["img/a.png", "img/b.png", "img/c.png", "img/d.png"]:
        write_png(tmp_path / name)
    rows = [
        ["img/a.png", 1, 0, "p1", "train"],
        ["img/b.png", 0, 1, "p1", "TRAIN"],
        ["img/c.png", 0, 0, "", "validation"],
        [str(tmp_path / "img/d.png"), 1, 1, "p2", "test"],
    ]
    csv_path = write_csv(tmp_path / "labels.csv", ["path", "a", "b", "pid", "split"], rows)
    data = CsvSource(str(csv_path), "path", ["a", "b"], patient_column="pid", split_column="split").load()
    assert data.classes == ["a", "b"]
    assert [(it["id"], it["label"], it["patient_id"]) for it in data.pool] == [
        ("img/a.png", [1.0, 0.0], "p1"),
        ("img/b.png", [0.0, 1.0], "p1"),
    ]
    assert [(it["id"], it["patient_id"]) for it in data.validation] == [("img/c.png", None)]
    assert data.test[0]["id"] == "img/d.png" and data.test[0]["image"] == str(tmp_path / "img/d.png")


def test_csv_source_root_and_defaults(tmp_path):
    write_png(tmp_path / "data/a.png")
    write_png(tmp_path / "data/b.png")
    csv_path = write_csv(tmp_path / "labels.csv", ["image", "label"], [["a.png", 1], ["b.png", 0]])
    data = CsvSource(str(csv_path), root=str(tmp_path / "data")).load()
    assert [it["id"] for it in data.pool] == ["a.png", "b.png"]
    assert data.validation is None and data.test is None and data.classes == ["label"]


def test_csv_source_errors(tmp_path):
    write_png(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        CsvSource(str(tmp_path / "missing.csv")).load()
    bad_label = write_csv(tmp_path / "l1.csv", ["image", "label"], [["a.png", "yes"]])
    with pytest.raises(ValueError, match="line 2.*'yes'"):
        CsvSource(str(bad_label)).load()
    bad_split = write_csv(tmp_path / "l2.csv", ["image", "label", "s"], [["a.png", 1, "holdout"]])
    with pytest.raises(ValueError, match="'holdout'"):
        CsvSource(str(bad_split), split_column="s").load()
    no_column = write_csv(tmp_path / "l3.csv", ["file", "label"], [["a.png", 1]])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        CsvSource(str(no_column)).load()
    missing = write_csv(
        tmp_path / "l4.csv", ["image", "label"], [[f"gone{i}.png", 1] for i in range(7)] + [["a.png", 0]]
    )
    with pytest.raises(ValueError, match=r"7 image file\(s\).*gone0\.png.*gone4\.png") as err:
        CsvSource(str(missing)).load()
    assert "gone5" not in str(err.value)
    only_test = write_csv(tmp_path / "l5.csv", ["image", "label", "s"], [["a.png", 1, "test"]])
    with pytest.raises(ValueError, match="no training images"):
        CsvSource(str(only_test), split_column="s").load()
