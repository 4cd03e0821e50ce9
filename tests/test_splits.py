"""Splits: grouped, stratified, reproducible; prepare_split writes, reuses and guards the split file."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_cxr_ssl.data.datasets import ClassFolders, CsvSource
from monai_cxr_ssl.data.splits import fingerprint, load_split, make_split, prepare_split

PARTS = ("labeled", "unlabeled", "validation", "test")


def make_items(n: int, prevalence: float = 0.3, per_patient: int = 1, seed: int = 0, root: str = "/data") -> list[dict]:
    """``n`` items; ``per_patient`` > 1 gives patients with several images (labels vary within a patient)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < prevalence
    return [
        {
            "image": f"{root}/img{i:05d}.png",
            "label": [float(labels[i])],
            "id": f"img{i:05d}.png",
            "patient_id": str(i // per_patient) if per_patient > 1 else None,
        }
        for i in range(n)
    ]


def ids(items: list[dict]) -> list[str]:
    return [it["id"] for it in items]


def test_parts_cover_pool_and_are_patient_disjoint():
    pool = make_items(600, per_patient=4)
    split = make_split(pool, 0.2, seed=1)
    assert sorted(sum((ids(split[p]) for p in PARTS), [])) == sorted(ids(pool))
    patients = [{it["patient_id"] for it in split[p]} for p in PARTS]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not patients[i] & patients[j], (PARTS[i], PARTS[j])


def test_stratified_sizes_and_prevalence():
    pool = make_items(2000, prevalence=0.3)
    prevalence = np.mean([it["label"][0] for it in pool])
    split = make_split(pool, 0.1, val_fraction=0.1, test_fraction=0.2)
    expected = {"test": 400, "validation": 200, "labeled": 140, "unlabeled": 1260}
    for part, n in expected.items():
        assert abs(len(split[part]) - n) <= 2, part
        assert abs(np.mean([it["label"][0] for it in split[part]]) - prevalence) < 0.02, part


def test_labeled_prevalence_moves_positives_to_the_unlabeled_part():
    pool = make_items(2000, prevalence=0.3)
    plain = make_split(pool, 0.2, seed=3)
    rare = make_split(pool, 0.2, seed=3, labeled_prevalence=0.1)
    positives = [it for it in rare["labeled"] if it["label"][0] > 0]
    assert len(positives) / len(rare["labeled"]) == pytest.approx(0.1, abs=0.005)
    moved = set(ids(plain["labeled"])) - set(ids(rare["labeled"]))
    assert moved <= set(ids(rare["unlabeled"])) and all(it["label"][0] > 0 for it in plain["labeled"]
                                                         if it["id"] in moved)
    assert ids(rare["validation"]) == ids(plain["validation"]) and ids(rare["test"]) == ids(plain["test"])
    assert make_split(pool, 0.2, seed=3, labeled_prevalence=0.5)["labeled"] == plain["labeled"]  # already below
    with pytest.raises(ValueError, match=r"labeled_prevalence must be in \(0, 1\)"):
        make_split(pool, 0.2, labeled_prevalence=1.0)
    multi = [dict(it, label=[it["label"][0], 1.0 - it["label"][0]]) for it in pool]
    with pytest.raises(ValueError, match="binary labels only"):
        make_split(multi, 0.2, labeled_prevalence=0.1)


def test_multilabel_rare_class_reaches_labeled_part():
    rng = np.random.default_rng(0)
    pool = [
        {"image": f"/d/{i}.png", "label": [float(rng.random() < 0.4), float(i % 50 == 0)], "id": f"{i}.png"}
        for i in range(1000)
    ]  # class 1 has 20 positives; 10% labeled of 700 training images should hold about 1-2 of them
    split = make_split(pool, 0.1)
    rare = {p: sum(it["label"][1] for it in split[p]) for p in PARTS}
    assert rare["labeled"] >= 1 and abs(rare["test"] - 4) <= 1 and abs(rare["validation"] - 2) <= 1


def test_deterministic_and_order_independent():
    pool = make_items(300, per_patient=3)
    first = make_split(pool, 0.3, seed=5)
    assert make_split(list(reversed(pool)), 0.3, seed=5) == first
    other = make_split(pool, 0.3, seed=6)
    assert ids(other["labeled"]) != ids(first["labeled"])


def test_held_out_parts_do_not_depend_on_labeled_fraction():
    pool = make_items(400)
    a, b = make_split(pool, 0.1, seed=3), make_split(pool, 0.5, seed=3)
    assert a["validation"] == b["validation"] and a["test"] == b["test"]
    assert len(b["labeled"]) > len(a["labeled"])


def test_given_validation_and_test_are_kept():
    pool, held = make_items(200), make_items(30, seed=1)
    validation = [{**it, "id": "val/" + it["id"]} for it in held[:10]]
    test = [{**it, "id": "test/" + it["id"]} for it in held[10:]]
    split = make_split(pool, 0.5, validation=validation, test=test)
    assert ids(split["validation"]) == sorted(ids(validation)) and ids(split["test"]) == sorted(ids(test))
    assert len(split["labeled"]) + len(split["unlabeled"]) == 200


def test_full_labeled_fraction_leaves_unlabeled_empty():
    split = make_split(make_items(100), 1.0)
    assert split["unlabeled"] == [] and len(split["labeled"]) == 70


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_labeled_fraction(fraction):
    with pytest.raises(ValueError, match="labeled_fraction"):
        make_split(make_items(50), fraction)


def test_bad_arguments():
    with pytest.raises(ValueError, match="val_fraction"):
        make_split(make_items(50), 0.5, val_fraction=1.0)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction"):
        make_split(make_items(50), 0.5, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="empty pool"):
        make_split([], 0.5)
    with pytest.raises(ValueError, match="more than once"):
        make_split(make_items(10) * 2, 0.5)


def test_labeled_part_without_positive_or_negative():
    pool = make_items(100, prevalence=0.0)
    pool[0]["label"] = [1.0]
    with pytest.raises(ValueError, match=r"no positive example of class 'Effusion' \(1 in the training pool\): "
                                         r"whole patients move .*need not help; try another seed"):
        make_split(pool, 0.05, classes=["Effusion"])
    all_positive = [{**it, "label": [1.0]} for it in pool]
    with pytest.raises(ValueError, match="no negative example"):
        make_split(all_positive, 0.5)


def _multilabel_pool(n: int = 300) -> list[dict]:
    """Three classes: A common, B rarer, C with two positive images of one patient."""
    rng = np.random.default_rng(4)
    items = []
    for i in range(n):
        label = [float(rng.random() < 0.4), float(rng.random() < 0.15), float(i in (8, 9))]
        items.append({"image": f"/d/{i}.png", "label": label, "id": f"{i:04d}.png", "patient_id": str(i // 2)})
    return items


def test_rare_multilabel_class_is_left_out_and_named(caplog):
    pool = _multilabel_pool()
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        split = make_split(pool, 0.1, seed=0, classes=["A", "B", "C"])
    # patient 3 (images 8 and 9, both C) is not in the 10% labeled part with this seed
    labeled_ids = set(ids(split["labeled"]))
    assert not {"0008.png", "0009.png"} & labeled_ids
    in_training = sum(1 for p in ("labeled", "unlabeled") for it in split[p] if it["id"] in ("0008.png", "0009.png"))
    assert split["classes"] == ["A", "B"]
    assert split["left_out_classes"] == {"C": {"pool": in_training, "labeled": 0}}
    assert all(len(it["label"]) == 2 for p in PARTS for it in split[p])
    original = {it["id"]: it["label"] for it in pool}
    assert all(it["label"] == original[it["id"]][:2] for p in PARTS for it in split[p])
    assert "leaving out class(es) ['C']" in caplog.text
    assert f"C ({in_training} in the training pool, 0 labeled)" in caplog.text
    assert "another seed" in caplog.text and "min_positives" in caplog.text and "`classes`" in caplog.text


def test_min_positives_and_all_classes_rare():
    pool = _multilabel_pool()
    split = make_split(pool, 0.1, seed=0, classes=["A", "B", "C"], min_positives=1)
    positives = {name: sum(it["label"][k] for it in split["labeled"]) for k, name in enumerate(split["classes"])}
    threshold = int(positives["B"]) + 1  # B just below the threshold, A well above it
    assert positives["A"] >= threshold
    higher = make_split(pool, 0.1, seed=0, classes=["A", "B", "C"], min_positives=threshold)
    assert higher["classes"] == ["A"] and set(higher["left_out_classes"]) == {"B", "C"}
    with pytest.raises(ValueError, match="every class has fewer than min_positives=1000 .*another seed, a lower "
                                         "min_positives, or `classes`"):
        make_split(pool, 0.1, seed=0, classes=["A", "B", "C"], min_positives=1000)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="min_positives must be an integer >= 1"):
            make_split(pool, 0.1, min_positives=bad)


def test_fingerprint():
    pool = make_items(20)
    base = fingerprint(pool)
    assert fingerprint(list(reversed(pool))) == base
    assert fingerprint(make_items(20, root="/moved/elsewhere")) == base
    relabeled = [dict(it) for it in pool]
    relabeled[3]["label"] = [1.0 - relabeled[3]["label"][0]]
    assert fingerprint(relabeled) != base
    assert fingerprint(pool + make_items(21)[20:]) != base


def write_png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def make_folders(root: Path, n_normal: int = 28, n_positive: int = 12) -> Path:
    for i in range(n_normal):
        write_png(root / f"train/NORMAL/n{i:03d}.png")
    for i in range(n_positive):
        write_png(root / f"train/OPACITY/p{i:03d}.png", 200)
    return root


def test_prepare_split_writes_and_reuses(tmp_path, caplog):
    source = ClassFolders(str(make_folders(tmp_path / "data")), "OPACITY")
    split_file = tmp_path / "out" / "split.json"
    with caplog.at_level(logging.INFO, logger="monai_cxr_ssl"):
        split = prepare_split(source, str(split_file), labeled_fraction=0.5, seed=2)
    assert "labeled=" in caplog.text
    stored = json.loads(split_file.read_text())
    assert stored == split and stored["version"] == 1 and stored["classes"] == ["OPACITY"]
    assert stored["params"] == {"labeled_fraction": 0.5, "seed": 2, "val_fraction": 0.1, "test_fraction": 0.2}
    assert stored["counts"] == {p: len(stored[p]) for p in PARTS} and sum(stored["counts"].values()) == 40
    assert stored["positives"]["labeled"] == [sum(it["label"][0] for it in stored["labeled"])]
    assert stored["skipped"] == [] and load_split(split_file) == stored
    assert prepare_split(source, str(split_file), labeled_fraction=0.5, seed=2) == split
    rare = prepare_split(source, tmp_path / "rare.json", labeled_fraction=0.5, seed=2, labeled_prevalence=0.1)
    assert rare["params"]["labeled_prevalence"] == 0.1 and rare["positives"]["labeled"] == [1]


def test_prepare_split_follows_a_moved_dataset(tmp_path):
    split_file = tmp_path / "split.json"
    first = prepare_split(ClassFolders(str(make_folders(tmp_path / "a")), "OPACITY"), split_file, 0.5)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = prepare_split(ClassFolders(str(tmp_path / "b"), "OPACITY"), split_file, 0.5)
    assert [ids(moved[p]) for p in PARTS] == [ids(first[p]) for p in PARTS]
    assert all(Path(it["image"]).is_file() for p in PARTS for it in moved[p])


def test_prepare_split_refuses_changed_data_or_params(tmp_path):
    root = make_folders(tmp_path / "data")
    source = ClassFolders(str(root), "OPACITY")
    split_file = tmp_path / "split.json"
    prepare_split(source, split_file, 0.5)
    with pytest.raises(ValueError, match="parameters.*Delete the file"):
        prepare_split(source, split_file, 0.25)
    with pytest.raises(ValueError, match="parameters"):
        prepare_split(source, split_file, 0.5, seed=1)
    write_png(root / "train/NORMAL/extra.png")
    with pytest.raises(ValueError, match="different data.*Delete the file"):
        prepare_split(source, split_file, 0.5)


def test_prepare_split_bad_images(tmp_path, caplog):
    root = make_folders(tmp_path / "data")
    (root / "train/NORMAL/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    source = ClassFolders(str(root), "OPACITY")
    with pytest.raises(ValueError, match=r"1 image\(s\).*broken\.png.*bad_images='skip'"):
        prepare_split(source, tmp_path / "fail.json", 0.5)
    assert not (tmp_path / "fail.json").exists()
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        split = prepare_split(source, tmp_path / "skip.json", 0.5, bad_images="skip")
    assert split["skipped"] == ["train/NORMAL/broken.png"] and "1 unreadable" in caplog.text
    assert "train/NORMAL/broken.png" not in {it["id"] for p in PARTS for it in split[p]}
    assert sum(split["counts"].values()) == 40
    with pytest.raises(ValueError, match="bad_images"):
        prepare_split(source, tmp_path / "other.json", 0.5, bad_images="ignore")


def test_prepare_split_num_classes(tmp_path):
    source = ClassFolders(str(make_folders(tmp_path)), "OPACITY")
    with pytest.raises(ValueError, match=r"num_classes is 14 but the split keeps 1 class\(es\) \['OPACITY'\]; "
                                         "remove the num_classes setting .* or set it to 1"):
        prepare_split(source, tmp_path / "split.json", 0.5, num_classes=14)
    assert not (tmp_path / "split.json").exists()


def _three_class_csv(tmp_path: Path) -> CsvSource:
    rows = []
    for i, it in enumerate(_multilabel_pool(120)):
        write_png(tmp_path / f"img/{i}.png")
        rows.append([f"img/{i}.png", *(int(v) for v in it["label"]), it["patient_id"]])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "A", "B", "C", "patient"], *rows])
    return CsvSource(str(tmp_path / "labels.csv"), label_columns=["A", "B", "C"], patient_column="patient")


def test_prepare_split_classes_and_min_positives_are_recorded(tmp_path):
    source = _three_class_csv(tmp_path)
    split = prepare_split(source, tmp_path / "split.json", 0.5, classes=["C", "A"], min_positives=3, num_classes=1)
    stored = json.loads((tmp_path / "split.json").read_text())
    assert stored["classes"] == split["classes"] == ["A"]  # C has 2 positive images in all: left out
    assert stored["left_out_classes"]["C"]["labeled"] < 3
    assert stored["params"]["classes"] == ["C", "A"] and stored["params"]["min_positives"] == 3
    assert all(len(it["label"]) == 1 for p in PARTS for it in stored[p])
    assert stored["positives"]["labeled"] == [sum(it["label"][0] for it in stored["labeled"])]
    again = prepare_split(source, tmp_path / "split.json", 0.5, classes=["C", "A"], min_positives=3)  # reused
    assert again["classes"] == ["A"] and again["labeled"] == split["labeled"]
    with pytest.raises(ValueError, match="made from different parameters"):
        prepare_split(source, tmp_path / "split.json", 0.5, classes=["A", "B"], min_positives=3)
    with pytest.raises(ValueError, match="made from different parameters"):
        prepare_split(source, tmp_path / "split.json", 0.5, classes=["C", "A"])


@pytest.mark.parametrize("classes, message", [
    (["A", "Hernia"], r"classes: unknown class\(es\) \['Hernia'\] for the CsvSource source; "
                      r"choose from \['A', 'B', 'C'\]"),
    (["A", "A"], r"class\(es\) \['A'\] listed twice"),
    ([], "classes must be a non-empty list"),
    ("A", "classes must be a non-empty list"),
])
def test_prepare_split_bad_classes(tmp_path, classes, message):
    with pytest.raises(ValueError, match=message):
        prepare_split(_three_class_csv(tmp_path), tmp_path / "split.json", 0.5, classes=classes)
    assert not (tmp_path / "split.json").exists()


def test_chestxray14_sample_rare_classes_and_subset(shared_data, tmp_path, caplog):
    from monai_cxr_ssl.data import ChestXray14

    source = ChestXray14(str(shared_data / "chestxray14_sample"), task="multilabel")
    data = source.load()
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        split = prepare_split(source, tmp_path / "split.json", 0.1, seed=0)
    left_out = split["left_out_classes"]
    assert left_out and set(left_out) | set(split["classes"]) == set(data.classes)
    assert [c for c in data.classes if c in split["classes"]] == split["classes"]  # source order kept
    training = split["labeled"] + split["unlabeled"]
    for name, counts in left_out.items():
        pool_positives = int(sum(it["label"][data.classes.index(name)] for it in data.pool
                             if it["id"] in {t["id"] for t in training}))
        assert counts == {"pool": pool_positives, "labeled": 0}
        assert f"{name} ({pool_positives} in the training pool, 0 labeled)" in caplog.text
    assert all(len(it["label"]) == len(split["classes"]) for it in training + split["test"])
    assert split["positives"]["labeled"] == [int(sum(it["label"][k] for it in split["labeled"]))
                                             for k in range(len(split["classes"]))]
    subset = prepare_split(source, tmp_path / "subset.json", 0.1, seed=0, classes=["Effusion", "Pneumonia"])
    assert subset["classes"] == ["Effusion", "Pneumonia"] and subset["left_out_classes"] == {}
    by_id = {it["id"]: it["label"] for it in data.pool + data.test}
    eff, pneu = data.classes.index("Effusion"), data.classes.index("Pneumonia")
    assert all(it["label"] == [by_id[it["id"]][eff], by_id[it["id"]][pneu]] for it in subset["test"])


def test_prepare_split_groups_patients_without_writing_their_ids(tmp_path):
    rows = []
    for i in range(60):
        write_png(tmp_path / f"img/{i}.png")
        rows.append([f"img/{i}.png", int(i % 3 == 0), f"SECRET-{i // 3}"])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "label", "patient"], *rows])
    source = CsvSource(str(tmp_path / "labels.csv"), patient_column="patient")
    split = prepare_split(source, tmp_path / "split.json", 0.5)
    part_of = {it["id"]: p for p in PARTS for it in split[p]}
    assert all(len({part_of[f"img/{i + j}.png"] for j in range(3)}) == 1 for i in range(0, 60, 3))
    assert "SECRET" not in (tmp_path / "split.json").read_text()


def test_load_split_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_split(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_split(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"version": 1}')
    with pytest.raises(ValueError, match="not a version-1 split file"):
        load_split(tmp_path / "other.json")


def _exclusive_pool(n: int, per_patient: int = 1) -> list[dict]:
    """``n`` one-hot items of three classes (about 60/30/10%), patients of ``per_patient`` images of one class."""
    rng = np.random.default_rng(5)
    classes = rng.choice(3, size=n // per_patient, p=[0.6, 0.3, 0.1])
    return [{"image": f"/data/{i:04d}.png", "id": f"{i:04d}.png", "patient_id": str(i // per_patient),
             "label": [float(c == classes[i // per_patient]) for c in range(3)]} for i in range(n)]


@pytest.mark.parametrize("per_patient", [1, 3])
def test_labeled_per_class_draws_that_many_images_of_each_class(per_patient):
    pool = _exclusive_pool(600, per_patient)
    split = make_split(pool, 0.1, seed=2, labeled_per_class=6, classes=["a", "b", "c"])
    counts = np.sum([it["label"] for it in split["labeled"]], axis=0)
    assert counts.tolist() == [6, 6, 6]
    assert sorted(sum((ids(split[p]) for p in PARTS), [])) == sorted(ids(pool))
    patients = [{it["patient_id"] for it in split[p]} for p in PARTS]
    assert not any(patients[i] & patients[j] for i in range(4) for j in range(i + 1, 4))
    # validation and test are the labeled_fraction split's: counts compare on the same held-out images
    by_fraction = make_split(pool, 0.1, seed=2, classes=["a", "b", "c"])
    assert split["validation"] == by_fraction["validation"] and split["test"] == by_fraction["test"]
    again = make_split(pool, 0.1, seed=2, labeled_per_class=6, classes=["a", "b", "c"])
    other = make_split(pool, 0.1, seed=3, labeled_per_class=6, classes=["a", "b", "c"])
    assert ids(again["labeled"]) == ids(split["labeled"]) != ids(other["labeled"])


def test_labeled_per_class_on_binary_labels_counts_the_negatives_as_a_class():
    split = make_split(make_items(400, prevalence=0.2), 0.1, labeled_per_class=10)
    positives = sum(it["label"][0] for it in split["labeled"])
    assert (len(split["labeled"]), positives) == (20, 10)


def test_labeled_per_class_refusals():
    multilabel = _exclusive_pool(60)
    multilabel[0]["label"] = [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"mutually exclusive classes .* image '0000.png' has 2 positive"):
        make_split(multilabel, 0.1, labeled_per_class=2)
    with pytest.raises(ValueError, match=r"labeled_per_class=40: class 'c' has \d+ image\(s\) in the training pool"):
        make_split(_exclusive_pool(300), 0.1, labeled_per_class=40, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="labeled_prevalence and labeled_per_class both"):
        make_split(make_items(200), 0.1, labeled_per_class=5, labeled_prevalence=0.1)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="labeled_per_class must be an integer >= 1"):
            make_split(make_items(200), 0.1, labeled_per_class=bad)
    from monai_cxr_ssl.settings import check_values

    with pytest.raises(ValueError, match="labeled_per_class"):  # the setting, before any work
        check_values({"labeled_per_class": 0})
    check_values({"labeled_per_class": None})


def test_prepare_split_records_labeled_per_class(tmp_path):
    for cls, n in (("NORMAL", 20), ("OPACITY", 12)):
        for i in range(n):
            write_png(tmp_path / "train" / cls / f"{i}.png")
    source = ClassFolders(str(tmp_path))
    split = prepare_split(source, tmp_path / "split.json", 0.1, labeled_per_class=3)
    assert split["params"]["labeled_per_class"] == 3
    assert np.sum([it["label"] for it in split["labeled"]], axis=0).tolist() == [3, 3]
    assert prepare_split(source, tmp_path / "split.json", 0.1, labeled_per_class=3)["labeled"] == split["labeled"]
    with pytest.raises(ValueError, match="different parameters"):
        prepare_split(source, tmp_path / "split.json", 0.1, labeled_per_class=4)
