"""The bad-input battery: every case runs the real command in a fresh process and must fail with one clear line.

A case is clear when the command exits non-zero, prints no traceback, and its error line names what is wrong (the
setting, the file or the folder: each case lists the words its message must contain). An ``accepted`` case is an
input the command must handle: it is clear when the command exits 0 and a line of its output says how. The table
(case → exit code → first line of the message → clear) goes to ``bench/results/bad_inputs.md`` and ``.json``;
``docs/errors.md`` quotes it.

    python bench/bad_inputs.py            # all cases, two at a time (about 5 minutes on 2 cores)
    python bench/bad_inputs.py --only settings
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
TINY = ["image_size=40", "crop_size=32", "batch_size=8", "num_workers=0", "num_epochs=1", "labeled_fraction=0.5"]


@dataclass
class Case:
    group: str
    name: str
    make: Callable[[Workspace], list[str]]  # builds the bad input, returns the command
    expect: tuple[str, ...]  # words the error line (for an accepted case: the line saying how it was handled) holds
    accepted: bool = False  # an input the command must handle and succeed on (exit 0), saying what it did


class Workspace:
    """A temporary folder with a synthetic dataset and, made on first use, trained stages to break."""

    def __init__(self, root: Path) -> None:
        from monai_cxr_ssl.data import make_synthetic_dataset

        self.root = root
        self.data = Path(make_synthetic_dataset(root / "data", n_train=60, n_test=20, image_size=40, seed=0))
        self.db = f"sqlite:///{root / 'mlflow.db'}"
        self._trained: dict[int, Path] = {}
        self.count = 0
        self.mounts: list[Path] = []
        self.holders: list[subprocess.Popen] = []
        self._model: Path | None = None

    def folder(self) -> Path:
        self.count += 1
        path = self.root / f"case{self.count}"
        path.mkdir()
        return path

    def common(self, out: Path, *extra: str) -> list[str]:
        return ["--set", f"dataset_dir={self.data}", f"output_dir={out}", f"tracking_uri={self.db}", *TINY, *extra]

    def trained(self, seed: int = 0) -> Path:
        """An experiment folder with a teacher and pseudo-labels (seed ``seed``), made once."""
        if seed not in self._trained:
            out = self.root / f"trained{seed}"
            for stage in ("train", "pseudo_label"):
                cli("run", stage, "demo", *self.common(out, f"seed={seed}"), check=True)
            self._trained[seed] = out
        return self._trained[seed]

    def model(self) -> Path:
        """The trained teacher exported to TorchScript, made once."""
        if self._model is None:
            self._model = self.root / "model.ts"
            cli("export", str(self.trained(0)), "-o", str(self._model), "--ood-images", "8", check=True)
        return self._model

    def copy_trained(self, seed: int = 0) -> Path:
        out = self.folder() / "exp"
        shutil.copytree(self.trained(seed), out)
        return out


def cli(*args: str, check: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "monai_cxr_ssl.cli", *args]
    if check:
        subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return cmd


def _png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)


def _csv_dataset(folder: Path, label: str = "1", header: str = "image,Effusion") -> Path:
    for i in range(6):
        _png(folder / f"img{i}.png", 20 * i)
    rows = [header] + [f"img{i}.png,{label if i == 3 else i % 2}" for i in range(6)]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def _csv_source(csv_path: Path) -> str:
    return "datasource=" + json.dumps({"_target_": "monai_cxr_ssl.data.CsvSource", "csv_path": str(csv_path),
                                       "label_columns": ["Effusion"]})


def _cxr14_overlap(folder: Path) -> Path:
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    names = []
    for p in range(6):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            _png(folder / "images" / name, 30 * p)
            rows.append(f"{name},{'Effusion' if p % 2 else 'No Finding'},{k},{p}")
            names.append(name)
    (folder / "Data_Entry_2017.csv").write_text("\n".join(rows) + "\n")
    (folder / "train_val_list.txt").write_text("\n".join(names[:7]) + "\n")
    (folder / "test_list.txt").write_text("\n".join(names[7:]) + "\n")
    return folder


def _garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a checkpoint\n" * 10)
    return path


def settings_cases() -> list[Case]:
    def run(*extra: str) -> Callable[[Workspace], list[str]]:
        return lambda ws: cli("run", "train", "demo", *ws.common(ws.folder() / "out", *extra))

    def pipeline(*extra: str) -> Callable[[Workspace], list[str]]:
        return lambda ws: cli("pipeline", "demo", *ws.common(ws.folder() / "out", *extra))

    def file_as_output(ws: Workspace) -> list[str]:
        path = ws.folder() / "out"
        path.write_text("a file")
        return cli("run", "train", "demo", *ws.common(path))

    def under_a_file(ws: Workspace) -> list[str]:
        path = ws.folder() / "a_file"
        path.write_text("a file")
        return cli("run", "train", "demo", *ws.common(path / "out"))

    def broken_overlay(ws: Workspace) -> list[str]:
        overlay = ws.folder() / "mine.json"
        overlay.write_text('{"num_epochs": 2,\n')
        return cli("run", "train", "demo", str(overlay), *ws.common(overlay.parent / "out"))

    def no_equals(ws: Workspace) -> list[str]:
        return [*cli("run", "train", "demo", *ws.common(ws.folder() / "out")), "seed"]

    def processes(ws: Workspace) -> list[str]:
        return cli("run", "train", "demo", "--nproc-per-node", "0", *ws.common(ws.folder() / "out"))

    def compare_folder(ws: Workspace) -> list[str]:
        return cli("compare", "demo", "--tracking-uri", f"sqlite:///{ws.folder()}")

    return [
        Case("settings", "misspelt setting labeled_fracton=0.1", run("labeled_fracton=0.1"),
             ("labeled_fracton", "labeled_fraction")),
        Case("settings", "labeled_fraction=abc", run("labeled_fraction=abc"), ("labeled_fraction",)),
        Case("settings", "labeled_fraction=0", run("labeled_fraction=0"), ("labeled_fraction",)),
        Case("settings", "crop larger than the image (40 / 48)", run("crop_size=48"), ("crop_size", "image_size")),
        Case("settings", "crop under 32 pixels (24 / 24)", run("image_size=24", "crop_size=24"), ("image_size",)),
        Case("settings", "batch_size=1 in training", run("batch_size=1"), ("batch_size",)),
        Case("settings", "num_epochs=0", run("num_epochs=0"), ("num_epochs",)),
        Case("settings", "learning_rate=-1", run("learning_rate=-1"), ("learning_rate",)),
        Case("settings", "bad_images=ignore", run("bad_images=ignore"), ("bad_images",)),
        Case("settings", "num_classes=3 for a binary dataset", run("num_classes=3"), ("num_classes",)),
        Case("settings", "positive class folder that does not exist", run("datasource#positive_class=EFFUSION"),
             ("EFFUSION",)),
        Case("folders", "output_dir is a file", file_as_output, ("output_dir", "is a file")),
        Case("folders", "output_dir empty (--set output_dir=)", run("output_dir="), ("output_dir", "empty")),
        Case("folders", "output_dir blank (--set 'output_dir= ')", run("output_dir= "), ("output_dir", "blank")),
        Case("folders", "output_dir under a file", under_a_file, ("output_dir", "a_file", "is a file")),
        Case("settings", "tracking_uri=foo://bar (no such MLflow store)", run("tracking_uri=foo://bar"),
             ("tracking_uri", "foo")),
        Case("settings", "compare --tracking-uri sqlite:///<a folder>", compare_folder,
             ("is a folder", "SQLite database")),
        Case("settings", "an overlay that is not valid JSON", broken_overlay, ("mine.json", "not valid JSON")),
        Case("settings", "val_fraction=0.99 leaves no training images", run("val_fraction=0.99"),
             ("val_fraction",)),
        Case("settings", "--set seed (no '=')", no_equals, ("seed", "key=value")),
        Case("settings", "--nproc-per-node 0", processes, ("--nproc-per-node",)),
        Case("folders", "dataset_dir does not exist", run("dataset_dir=/nonexistent/cxr"), ("/nonexistent/cxr",)),
        Case("settings", "pipeline: κ keep_fraction=1.5 (checked before the teacher)", pipeline("keep_fraction=1.5"),
             ("keep_fraction",)),
        Case("settings", "pipeline: per-stage key for a stage the method lacks",
             pipeline("mean_teacher:ema_decay=0.9"), ("mean_teacher",)),
        Case("settings", "pipeline: mean teacher ema_decay=1.5", pipeline("method=mean_teacher", "ema_decay=1.5"),
             ("ema_decay",)),
        Case("settings", "pipeline: rounds=0", pipeline("rounds=0"), ("rounds",)),
        Case("settings", "pipeline: method=fixmatch", pipeline("method=fixmatch"), ("method", "fixmatch")),
        Case("settings", "pipeline: student:aals_t=0.3 (not a student setting)", pipeline("student:aals_t=0.3"),
             ("aals_t", "student")),
        Case("settings", "sweep: λ = 1.5 in the list (checked before the first pipeline)",
             lambda ws: cli("sweep", "demo", "--lambdas", "0.1", "1.5",
                            *ws.common(ws.folder() / "out")), ("labeled_fraction",)),
    ]


def data_cases() -> list[Case]:
    def csv(label: str = "1", header: str = "image,Effusion") -> Callable[[Workspace], list[str]]:
        def make(ws: Workspace) -> list[str]:
            folder = ws.folder()
            return cli("run", "train", "demo", *ws.common(folder / "out", _csv_source(_csv_dataset(folder / "d",
                                                                                                    label, header))))
        return make

    def corrupt_png(ws: Workspace) -> list[str]:
        data = ws.folder() / "data"
        shutil.copytree(ws.data, data)
        broken = sorted((data / "train" / "NORMAL").iterdir())[0]
        broken.write_bytes(broken.read_bytes()[:60])
        return cli("run", "train", "demo", *ws.common(data.parent / "out", f"dataset_dir={data}"))

    def overlap(ws: Workspace) -> list[str]:
        folder = ws.folder()
        return cli("run", "train", *ws.common(folder / "out", f"dataset_dir={_cxr14_overlap(folder / 'cxr')}",
                                              "datasource#task=binary:Effusion"))

    return [
        Case("data", "CSV label 2 (labels must be 0/1)", csv(label="2"), ("labels.csv", "Effusion")),
        Case("data", "CSV without the label column", csv(header="image,Effusoin"), ("labels.csv", "Effusion")),
        Case("data", "a truncated PNG in the dataset", corrupt_png, ("cannot be read", "bad_images")),
        Case("data", "user-made split lists sharing a patient", overlap, ("patient", "allow_patient_overlap")),
    ]


def checkpoint_cases() -> list[Case]:
    def stale_last(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        return cli("run", "train", "demo", *ws.common(out, "learning_rate=0.001"))

    def garbage_last(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        _garbage(out / "teacher" / "models" / "last.pt")
        return cli("run", "train", "demo", *ws.common(out, "num_epochs=2"))

    def garbage_model_evaluate(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        _garbage(out / "teacher" / "models" / "model.pt")
        return cli("run", "evaluate", "demo", *ws.common(out))

    def other_split_filtered(ws: Workspace) -> list[str]:
        out, other = ws.copy_trained(0), ws.trained(1)
        foreign = other / "pseudo_label" / "filtered.json"
        return cli("run", "student", "demo", *ws.common(out, f"filtered_file={foreign}"))

    def other_split_init(ws: Workspace) -> list[str]:
        out, other = ws.copy_trained(0), ws.trained(1)
        foreign = other / "teacher" / "models" / "model.pt"
        return cli("run", "finetune", "demo", *ws.common(out, f"init_ckpt={foreign}"))

    def other_split_evaluate(ws: Workspace) -> list[str]:
        out, other = ws.copy_trained(0), ws.trained(1)
        foreign = other / "teacher" / "models" / "model.pt"
        return cli("run", "evaluate", "demo", *ws.common(out, f"ckpt_path={foreign}"))

    def other_split_pseudo_labels(ws: Workspace) -> list[str]:
        out, other = ws.copy_trained(0), ws.trained(1)
        shutil.copy(other / "pseudo_label" / "filtered.json", out / "pseudo_label" / "filtered.json")
        return cli("run", "student", "demo", *ws.common(out))

    def damaged_provenance(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        record = out / "teacher" / "models" / "provenance.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "settings": ["not", "an", "object"]}))
        return cli("run", "train", "demo", *ws.common(out, "num_epochs=2"))

    def missing_teacher(ws: Workspace) -> list[str]:
        return cli("run", "pseudo_label", "demo", *ws.common(ws.folder() / "out"))

    return [
        Case("checkpoints", "last.pt made with other settings", stale_last, ("last.pt", "learning_rate")),
        Case("checkpoints", "last.pt that is not a checkpoint", garbage_last,
             ("last.pt", "not a readable PyTorch checkpoint")),
        Case("checkpoints", "evaluate: model.pt that is not a checkpoint", garbage_model_evaluate,
             ("model.pt", "not a readable PyTorch checkpoint")),
        Case("checkpoints", "student: filtered.json of another seed's split (--set filtered_file)",
             other_split_filtered, ("filtered.json", "another split")),
        Case("checkpoints", "student: filtered.json of another split copied into the folder",
             other_split_pseudo_labels, ("filtered.json", "another split")),
        Case("checkpoints", "fine-tune from another split's checkpoint", other_split_init,
             ("model.pt", "another split")),
        Case("checkpoints", "evaluate another split's checkpoint", other_split_evaluate, ("model.pt", "another split")),
        Case("checkpoints", "pseudo-labels before the teacher exists", missing_teacher, ("model.pt", "teacher")),
        Case("checkpoints", "provenance.json whose settings is not an object", damaged_provenance,
             ("provenance.json", "damaged")),
    ]


def disk_cases() -> list[Case]:
    def full_disk(ws: Workspace) -> list[str]:
        mount = ws.folder() / "small"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True,
                       capture_output=True)
        ws.mounts.append(mount)
        return cli("run", "train", "demo", *ws.common(mount / "out"))

    return [Case("folders", "a full disk (4 MiB tmpfs) under output_dir", full_disk,
                 ("no space left on device", "model.pt"))]


def _dicom(path: Path, **tags: object) -> Path:
    """A small valid CR chest radiograph (8-bit, 64 x 64) made with pydicom; ``tags`` change or (None) drop tags."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.PatientName, ds.PatientID = "CR", "CHEST", "Battery^Case", "BAT-1"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = (np.arange(64 * 64) % 251).astype(np.uint8).tobytes()
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _chest_pixels() -> bytes:
    """64 x 64 8-bit pixels of a chest radiograph as displayed: a bright body, two dark lung fields."""
    yy, xx = np.mgrid[:64, :64] / 63.0
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(
        -(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    return np.clip(200 - 120 * lungs + 30 * yy, 0, 255).astype(np.uint8).tobytes()


def deploy_cases() -> list[Case]:
    def app(*args: str) -> list[str]:
        return [sys.executable, "-m", "monai_cxr_ssl.deploy", *args]

    def study(ws: Workspace, **tags: object) -> list[str]:
        folder = ws.folder()
        _dicom(folder / "in" / "image.dcm", **tags)
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(ws.model()))

    def file_as_input(ws: Workspace) -> list[str]:
        folder = ws.folder()
        image = _dicom(folder / "in" / "image.dcm")
        return app("-i", str(image), "-o", str(folder / "out"), "-m", str(ws.model()))

    def unplaced(ws: Workspace) -> list[str]:
        folder = ws.folder()
        path = _dicom(folder / "in" / "image.dcm", Modality="OT")
        import pydicom

        ds = pydicom.dcmread(path)
        ds.add_new(0x00200032, "LO", "a\\b\\c")  # ImagePositionPatient that is not numbers
        ds.save_as(path)
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(ws.model()))

    def negative(ws: Workspace) -> list[str]:
        # a model without out-of-distribution statistics: this generated pattern is no image the battery's model was
        # trained on, and that check's reason would come first
        folder = ws.folder()
        model = folder / "model.ts"
        cli("export", str(ws.trained(0)), "-o", str(model), "--ood-images", "0", check=True)
        _dicom(folder / "in" / "image.dcm", PhotometricInterpretation="MONOCHROME1", PixelData=_chest_pixels())
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(model))

    def missing_input(ws: Workspace) -> list[str]:
        return app("-i", str(ws.root / "no_such_study"), "-o", str(ws.folder() / "out"), "-m", str(ws.model()))

    def missing_model(ws: Workspace) -> list[str]:
        folder = ws.folder()
        _dicom(folder / "in" / "image.dcm")
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(folder / "none.ts"))

    def text_model(ws: Workspace) -> list[str]:
        folder = ws.folder()
        _dicom(folder / "in" / "image.dcm")
        (folder / "model.ts").write_text("not a model")
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(folder / "model.ts"))

    def text_file(ws: Workspace) -> list[str]:
        folder = ws.folder()
        _dicom(folder / "in" / "image.dcm")
        (folder / "in" / "notes.txt").write_text("a note")
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(ws.model()))

    def truncated(ws: Workspace) -> list[str]:
        folder = ws.folder()
        path = _dicom(folder / "in" / "image.dcm")
        path.write_bytes(path.read_bytes()[:-2000])
        return app("-i", str(folder / "in"), "-o", str(folder / "out"), "-m", str(ws.model()))

    return [
        Case("deploy", "app: input folder does not exist", missing_input, ("no_such_study", "does not exist")),
        Case("deploy", "app: model file does not exist", missing_model, ("none.ts", "does not exist")),
        Case("deploy", "app: model file that is not TorchScript", text_model, ("model.ts", "TorchScript")),
        Case("deploy", "app: a text file among the DICOM files", text_file, ("notes.txt", "not a DICOM")),
        Case("deploy", "app: truncated pixel data", truncated, ("image.dcm", "pixel data")),
        Case("deploy", "app: dental panoramic (no body part, SeriesDescription OPG)",
             lambda ws: study(ws, BodyPartExamined=None, SeriesDescription="OPG"),
             ("chest", "--accept-unknown-body-part")),
        Case("deploy", "app: an MR series", lambda ws: study(ws, Modality="MR"), ("radiograph",)),
        Case("deploy", "app: a knee radiograph", lambda ws: study(ws, BodyPartExamined="KNEE"), ("chest",)),
        Case("deploy", "app: -i <a DICOM file> instead of its folder", file_as_input, ("image.dcm", "not a folder")),
        Case("deploy", "app: an OT image the DICOM loader cannot place in a series", unplaced,
             ("image.dcm", "could not place")),
        Case("deploy", "app: MONOCHROME1 on pixels never inverted (withheld; model without OOD statistics)", negative,
             ("findings", "reads as a negative"), accepted=True),
    ]


def export_cases() -> list[Case]:
    def injected(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        recorded = out / "teacher" / "config_executed.json"
        config = json.loads(recorded.read_text())
        config["image_size"] = f"$__import__('pathlib').Path('{ws.root / 'pwned'}').touch() or 40"
        recorded.write_text(json.dumps(config))
        return cli("export", str(out / "teacher"), "-o", str(out / "model.ts"), "--ood-images", "0")

    def garbage(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        _garbage(out / "teacher" / "models" / "model.pt")
        return cli("export", str(out), "-o", str(out / "model.ts"), "--ood-images", "0")

    def two_stages(ws: Workspace) -> list[str]:
        out = ws.copy_trained()
        shutil.copytree(out / "teacher", out / "student")
        return cli("export", str(out), "-o", str(out / "model.ts"), "--ood-images", "0")

    def into_folder(ws: Workspace) -> list[str]:
        folder = ws.folder()
        return cli("export", str(ws.trained(0)), "-o", str(folder), "--ood-images", "0")

    def under_file(ws: Workspace) -> list[str]:
        folder = ws.folder()
        (folder / "a_file").write_text("a file")
        return cli("export", str(ws.trained(0)), "-o", str(folder / "a_file" / "model.ts"), "--ood-images", "0")

    def inference(ws: Workspace) -> list[str]:
        folder = ws.folder()
        return cli("run", "inference", "--set", f"dataset_dir={ws.data / 'test'}", "num_workers=0",
                   f"ckpt_path={_garbage(folder / 'model.pt')}", f"output_dir={folder / 'out'}")

    return [
        Case("export", "export: a '$' expression injected into config_executed.json", injected,
             ("config_executed.json", "not a plain value")),
        Case("export", "export: model.pt that is not a checkpoint", garbage,
             ("model.pt", "not a readable PyTorch checkpoint")),
        Case("export", "export: two stages and no results.json", two_stages, ("student", "teacher")),
        Case("export", "export -o <an existing folder> (writes model.ts in it)", into_folder, ("model.ts",),
             accepted=True),
        Case("export", "export -o <a path under a file>", under_file, ("a_file", "is a file")),
        Case("export", "inference: ckpt_path that is not a checkpoint", inference,
             ("model.pt", "not a readable PyTorch checkpoint")),
    ]


def results_cases() -> list[Case]:
    def rare_class(ws: Workspace) -> list[str]:
        folder = ws.folder() / "d"
        rows = ["image,Effusion,Hernia"]
        for i in range(48):
            _png(folder / f"img{i}.png", 40 + 3 * i)
            rows.append(f"img{i}.png,{i % 2},{int(i in (5, 30))}")
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
        source = json.dumps({"_target_": "monai_cxr_ssl.data.CsvSource", "csv_path": str(folder / "labels.csv"),
                             "label_columns": ["Effusion", "Hernia"]})
        return cli("pipeline", "demo", *ws.common(folder.parent / "out", f"datasource={source}", "min_positives=3",
                                                  "method=mean_teacher"))

    return [Case("results", "Table I: a class the split leaves out (2 Hernia images, min_positives=3)", rare_class,
                 ("Hernia", "left out of training"), accepted=True)]


def lock_cases() -> list[Case]:
    def in_use(ws: Workspace) -> list[str]:
        out = ws.folder() / "out"
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from monai_cxr_ssl.locking import "
                                   "lock_output_dir; lock_output_dir(sys.argv[1]); print('held', flush=True); "
                                   "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)})
        holder.stdout.readline()  # the lock is held
        ws.holders.append(holder)
        return cli("run", "train", "demo", *ws.common(out))

    return [Case("folders", "output_dir in use by another run", in_use, ("in use by another run",))]


GROUPS = {"settings": settings_cases, "data": data_cases, "checkpoints": checkpoint_cases, "folders": lock_cases,
          "disk": disk_cases, "deploy": deploy_cases, "export": export_cases, "results": results_cases}


def error_line(output: str) -> str:
    """The line that says what went wrong: the last ``error:`` line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line[line.index("error:"):] if "error:" in line else line for line in lines if "error:" in line]
    return (errors or lines or [""])[-1]


def run_case(case: Case, ws: Workspace) -> dict:
    try:
        cmd = case.make(ws)
    except Exception as err:  # the battery's own set-up failed: reported, never counted clear
        return {"group": case.group, "case": case.name, "exit_code": None, "message": f"set-up failed: {err}",
                "clear": False}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ws.root, env=env, timeout=600)
    output = done.stdout + done.stderr
    if case.accepted:  # the line that says how the input was handled
        lines = [line.strip() for line in output.splitlines() if case.expect[-1].lower() in line.lower()]
        message = lines[-1] if lines else error_line(output)
        clear = done.returncode == 0 and all(word.lower() in message.lower() for word in case.expect)
    else:
        message = error_line(done.stderr or done.stdout)
        clear = (done.returncode != 0 and "Traceback" not in output
                 and all(word.lower() in message.lower() for word in case.expect))
    return {"group": case.group, "case": case.name, "exit_code": done.returncode, "message": message,
            "clear": clear, "seconds": round(time.perf_counter() - start, 1)}


def markdown(rows: list[dict]) -> str:
    lines = ["| group | case | exit code | first line of the message | clear |", "|---|---|---|---|---|"]
    for r in rows:
        message = r["message"].replace("|", "\\|")
        lines.append(f"| {r['group']} | {r['case']} | {r['exit_code']} | {message} | {'yes' if r['clear'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(GROUPS), nargs="*", help="run these groups only")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at a time (default 2)")
    args = parser.parse_args()
    cases = [case for name, group in GROUPS.items() if not args.only or name in args.only for case in group()]
    with tempfile.TemporaryDirectory(prefix="bad_inputs.") as tmp:
        ws = Workspace(Path(tmp))
        try:
            if any(c.group in ("checkpoints", "export", "deploy") for c in cases):
                ws.trained(0), ws.trained(1)  # made before the parallel cases need them
            if any(c.group == "deploy" for c in cases):
                ws.model()
            with ThreadPoolExecutor(args.jobs) as pool:
                rows = list(pool.map(lambda c: run_case(c, ws), cases))
            if (ws.root / "pwned").exists():  # the injected expression ran: that export case is not clear
                for row in rows:
                    row["clear"] = row["clear"] and "injected" not in row["case"]
        finally:
            for holder in ws.holders:
                holder.kill()
            for mount in ws.mounts:
                subprocess.run(["umount", str(mount)], check=False)
    table = markdown(rows)
    print(table)
    clear = sum(r["clear"] for r in rows)
    print(f"{clear} of {len(rows)} cases clear")
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_results(__file__, {"rows": rows, "clear": clear, "total": len(rows)}, {"only": args.only, "jobs": args.jobs})
    (RESULTS / "bad_inputs.md").write_text(table + f"\n{clear} of {len(rows)} cases clear "
                                           "(`python bench/bad_inputs.py`).\n")
    sys.exit(0 if clear == len(rows) else 1)


if __name__ == "__main__":
    main()
