"""The user's own unlabeled images (the ``unlabeled_source`` setting): a folder or a CSV list of image files.

A hospital has a small labeled set and a large folder of images without labels (often a PACS export of DICOM
files without suffix). ``prepare_split`` adds them to the unlabeled part of the split:

- a folder is searched recursively for PNG, JPEG, DICOM (by suffix or by content) and NIfTI files
  (``readers.scan_images``); every other file (hidden files, ``DICOMDIR``, text, ...) is ignored, counted and
  named in the log;
- a ``.csv`` file lists one image per row in its ``unlabeled_source_column`` column (default ``image``), relative
  to the CSV's folder unless absolute; every listed file must exist, whatever its suffix.

An image is named in the split by the id ``unlabeled_source:<path relative to the folder or as the CSV gives it>``,
so ids never collide with the dataset source's and do not change when the folder moves. The fingerprint covers the
ids and file sizes (no image is read for it): adding, removing or replacing a file changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

__all__ = ["ID_PREFIX", "UnlabeledImages", "drop_duplicates", "load_unlabeled_source"]

ID_PREFIX = "unlabeled_source:"
_SETTING = "unlabeled_source"
_FIX = "set unlabeled_source to a folder of images or a .csv file listing them (or null for none)"


@dataclass
class UnlabeledImages:
    """What ``load_unlabeled_source`` found: ``items`` (``{"image", "id", "size"}``, sorted by id), the files of a
    folder that are not images (each with the reason) and the fingerprint of ``items``."""

    source: str
    items: list[dict]
    ignored: list[str]
    fingerprint: str


def _fingerprint(items: Sequence[dict]) -> str:
    """SHA-256 (hex) of the sorted ``(id, size)`` pairs."""
    pairs = sorted((it["id"], it["size"]) for it in items)
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def _entry(path: Path, name: str) -> dict:
    return {"image": os.path.abspath(path), "id": ID_PREFIX + name, "size": os.path.getsize(path)}


def _from_folder(folder: Path) -> tuple[list[dict], list[str]]:
    from monai_cxr_ssl.data.readers import scan_images

    images, ignored = scan_images(folder)
    return [_entry(p, p.relative_to(folder).as_posix()) for p in images], ignored


def _from_csv(path: Path, column: str) -> list[dict]:
    from monai_cxr_ssl.data.datasets import _read_csv

    try:
        rows = _read_csv(path, [column])
    except ValueError as err:
        raise ValueError(f"{_SETTING}: {err} Set unlabeled_source_column to the column that holds the image paths.") \
            from None
    items, missing, seen = [], [], {}
    for line, row in enumerate(rows, start=2):
        name = row[column]
        if not name:
            raise ValueError(f"{_SETTING}: {path}, line {line}: empty {column!r} column; give an image path per row.")
        name = PurePath(name).as_posix()
        if name in seen:
            raise ValueError(f"{_SETTING}: {path}, line {line} lists {name!r} again (first at line {seen[name]}); "
                             "list each image once.")
        seen[name] = line
        file = path.parent / name  # an absolute name stays absolute
        if not file.is_file():
            missing.append(f"line {line}: {file}")
            continue
        items.append(_entry(file, name))
    if missing:
        raise ValueError(
            f"{_SETTING}: {path} lists {len(missing)} file(s) that do not exist, e.g. {missing[:5]}; relative paths "
            "are read from the CSV's folder. Fix the paths or remove these rows."
        )
    return items


def load_unlabeled_source(source: str | os.PathLike, column: str = "image") -> UnlabeledImages:
    """The images of an ``unlabeled_source`` folder or CSV file (see the module docstring).

    Raises:
        FileNotFoundError: the folder or file does not exist.
        ValueError: a file that is not ``.csv``, a CSV without ``column``, with empty or repeated rows or naming
            missing files, or no image at all.
    """
    path = Path(os.path.abspath(source))
    ignored: list[str] = []
    if path.is_dir():
        items, ignored = _from_folder(path)
    elif path.is_file() and path.suffix.lower() == ".csv":
        items = _from_csv(path, column)
    elif path.is_file():
        raise ValueError(f"{_SETTING}={str(source)!r} is a file but not a .csv list of images; {_FIX}.")
    else:
        raise FileNotFoundError(f"{_SETTING}={str(source)!r}: no such folder or CSV file; {_FIX}.")
    if not items:
        found = f" ({len(ignored)} other file(s), e.g. {ignored[:3]})" if ignored else ""
        raise ValueError(
            f"{_SETTING}={str(source)!r} holds no image (PNG, JPEG, DICOM or NIfTI){found}; {_FIX}."
        )
    items.sort(key=lambda it: it["id"])
    return UnlabeledImages(str(path), items, ignored, _fingerprint(items))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def drop_duplicates(items: Sequence[dict], reference: Sequence[dict]) -> tuple[list[dict], dict[str, str]]:
    """``items`` without the files whose bytes equal a ``reference`` file or an earlier item (by id), and a map from
    each dropped id to the id of the file it copies.

    Only files of equal size can be equal, so only those are hashed (BLAKE2b of the whole file): for a large
    folder of images of varied size this reads a small share of the bytes. ``items`` carry their ``size``.
    """
    by_size: dict[int, list[dict]] = defaultdict(list)
    for it in items:
        by_size[it["size"]].append(it)
    references: dict[int, list[dict]] = defaultdict(list)
    for it in reference:
        size = os.path.getsize(it["image"])
        if size in by_size:
            references[size].append(it)
    kept, duplicates = [], {}
    for size, group in by_size.items():
        if len(group) == 1 and size not in references:
            kept += group
            continue
        first: dict[str, str] = {}  # content digest -> id of the first file with it, reference files first
        for it in references.get(size, []):
            first.setdefault(_digest(it["image"]), it["id"])
        for it in sorted(group, key=lambda it: it["id"]):
            digest = _digest(it["image"])
            if digest in first:
                duplicates[it["id"]] = first[digest]
            else:
                first[digest] = it["id"]
                kept.append(it)
    return sorted(kept, key=lambda it: it["id"]), dict(sorted(duplicates.items()))
