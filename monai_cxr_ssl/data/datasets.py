"""Dataset sources: turn a dataset's own layout into MONAI datalists.

Every source has ``load() -> SourceData``. A datalist item is a dict::

    {"image": "/abs/path.png", "label": [1.0, 0.0, ...], "id": "images/x.png", "patient_id": "42" or None}

``id`` is the path relative to the dataset root (POSIX), so split files and fingerprints do not depend on
where the dataset folder lives. Sources check that every listed image file exists, so a wrong path fails
here, before any training starts.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHESTXRAY14_PATHOLOGIES", "ChestXray14", "ClassFolders", "CsvSource", "SourceData"]

CHESTXRAY14_PATHOLOGIES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
NO_FINDING = "No Finding"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".nii.gz")
_SPLIT_NAMES = {"train": "pool", "val": "validation", "validation": "validation", "test": "test"}


@dataclass
class SourceData:
    """What a source provides: class names, the training pool and the official held-out splits (if any)."""

    classes: list[str]
    pool: list[dict]
    validation: list[dict] | None
    test: list[dict] | None
    root: str


class _Source:
    """Base of the dataset sources: a readable ``repr`` (recorded as an MLflow parameter)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={str(v) if isinstance(v, Path) else v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _item(path: Path, label: Sequence[float], root: Path, patient_id: str | None = None) -> dict:
    """One datalist entry; ``id`` is ``path`` relative to ``root`` (or the absolute path when outside it)."""
    path = Path(os.path.abspath(path))
    try:
        item_id = path.relative_to(root).as_posix()
    except ValueError:
        item_id = path.as_posix()
    return {"image": str(path), "label": [float(v) for v in label], "id": item_id, "patient_id": patient_id}


def _check_files_exist(items: Iterable[dict], source: str) -> None:
    """Raise if any item's image file is missing, naming how many and the first few."""
    missing = [it["image"] for it in items if not os.path.isfile(it["image"])]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} image file(s) listed but not found, e.g. {missing[:5]}. "
            "Check the dataset root / image folder settings, or remove these entries from the label file."
        )


def _validated(data: SourceData, source: str, selection: str) -> SourceData:
    if not data.pool:
        raise ValueError(f"{source}: no training images left after selecting {selection}; check the settings.")
    _check_files_exist(data.pool + (data.validation or []) + (data.test or []), source)
    return data


def _read_csv(path: Path, required: Sequence[str]) -> list[dict]:
    """Rows of a CSV file as dicts, after checking that ``required`` columns are present."""
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        absent = [c for c in required if c not in columns]
        if absent:
            raise ValueError(f"{path}: missing column(s) {absent}; found {columns}.")
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


class ChestXray14(_Source):
    """NIH ChestX-ray14 (Wang et al. 2017) from its official download layout.

    Args:
        root: folder holding ``Data_Entry_2017.csv`` (and ``train_val_list.txt`` / ``test_list.txt`` if present).
        task: ``"binary:<Pathology>"`` — images with that pathology (label 1) against ``No Finding`` images
            (label 0), all other images dropped; or ``"multilabel"`` — all images, 14-class multi-hot labels.
        image_dir: folder with the PNG files, relative to ``root`` unless absolute; default ``root/images`` if
            it exists, else the official ``root/images_*/images`` folders.
        labels_csv: label file, relative to ``root`` unless absolute.

    The official split lists become ``pool`` / ``test`` (no official validation split); without them the
    whole selection is the pool and ``test`` is None. ``patient_id`` is the ``Patient ID`` column.
    """

    def __init__(
        self,
        root: str,
        task: str = "binary:Effusion",
        image_dir: str | None = None,
        labels_csv: str = "Data_Entry_2017.csv",
    ) -> None:
        self.root = Path(os.path.abspath(root))
        self.image_dir = image_dir
        self.labels_csv = labels_csv
        self.task = task
        self.classes = self._parse_task(task)

    @staticmethod
    def _parse_task(task: str) -> list[str]:
        if task == "multilabel":
            return list(CHESTXRAY14_PATHOLOGIES)
        kind, _, name = task.partition(":")
        if kind != "binary" or not name:
            raise ValueError(f"ChestXray14: unknown task {task!r}; use 'multilabel' or 'binary:<Pathology>'.")
        if name not in CHESTXRAY14_PATHOLOGIES:
            raise ValueError(
                f"ChestXray14: unknown pathology {name!r} in task {task!r}; "
                f"valid: {', '.join(CHESTXRAY14_PATHOLOGIES)}."
            )
        return [name]

    def _image_paths(self) -> dict[str, Path] | Path:
        """The image folder, or a name -> path index over the official ``images_*/images`` folders."""
        if self.image_dir is not None:
            folder = Path(os.path.abspath(self.root / self.image_dir))
            if not folder.is_dir():
                raise FileNotFoundError(f"ChestXray14: image_dir not found: {folder}")
            return folder
        if (self.root / "images").is_dir():
            return self.root / "images"
        parts = sorted(p for p in self.root.glob("images_*/images") if p.is_dir())
        if not parts:
            raise FileNotFoundError(
                f"ChestXray14: no image folder under {self.root} (expected images/ or images_*/images/); "
                "set image_dir to the folder holding the PNG files."
            )
        return {entry.name: Path(entry.path) for part in parts for entry in os.scandir(part) if entry.is_file()}

    def _label(self, findings: set[str]) -> list[float] | None:
        if len(self.classes) > 1:
            return [float(c in findings) for c in self.classes]
        if self.classes[0] in findings:
            return [1.0]
        return [0.0] if findings == {NO_FINDING} else None

    def load(self) -> SourceData:
        if not self.root.is_dir():
            raise FileNotFoundError(f"ChestXray14: dataset root not found: {self.root}")
        rows = _read_csv(self.root / self.labels_csv, ("Image Index", "Finding Labels", "Patient ID"))
        images = self._image_paths()
        items = {}
        for line, row in enumerate(rows, start=2):
            findings = {f.strip() for f in row["Finding Labels"].split("|")}
            unknown = findings - set(CHESTXRAY14_PATHOLOGIES) - {NO_FINDING}
            if unknown:
                raise ValueError(
                    f"ChestXray14: {self.root / self.labels_csv}, line {line}: unknown finding(s) {sorted(unknown)}; "
                    f"expected {NO_FINDING!r} or names from {list(CHESTXRAY14_PATHOLOGIES)}."
                )
            label = self._label(findings)
            if label is None:
                continue
            name = row["Image Index"]
            if isinstance(images, Path):
                path = images / name
            else:
                path = images.get(name, self.root / "images_*" / "images" / name)
            items[name] = _item(path, label, self.root, row["Patient ID"] or None)
        lists = [self.root / "train_val_list.txt", self.root / "test_list.txt"]
        if any(p.is_file() for p in lists):
            pool_names, test_names = (self._read_list(p) for p in lists)
            data = SourceData(
                self.classes,
                [items[n] for n in pool_names if n in items],
                None,
                [items[n] for n in test_names if n in items] or None,
                str(self.root),
            )
        else:
            data = SourceData(self.classes, list(items.values()), None, None, str(self.root))
        return _validated(data, f"ChestXray14({self.root})", f"task={self.task!r}")

    @staticmethod
    def _read_list(path: Path) -> list[str]:
        if not path.is_file():
            raise FileNotFoundError(
                f"ChestXray14: official split file {path} not found (train_val_list.txt and test_list.txt "
                "must both be present, or both absent)."
            )
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def find_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (and its sub-folders if ``recursive``) with a supported suffix, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(
        p
        for p in (folder.rglob("*") if recursive else folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


class ClassFolders(_Source):
    """Class-per-folder layout ``root/{train,val,test}/<CLASS>/*`` (e.g. Kermany pneumonia): a binary task, or
    mutually exclusive classes.

    Args:
        root: dataset folder; ``train/`` is required, ``val/`` and ``test/`` are used when present.
        positive_class: folder whose images get label 1 (one class: a binary task); None: every class folder is a
            class and each image's label is one-hot over them (mutually exclusive classes, sorted by name; the
            semi-supervised GAN's kind of data).
        negative_classes: with ``positive_class``: folders whose images get label 0; default all other folders.

    ``patient_id`` is None: file names in such datasets are not reliable patient identifiers.
    """

    def __init__(self, root: str, positive_class: str | None = None, negative_classes: Sequence[str] | None = None
                 ) -> None:
        self.root = Path(os.path.abspath(root))
        self.positive_class = positive_class
        self.negative_classes = None if negative_classes is None else list(negative_classes)
        if positive_class is None and negative_classes is not None:
            raise ValueError("ClassFolders: negative_classes needs a positive_class (a binary task); without one "
                             "every class folder is a class.")

    @staticmethod
    def _split(folder: Path, labels: dict[str, list[float]], root: Path) -> list[dict]:
        items = []
        for name, label in labels.items():
            if (folder / name).is_dir():
                items += [_item(p, label, root) for p in find_images(folder / name)]
        return sorted(items, key=lambda it: it["id"])

    def load(self) -> SourceData:
        train = self.root / "train"
        if not train.is_dir():
            raise FileNotFoundError(f"ClassFolders: folder not found: {train} (expected root/train/<CLASS>/*).")
        found = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
        if self.positive_class is None:
            if len(found) < 2:
                raise ValueError(f"ClassFolders: {train} has {len(found)} class folder(s) ({found}); mutually "
                                 "exclusive classes need at least 2 (or give positive_class for a binary task).")
            classes = found
            labels = {name: [float(k == i) for k in range(len(found))] for i, name in enumerate(found)}
            selection = f"classes={found} (mutually exclusive)"
        else:
            for name in [self.positive_class] + (self.negative_classes or []):
                if name not in found:
                    raise ValueError(f"ClassFolders: class folder {name!r} not found in {train}; found {found}.")
            negatives = self.negative_classes or [n for n in found if n != self.positive_class]
            if self.positive_class in negatives:
                raise ValueError(f"ClassFolders: positive_class {self.positive_class!r} is also in negative_classes.")
            classes = [self.positive_class]
            labels = {self.positive_class: [1.0], **{n: [0.0] for n in negatives}}
            selection = f"positive_class={self.positive_class!r}, negative_classes={negatives}"
        val, test = self.root / "val", self.root / "test"
        data = SourceData(
            classes,
            self._split(train, labels, self.root),
            (self._split(val, labels, self.root) or None) if val.is_dir() else None,
            (self._split(test, labels, self.root) or None) if test.is_dir() else None,
            str(self.root),
        )
        return _validated(data, f"ClassFolders({self.root})", selection)


class CsvSource(_Source):
    """Generic CSV label file: one row per image, one 0/1 column per class.

    Args:
        csv_path: the CSV file.
        image_column: column with image paths, relative to ``root`` (default: the CSV's folder) or absolute.
        label_columns: 0/1 label columns, one per class; their names are the class names.
        patient_column: optional column with patient ids, used to keep a patient's images in one split part.
        split_column: optional column with ``train``, ``val``/``validation`` or ``test`` per row; without it
            every row is in the training pool.
        root: folder that relative image paths are resolved against.
    """

    def __init__(
        self,
        csv_path: str,
        image_column: str = "image",
        label_columns: Sequence[str] | str = ("label",),
        patient_column: str | None = None,
        split_column: str | None = None,
        root: str | None = None,
    ) -> None:
        self.csv_path = Path(os.path.abspath(csv_path))
        self.root = Path(os.path.abspath(root)) if root is not None else self.csv_path.parent
        self.image_column = image_column
        self.label_columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
        if not self.label_columns:
            raise ValueError("CsvSource: label_columns must name at least one column.")
        self.patient_column = patient_column
        self.split_column = split_column

    def _label(self, row: dict, line: int) -> list[float]:
        label = []
        for col in self.label_columns:
            try:
                value = float(row[col])
            except ValueError:
                value = None
            if value not in (0.0, 1.0):
                raise ValueError(
                    f"{self.csv_path}, line {line}: column {col!r} is {row[col]!r}; labels must be 0 or 1."
                )
            label.append(value)
        return label

    def load(self) -> SourceData:
        required = [self.image_column, *self.label_columns]
        required += [c for c in (self.patient_column, self.split_column) if c is not None]
        parts: dict[str, list[dict]] = {"pool": [], "validation": [], "test": []}
        for line, row in enumerate(_read_csv(self.csv_path, required), start=2):
            if not row[self.image_column]:
                raise ValueError(f"{self.csv_path}, line {line}: empty {self.image_column!r} column.")
            part = "pool"
            if self.split_column is not None:
                part = _SPLIT_NAMES.get(row[self.split_column].lower())
                if part is None:
                    raise ValueError(
                        f"{self.csv_path}, line {line}: {self.split_column!r} is {row[self.split_column]!r}; "
                        f"use one of {sorted(_SPLIT_NAMES)}."
                    )
            patient = (row[self.patient_column] or None) if self.patient_column is not None else None
            parts[part].append(_item(self.root / row[self.image_column], self._label(row, line), self.root, patient))
        data = SourceData(
            list(self.label_columns), parts["pool"], parts["validation"] or None, parts["test"] or None, str(self.root)
        )
        selection = f"split_column={self.split_column!r} == 'train'" if self.split_column else "all rows"
        return _validated(data, f"CsvSource({self.csv_path})", selection)
