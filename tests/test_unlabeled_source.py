"""The user's own unlabeled images (``unlabeled_source``): a folder or CSV of images without labels joins the
unlabeled part of the split, deduplicated against the dataset, fingerprinted, and used by the semi-supervised
stages, also with ``labeled_fraction: 1``."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import radiograph_dicom
from PIL import Image

from monai_cxr_ssl.data import ClassFolders, make_synthetic_dataset, prepare_split
from monai_cxr_ssl.data.unlabeled import ID_PREFIX

SIZE = 40


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)


def _png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pixels(seed)).save(path)
    return path


def _dicom(path: Path, pixels: np.ndarray, header: bool = True) -> Path:
    """A DX DICOM of ``pixels`` (``conftest.radiograph_dicom``, with patient tags that must never reach a log or the
    split file): a Part-10 file, or (``header`` False) a bare data set, as some exports write."""
    ds = radiograph_dicom(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if header:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    return path


def _random_teacher(output_dir: Path) -> None:
    """A teacher checkpoint where the teacher stage leaves it; the stages after it do not care how it was trained
    (with ``labeled_fraction: 1`` it is trained on every labeled image, as without ``unlabeled_source``)."""
    import torch

    from monai_cxr_ssl.networks import CXRDenseNet121

    (output_dir / "teacher" / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(CXRDenseNet121(num_classes=1).state_dict(), output_dir / "teacher" / "models" / "model.pt")


def _settings(tmp_path: Path, data: str, pacs: Path) -> dict:
    return {
        "dataset_dir": data, "output_dir": str(tmp_path / "out"), "tracking_uri": f"sqlite:///{tmp_path}/ml.db",
        "image_size": 40, "crop_size": 32, "batch_size": 4, "labeled_fraction": 1, "num_workers": 0,
        "num_epochs": 1, "cache_rate": 0.0, "unlabeled_source": str(pacs),
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dataset(tmp_path) -> Path:
    return Path(make_synthetic_dataset(tmp_path / "data", n_train=24, n_test=6, image_size=32, seed=1))


def _pacs(root: Path, dataset: Path) -> dict[str, str]:
    """A PACS-like export under ``root``: nested folders, DICOM files without suffix (with and without the Part-10
    header), PNGs, a copy of a labeled image, and files that are not images. Returns the expected id -> fate."""
    _dicom(root / "study1" / "series1" / "IM0001", _pixels(101))
    _dicom(root / "study1" / "series1" / "IM0002", _pixels(102), header=False)
    _dicom(root / "study2" / "scan.dcm", _pixels(103))
    _png(root / "study2" / "deep" / "er" / "a.png", 104)
    _png(root / "b.png", 105)
    labeled = sorted((dataset / "train").rglob("*.png"))[3]
    shutil.copy(labeled, root / "study2" / "copy_of_labeled.png")
    (root / "study1" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (root / "notes.txt").write_text("report: not an image")
    _png(root / ".thumbs" / "t.png", 106)
    return {
        "study1/series1/IM0001": "added", "study1/series1/IM0002": "added", "study2/scan.dcm": "added",
        "study2/deep/er/a.png": "added", "b.png": "added",
        "study2/copy_of_labeled.png": labeled.relative_to(dataset).as_posix(),
    }


def test_folder_source_joins_the_unlabeled_part_without_copies_of_the_dataset(dataset, tmp_path, caplog):
    pacs = tmp_path / "pacs"
    fates = _pacs(pacs, dataset)
    source = ClassFolders(str(dataset), "OPACITY")
    with caplog.at_level(logging.INFO, logger="monai_cxr_ssl"):
        split = prepare_split(source, tmp_path / "split.json", 1.0, unlabeled_source=str(pacs))
    plain = prepare_split(source, tmp_path / "plain.json", 1.0)

    added = sorted(ID_PREFIX + k for k, v in fates.items() if v == "added")
    assert [it["id"] for it in split["unlabeled"]] == added and plain["unlabeled"] == []
    assert all(set(it) == {"image", "id"} and Path(it["image"]).is_file() for it in split["unlabeled"])
    for part in ("labeled", "validation", "test"):  # the labeled source is split as without unlabeled_source
        assert split[part] == plain[part]
    assert split["counts"] == {"labeled": len(plain["labeled"]), "unlabeled": 5,
                               "validation": len(plain["validation"]), "test": len(plain["test"])}

    # the duplicate, checked against hashes of every dataset file computed here
    by_hash = {_sha256(p): p.relative_to(dataset).as_posix() for p in sorted(dataset.rglob("*.png"))}
    expected_duplicates = {ID_PREFIX + k: v for k, v in fates.items() if v != "added"}
    assert {ID_PREFIX + p.relative_to(pacs).as_posix(): by_hash[_sha256(p)]
            for p in pacs.rglob("*.png") if _sha256(p) in by_hash} == expected_duplicates
    record = split["unlabeled_source"]
    assert record["duplicates"] == expected_duplicates
    assert record["counts"] == {"found": 6, "added": 5, "duplicates": 1, "skipped": 0, "ignored": 3}
    assert [e.split(" (")[0] for e in record["ignored_examples"]] == [".thumbs/t.png", "notes.txt", "study1/DICOMDIR"]
    assert "dropping 1 image(s)" in caplog.text and "ignoring 3 file(s)" in caplog.text
    assert split["fingerprint"] != plain["fingerprint"]
    assert split["split_fingerprint"] != plain["split_fingerprint"]
    text = (tmp_path / "split.json").read_text() + caplog.text
    assert "Doe^Jane" not in text and "PID-0042" not in text  # patient identifiers of the DICOM headers


def test_a_changed_folder_is_refused_and_a_moved_one_followed(dataset, tmp_path):
    pacs = tmp_path / "pacs"
    _pacs(pacs, dataset)
    source = ClassFolders(str(dataset), "OPACITY")
    split_file = tmp_path / "split.json"
    first = prepare_split(source, split_file, 1.0, unlabeled_source=pacs)
    assert prepare_split(source, split_file, 1.0, unlabeled_source=pacs) == first

    shutil.move(pacs, tmp_path / "moved")
    moved = prepare_split(source, split_file, 1.0, unlabeled_source=tmp_path / "moved")
    assert [it["id"] for it in moved["unlabeled"]] == [it["id"] for it in first["unlabeled"]]
    assert all(it["image"].startswith(str(tmp_path / "moved")) for it in moved["unlabeled"])
    pacs = tmp_path / "moved"

    _png(pacs / "new" / "c.png", 107)
    with pytest.raises(ValueError, match=r"different unlabeled images.*1 image\(s\) added.*new/c\.png.*Delete the"):
        prepare_split(source, split_file, 1.0, unlabeled_source=pacs)
    (pacs / "new" / "c.png").unlink()
    (pacs / "b.png").unlink()
    with pytest.raises(ValueError, match=r"0 image\(s\) added.*1 removed.*b\.png"):
        prepare_split(source, split_file, 1.0, unlabeled_source=pacs)
    _png(pacs / "b.png", 999)  # same name, other content
    (pacs / "b.png").write_bytes((pacs / "b.png").read_bytes() + b"\0")
    with pytest.raises(ValueError, match="same file names, but some files changed size"):
        prepare_split(source, split_file, 1.0, unlabeled_source=pacs)
    with pytest.raises(ValueError, match="made with unlabeled_source=.*now unlabeled_source is null"):
        prepare_split(source, split_file, 1.0)
    plain_file = tmp_path / "plain.json"
    prepare_split(source, plain_file, 1.0)
    with pytest.raises(ValueError, match="made without unlabeled_source, now unlabeled_source="):
        prepare_split(source, plain_file, 1.0, unlabeled_source=pacs)
    _png(dataset / "train" / "NORMAL" / "extra.png", 108)  # the labeled dataset changed, the folder did not
    with pytest.raises(ValueError, match="made from different data; the data or settings changed"):
        prepare_split(source, split_file, 1.0, unlabeled_source=pacs)


def test_corrupt_file_follows_bad_images(dataset, tmp_path, caplog):
    pacs = tmp_path / "pacs"
    _png(pacs / "good.png", 5)
    broken = _dicom(pacs / "sub" / "IM0009", _pixels(6))
    broken.write_bytes(broken.read_bytes()[:-500])  # truncated pixel data, as a failed transfer leaves it
    source = ClassFolders(str(dataset), "OPACITY")
    with pytest.raises(ValueError, match=r"1 unlabeled_source image\(s\) cannot be read.*sub/IM0009.*"
                                         r"pixel data.*bad_images='skip'"):
        prepare_split(source, tmp_path / "fail.json", 1.0, unlabeled_source=pacs)
    assert not (tmp_path / "fail.json").exists()
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        split = prepare_split(source, tmp_path / "skip.json", 1.0, unlabeled_source=pacs, bad_images="skip")
    assert [it["id"] for it in split["unlabeled"]] == [ID_PREFIX + "good.png"]
    assert split["unlabeled_source"]["skipped"] == [ID_PREFIX + "sub/IM0009"]
    assert split["unlabeled_source"]["counts"]["skipped"] == 1 and "1 unreadable unlabeled_source" in caplog.text
    broken.unlink()  # a file that was skipped and is now gone changes the folder
    with pytest.raises(ValueError, match=r"1 removed.*sub/IM0009"):
        prepare_split(source, tmp_path / "skip.json", 1.0, unlabeled_source=pacs, bad_images="skip")


def test_csv_source_and_clear_errors(dataset, tmp_path):
    images = tmp_path / "export"
    _png(images / "x" / "one.png", 11)
    _dicom(images / "two", _pixels(12))
    elsewhere = _png(tmp_path / "elsewhere" / "three.png", 13)
    listing = images / "list.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([["path", "note"], ["x/one.png", "a"], ["two", "b"], [str(elsewhere), "c"]])
    source = ClassFolders(str(dataset), "OPACITY")
    split = prepare_split(source, tmp_path / "split.json", 1.0, unlabeled_source=listing,
                          unlabeled_source_column="path")
    assert [it["id"] for it in split["unlabeled"]] == sorted(
        [ID_PREFIX + "x/one.png", ID_PREFIX + "two", ID_PREFIX + elsewhere.as_posix()])
    assert {it["image"] for it in split["unlabeled"]} == {str(images / "x/one.png"), str(images / "two"),
                                                         str(elsewhere)}

    def fails(error, match, where, **kwargs):
        with pytest.raises(error, match=match):
            prepare_split(source, tmp_path / f"{where}.json", 1.0, **kwargs)

    fails(ValueError, r"missing column\(s\) \['image'\].*unlabeled_source_column", "column", unlabeled_source=listing)
    (images / "gone.csv").write_text("image\nx/one.png\nnot/here.png\n")
    fails(ValueError, r"gone\.csv lists 1 file\(s\) that do not exist.*line 3.*not/here\.png", "gone",
          unlabeled_source=images / "gone.csv")
    (tmp_path / "empty.csv").write_text("image\n")
    fails(ValueError, "unlabeled_source=.*empty.csv' holds no image", "empty", unlabeled_source=tmp_path / "empty.csv")
    (tmp_path / "twice.csv").write_text(f"image\n{elsewhere}\n{elsewhere}\n")
    fails(ValueError, "line 3 lists .* again", "twice", unlabeled_source=tmp_path / "twice.csv")
    fails(FileNotFoundError, "unlabeled_source=.*nowhere.*no such folder or CSV", "missing",
          unlabeled_source=tmp_path / "nowhere")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("x")
    fails(ValueError, r"holds no image.*1 other file\(s\)", "docs", unlabeled_source=tmp_path / "docs")
    fails(ValueError, "is a file but not a .csv", "txt", unlabeled_source=tmp_path / "docs" / "readme.txt")
    copies = tmp_path / "copies"
    copies.mkdir()
    shutil.copy(next((dataset / "test").rglob("*.png")), copies / "held_out_copy.png")
    fails(ValueError, r"adds no image.*1 copy the dataset", "copies", unlabeled_source=copies)


def test_with_a_labeled_fraction_below_one_no_unlabeled_item_keeps_a_label(dataset, tmp_path):
    pacs = tmp_path / "pacs"
    _png(pacs / "a.png", 21)
    _png(pacs / "b.png", 21)  # the same bytes twice: the second copy is dropped
    source = ClassFolders(str(dataset), "OPACITY")
    plain = prepare_split(source, tmp_path / "plain.json", 0.5)
    split = prepare_split(source, tmp_path / "split.json", 0.5, unlabeled_source=pacs)
    own = [{"image": it["image"], "id": it["id"]} for it in plain["unlabeled"]]
    assert split["unlabeled"] == sorted(own + [{"image": str(pacs / "a.png"), "id": ID_PREFIX + "a.png"}],
                                        key=lambda it: it["id"])
    assert split["unlabeled_source"]["duplicates"] == {ID_PREFIX + "b.png": ID_PREFIX + "a.png"}
    assert split["positives"] == plain["positives"] and split["labeled"] == plain["labeled"]


def test_settings_rules_and_unknown_keys():
    from monai_cxr_ssl.settings import check_override_keys, check_values
    from monai_cxr_ssl.workflow import make_workflow

    check_values({"unlabeled_source": None, "unlabeled_source_column": "path"})
    check_values({"unlabeled_source": "/pacs/export"})
    for key, value in (("unlabeled_source", 3), ("unlabeled_source", " "), ("unlabeled_source_column", "")):
        with pytest.raises(ValueError, match=f"setting {key}="):
            check_values({key: value})
    config = make_workflow(["train"]).parser.get()
    check_override_keys(["unlabeled_source", "unlabeled_source_column"], [config])
    with pytest.raises(ValueError, match="'unlabeled_sources' .*did you mean unlabeled_source"):
        check_override_keys(["unlabeled_sources"], [config])


@pytest.mark.slow
def test_labeled_fraction_one_pseudo_labels_exactly_the_unlabeled_source(tmp_path):
    """The pseudo-label stage (with ``report_true_labels`` on, the default) and the filter on label-less images
    with ``labeled_fraction: 1``; the student's datalist comes from them."""
    from monai_cxr_ssl.data import unlabeled_datalist
    from monai_cxr_ssl.launch import run_bundle
    from monai_cxr_ssl.pseudo_labels import load_filtered_datalist, read_pseudo_labels

    data = make_synthetic_dataset(tmp_path / "data", n_train=20, n_test=6, image_size=48, prevalence=0.4, seed=2)
    extra = Path(make_synthetic_dataset(tmp_path / "other", n_train=8, n_test=4, image_size=48, seed=3))
    pacs = tmp_path / "pacs"
    for i, path in enumerate(sorted((extra / "train").rglob("*.png"))):  # half of them as DICOM without suffix
        target = pacs / f"patient{i % 2}" / f"img{i}.png"
        if i % 2:
            _dicom(target.with_suffix(""), np.asarray(Image.open(path)))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    settings = _settings(tmp_path, data, pacs)
    _random_teacher(tmp_path / "out")
    run_bundle(["pseudo_label", "demo"], **settings, keep_fraction=0.5)
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    ids = sorted(ID_PREFIX + p.relative_to(pacs).as_posix() for p in pacs.rglob("*") if p.is_file())
    assert [it["id"] for it in split["unlabeled"]] == ids and len(ids) == 8
    assert len(split["labeled"]) == split["counts"]["labeled"] == 20 - len(split["validation"])  # λ = 1
    out = tmp_path / "out" / "pseudo_label"
    header, got, probs, labels = read_pseudo_labels(out / "pseudo_labels.jsonl", split["fingerprint"],
                                                    expected_split_fingerprint=split["split_fingerprint"])
    assert got == ids and labels is None and probs.shape == (8, 1)
    student = load_filtered_datalist(out / "filtered.json", split)
    assert len(student) == 4 and {it["id"] for it in student} <= set(ids)
    assert all(it["label"] in ([0.0], [1.0]) for it in student)
    assert [it["id"] for it in unlabeled_datalist(split)] == ids  # the mean teacher's unlabeled images


@pytest.mark.realdata
@pytest.mark.slow
def test_real_dicoms_and_kermany_jpegs_as_unlabeled_source(shared_data, tmp_path):
    """Real DICOMs (one renamed without suffix, as PACS exports name them) and Kermany JPEGs, one of them twice, as
    the unlabeled images of a synthetic labeled set; the mean-teacher stage trains on them."""
    import torch

    from monai_cxr_ssl.data import unlabeled_datalist
    from monai_cxr_ssl.launch import run_bundle

    kermany = sorted((shared_data / "kermany_pneumonia" / "test" / "NORMAL").glob("*.jpeg"))[:6]
    pacs = tmp_path / "pacs"
    (pacs / "dicom" / "series").mkdir(parents=True)
    (pacs / "jpeg").mkdir()
    (pacs / "dicom" / "a.dcm").symlink_to(shared_data / "dicom" / "nih_cxr_dx_uncompressed.dcm")
    (pacs / "dicom" / "series" / "1.2.840.0001").symlink_to(shared_data / "dicom" / "siim_cxr_cr_jpeg_baseline.dcm")
    for path in kermany:
        (pacs / "jpeg" / path.name).symlink_to(path)
    (pacs / "jpeg" / "again.jpeg").symlink_to(kermany[0])
    data = make_synthetic_dataset(tmp_path / "data", n_train=12, n_test=6, image_size=48, prevalence=0.4, seed=2)
    settings = _settings(tmp_path, data, pacs)
    _random_teacher(tmp_path / "out")
    run_bundle(["mean_teacher", "demo"], **settings, mean_teacher_epochs=1, val_fraction=0.25)  # 3 iterations
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    record = split["unlabeled_source"]
    assert record["counts"] == {"found": 9, "added": 8, "duplicates": 1, "skipped": 0, "ignored": 0}
    assert record["duplicates"] == {ID_PREFIX + "jpeg/again.jpeg": ID_PREFIX + f"jpeg/{kermany[0].name}"}
    assert ID_PREFIX + "dicom/series/1.2.840.0001" in {it["id"] for it in split["unlabeled"]}
    assert len(unlabeled_datalist(split)) == split["counts"]["unlabeled"] == 8
    last = torch.load(tmp_path / "out" / "mean_teacher" / "models" / "last.pt", weights_only=False)
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"] > 0 and "teacher_network" in last
