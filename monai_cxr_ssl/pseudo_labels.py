"""Pseudo-label files: the teacher's probabilities for the unlabeled images, tied to the split and teacher behind them.

A file is JSON Lines: a header object, one ``{"id", "probs"[, "label"]}`` row per image, and an end marker
``{"count": N}`` so that a truncated copy is told apart from a complete file. The header records the dataset
fingerprint of the split and the SHA-256 of the teacher checkpoint, so a later stage can refuse labels made for
another split or teacher. Probabilities are stored as float32 (the shortest decimal that reads back exactly).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from json.encoder import encode_basestring_ascii
from pathlib import Path
from types import TracebackType

import numpy as np

from monai_cxr_ssl.utils import atomic_write, read_json, write_json

__all__ = ["PseudoLabelFileWriter", "file_sha256", "pseudo_label_header", "read_pseudo_labels"]

FORMAT = "monai_cxr_ssl.pseudo_labels"
VERSION = 1
_RERUN = "re-run the pseudo-label stage"


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """SHA-256 (hex) of the file at ``path``, read in chunks so large checkpoints need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pseudo_label_header(
    classes: Sequence[str],
    dataset_fingerprint: str,
    teacher_checkpoint: str | os.PathLike,
    teacher_run_id: str | None = None,
    split_fingerprint: str | None = None,
) -> dict:
    """The header of a pseudo-label file made by the checkpoint ``teacher_checkpoint`` (hashed here) for the split
    with ``split_fingerprint`` (``splits.split_fingerprint``)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "classes": list(classes),
        "dataset_fingerprint": dataset_fingerprint,
        "teacher_checkpoint": os.fspath(teacher_checkpoint),
        "teacher_checkpoint_sha256": file_sha256(teacher_checkpoint),
        "teacher_run_id": teacher_run_id,
        "split_fingerprint": split_fingerprint,
    }


def _check_header(header: object, path: Path) -> dict:
    """Return ``header`` if it is a pseudo-label header this version understands, else raise a ValueError."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a pseudo-label file (its first line is not a {FORMAT!r} header): give the file that the "
            "pseudo-label stage wrote."
        )
    if header.get("version") != VERSION:
        raise ValueError(
            f"{path} is a pseudo-label file of version {header.get('version')!r}; this package reads version "
            f"{VERSION}: {_RERUN} with this version."
        )
    classes = header.get("classes")
    strings = ("dataset_fingerprint", "teacher_checkpoint", "teacher_checkpoint_sha256")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) for c in classes)
        or not all(isinstance(header.get(k), str) for k in strings)
        or "teacher_run_id" not in header
        or not isinstance(header["teacher_run_id"], (str, type(None)))
    ):
        raise ValueError(
            f"{path}: pseudo-label header is incomplete; it needs a non-empty list of class names and the strings "
            f"{', '.join(strings)} and teacher_run_id (a string or null); use pseudo_label_header to make it."
        )
    return header


def _format_rows(ids: Sequence[str], probs: np.ndarray, labels: np.ndarray | None) -> str:
    """JSON Lines text of a batch of rows: ASCII whatever the locale, float32 values formatted by numpy in bulk."""
    probs_text = probs.astype(str).tolist()
    labels_text = [None] * len(ids) if labels is None else labels.astype(str).tolist()
    return "".join(
        f'{{"id": {encode_basestring_ascii(i)}, "probs": [{", ".join(p)}]'
        + ("" if y is None else f', "label": [{", ".join(y)}]')
        + "}\n"
        for i, p, y in zip(ids, probs_text, labels_text, strict=True)
    )


class _Aborted(Exception):
    """Thrown into ``atomic_write`` so that it deletes its temporary file instead of renaming it."""


class PseudoLabelFileWriter:
    """Writes a pseudo-label file row batch by row batch into a temporary file that ``commit`` renames to ``path``.

    Rows go to disk as they come, so memory does not grow with the number of images; until ``commit`` nothing
    exists at ``path``, and ``abort`` (or an exception inside ``with``) removes the temporary file.

    Args:
        path: the file to write.
        header: the file's header, as made by :func:`pseudo_label_header`.
    """

    def __init__(self, path: str | os.PathLike, header: dict) -> None:
        self.path = Path(path)
        self.header = _check_header(header, self.path)
        self.count = 0
        self._num_classes = len(header["classes"])
        self._with_labels: bool | None = None  # fixed by the first batch: every row has a label or none does
        self._target = atomic_write(self.path)
        self._file = self._target.__enter__()
        try:
            self._file.write(json.dumps(self.header) + "\n")
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> PseudoLabelFileWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def write(self, ids: Sequence[str], probs: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append one row per id: its probabilities (and true labels, for benchmarks that know them).

        ``probs`` and ``labels`` hold one row of per-class values in [0, 1] per id.
        """
        if self._file is None:
            raise RuntimeError(f"{self.path}: the pseudo-label writer is already committed or aborted.")
        ids = list(ids)
        if not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{self.path}: image ids must be strings.")
        probs = self._values(probs, len(ids), "probabilities")
        if self._with_labels is None:
            self._with_labels = labels is not None
        elif self._with_labels != (labels is not None):
            raise ValueError(f"{self.path}: either every batch comes with labels or none does.")
        if labels is not None:
            labels = self._values(labels, len(ids), "labels")
        self._file.write(_format_rows(ids, probs, labels))
        self.count += len(ids)

    def _values(self, values: np.ndarray, num_rows: int, what: str) -> np.ndarray:
        """``values`` as a (num_rows, num_classes) float32 array, checked to lie in [0, 1]."""
        values = np.asarray(values, dtype=np.float32)
        if values.size != num_rows * self._num_classes:
            raise ValueError(
                f"{self.path}: {what} of shape {values.shape} do not match {num_rows} ids and "
                f"{self._num_classes} classes."
            )
        values = values.reshape(num_rows, self._num_classes)
        if not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{self.path}: {what} must lie in [0, 1] (did the post-processing turn the logits into "
                             "probabilities? see monai_cxr_ssl.probabilities).")
        return values

    def commit(self) -> None:
        """Write the end marker, fsync and rename the temporary file to ``path``."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: the pseudo-label writer is already committed or aborted.")
        self._file.write(json.dumps({"count": self.count}) + "\n")
        self._file = None
        self._target.__exit__(None, None, None)

    def abort(self) -> None:
        """Delete the temporary file, leaving ``path`` as it was; does nothing once committed or aborted."""
        if self._file is None:
            return
        self._file = None
        self._target.__exit__(_Aborted, _Aborted(), None)


def _parse_line(line: str, path: Path, lineno: int) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise ValueError(f"{path} is corrupt or truncated at line {lineno}: {_RERUN}.") from None


def read_pseudo_labels(
    path: str | os.PathLike,
    expected_fingerprint: str | None = None,
    expected_checkpoint_sha256: str | None = None,
    expected_split_fingerprint: str | None = None,
) -> tuple[dict, list[str], np.ndarray, np.ndarray | None]:
    """Read a pseudo-label file: ``(header, ids, probs (N, C) float32, labels (N, C) float32 or None)``.

    Raises a ValueError naming the file when it is not a pseudo-label file, is truncated or corrupt, or when its
    dataset fingerprint, split fingerprint or teacher checkpoint hash differ from the expected ones.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        try:
            first = f.readline()
        except UnicodeDecodeError:
            first = ""
        try:
            header = json.loads(first)
        except json.JSONDecodeError:
            header = None
        header = _check_header(header, path)
        for key, expected, what in (
            ("dataset_fingerprint", expected_fingerprint, "dataset fingerprint"),
            ("teacher_checkpoint_sha256", expected_checkpoint_sha256, "teacher checkpoint hash"),
        ):
            if expected is not None and header[key] != expected:
                raise ValueError(
                    f"{path} was made for another split or teacher (its {what} {header[key][:12]}... is not the "
                    f"expected {expected[:12]}...): {_RERUN}."
                )
        if expected_split_fingerprint is not None and header.get("split_fingerprint") != expected_split_fingerprint:
            raise ValueError(
                f"{path} was made for another split (its split fingerprint {header.get('split_fingerprint')}, this "
                f"run's split {expected_split_fingerprint}): its images may be this split's labeled, validation or "
                f"test images; {_RERUN} in this output folder."
            )
        num_classes = len(header["classes"])
        ids: list[str] = []
        probs: list[list[float]] = []
        labels: list[list[float]] = []
        seen: set[str] = set()
        with_label: bool | None = None
        end = None
        try:
            for lineno, line in enumerate(f, start=2):
                row = _parse_line(line, path, lineno)
                if end is not None:
                    raise ValueError(f"{path} is corrupt: line {lineno} follows the end marker: {_RERUN}.")
                if isinstance(row, dict) and set(row) == {"count"}:
                    end = row["count"]
                    continue
                if with_label is None:  # the first row decides: every row has a label or none does
                    with_label = isinstance(row, dict) and "label" in row
                if not (
                    isinstance(row, dict)
                    and set(row) == ({"id", "probs", "label"} if with_label else {"id", "probs"})
                    and isinstance(row["id"], str)
                    and _is_numbers(row["probs"], num_classes)
                    and (not with_label or _is_numbers(row["label"], num_classes))
                ):
                    raise ValueError(
                        f"{path} is corrupt at line {lineno}: expected an id and {num_classes} probabilities"
                        f"{' and labels' if with_label else ''}: {_RERUN}."
                    )
                if row["id"] in seen:
                    raise ValueError(f"{path} is corrupt: line {lineno} repeats an earlier image id: {_RERUN}.")
                seen.add(row["id"])
                ids.append(row["id"])
                probs.append(row["probs"])
                if with_label:
                    labels.append(row["label"])
        except UnicodeDecodeError:
            raise ValueError(f"{path} is corrupt (not UTF-8 text): {_RERUN}.") from None
    if end is None:
        raise ValueError(f"{path} is truncated (its end marker is missing): {_RERUN}.")
    if end != len(ids):
        raise ValueError(f"{path} is corrupt: its end marker counts {end} rows but it holds {len(ids)}: {_RERUN}.")
    probs_array = np.asarray(probs, dtype=np.float32).reshape(len(ids), num_classes)
    labels_array = np.asarray(labels, dtype=np.float32).reshape(len(ids), num_classes) if labels else None
    for values, what in ((probs_array, "probabilities"), (labels_array, "labels")):
        if values is not None and not np.all((values >= 0) & (values <= 1)):
            raise ValueError(f"{path} is corrupt: {what} outside [0, 1]: {_RERUN}.")
    return header, ids, probs_array, labels_array


def _is_numbers(values: object, length: int) -> bool:
    """Whether ``values`` is a list of ``length`` JSON numbers."""
    return (
        isinstance(values, list)
        and len(values) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )


FILTERED_FORMAT = "monai_cxr_ssl.filtered_pseudo_labels"


def write_filtered_datalist(path: str | os.PathLike, items: list[dict], provenance: dict) -> None:
    """Write the student's datalist (kept pseudo-labels) with where it came from, atomically."""
    write_json(path, {"format": FILTERED_FORMAT, "version": 1, **provenance, "items": items})


def load_filtered_datalist(path: str | os.PathLike, split: dict) -> list[dict]:
    """The filtered pseudo-labelled datalist for the student, checked against the current ``split``.

    For multi-label files, labels the filter did not keep are NaN (see ``MaskedBCEWithLogitsLoss``).
    """
    data = read_json(path, "filtered pseudo-label file", "run the pseudo_label stage first")
    if not isinstance(data, dict) or data.get("format") != FILTERED_FORMAT:
        raise ValueError(f"{path} is not a filtered pseudo-label file; re-run the pseudo_label stage.")
    if data.get("split_fingerprint") != split["split_fingerprint"]:
        raise ValueError(
            f"{path} was made for another split (its split fingerprint {data.get('split_fingerprint')}, this run's "
            f"split {split['split_fingerprint']}): its images may be this split's labeled, validation or test images; "
            "re-run the pseudo_label stage in this output folder."
        )
    return [{"image": it["image"], "id": it["id"], "label": _student_label(it)} for it in data["items"]]


def _student_label(item: dict) -> list[float]:
    """The item's pseudo-label, NaN where a multi-label filter dropped it (``MaskedBCEWithLogitsLoss`` ignores NaN)."""
    if "label_mask" not in item:
        return item["label"]
    return [y if m else float("nan") for y, m in zip(item["label"], item["label_mask"], strict=True)]
