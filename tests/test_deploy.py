"""The MONAI Deploy app end to end on the real DICOM files: ``python -m monai_cxr_ssl.deploy`` as a user runs it,
its outputs against the bundle's own inference, its privacy, and every bad input it must refuse cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

pytest.importorskip("monai.deploy.core", reason="the MONAI Deploy App SDK (the deploy extra) is not installed")

from monai.data import save_net_with_metadata  # noqa: E402

from monai_cxr_ssl.networks import CXRDenseNet121  # noqa: E402
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE  # noqa: E402

pytestmark = pytest.mark.realdata

DX, CR = "nih_cxr_dx_uncompressed.dcm", "siim_cxr_cr_jpeg_baseline.dcm"
CLASSES = ["Effusion", "Pneumonia"]
IMAGE_SIZE, CROP_SIZE = 64, 56
TIMEOUT = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, CXRDenseNet121]:
    """An exported-format classifier (random weights; what matters is that app and bundle agree) and its network."""
    torch.manual_seed(0)
    net = CXRDenseNet121(num_classes=len(CLASSES)).eval()
    exported = CXRDenseNet121(num_classes=len(CLASSES), probabilities=True).eval()
    exported.load_state_dict(net.state_dict())
    meta = json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())
    meta["cxr_ssl"] = {"classes": CLASSES, "image_size": IMAGE_SIZE, "crop_size": CROP_SIZE,
                       "thresholds": {"Effusion": 0.5, "Pneumonia": 0.3}, "stage": "finetune"}
    path = tmp_path_factory.mktemp("model") / "model.ts"
    save_net_with_metadata(torch.jit.script(exported), str(path), meta_values=meta)
    return path, net


def _study(folder: Path, *datasets: pydicom.Dataset) -> Path:
    folder.mkdir(parents=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"image{k}.dcm")
    return folder


def _app(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monai_cxr_ssl.deploy", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, **(env or {})})


def _bundle_probabilities(net: CXRDenseNet121, path: Path) -> np.ndarray:
    """The bundle's inference.json path for one file: LoadCXRImaged, area Resized, TenCropInferer, sigmoid."""
    from monai.transforms import Compose, EnsureTyped, Resized

    from monai_cxr_ssl.data import LoadCXRImaged
    from monai_cxr_ssl.inferers import TenCropInferer

    load = Compose([LoadCXRImaged("image"), Resized("image", [IMAGE_SIZE] * 2, mode="area"),
                    EnsureTyped("image", dtype=torch.float32)])
    with torch.no_grad():
        logits = TenCropInferer(CROP_SIZE)(load({"image": str(path)})["image"][None], net)
    return torch.sigmoid(logits)[0].numpy()


def _outputs(folder: Path) -> tuple[dict, pydicom.Dataset]:
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and "result.json" in files, files  # nothing else, no staging folder left
    (sr,) = folder.glob("*.dcm")
    return json.loads((folder / "result.json").read_text()), pydicom.dcmread(sr)


@pytest.mark.parametrize("name", [DX, CR])
def test_app_classifies_a_real_study_as_the_bundle_does(name, model, shared_data, tmp_path):
    source = shared_data / "dicom" / name
    original = pydicom.dcmread(source)
    study = _study(tmp_path / "in", original)
    model_path, net = model
    if name == DX:
        run = _app(["-i", str(study), "-o", str(tmp_path / "out"), "-m", str(model_path)])
    else:  # the same through the HOLOSCAN_* variables a packaged app receives
        run = _app([], {"HOLOSCAN_INPUT_PATH": str(study), "HOLOSCAN_OUTPUT_PATH": str(tmp_path / "out"),
                        "HOLOSCAN_MODEL_PATH": str(model_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    result, sr = _outputs(tmp_path / "out")

    # Probabilities equal the bundle's inference of the same file (float32 rounding: 1e-5 absolute).
    expected = _bundle_probabilities(net, source)
    got = np.array([result["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert result["findings"] == [c for c in CLASSES if result["probabilities"][c] >= result["thresholds"][c]]
    assert result["model"]["stage"] == "finetune" and result["model"]["version"]
    assert result["image"]["SOPInstanceUID"] == original.SOPInstanceUID

    # The SR: filed in the same study, says the findings, and carries no demographics.
    assert sr.Modality == "SR" and sr.StudyInstanceUID == original.StudyInstanceUID
    text = sr.ContentSequence[0].TextValue
    assert all(f"{c} {result['probabilities'][c]:.3f}" in text for c in CLASSES)
    assert sr.PatientID == original.get("PatientID", "")  # the study's identity, which the SR must share
    assert sr.PatientBirthDate == "" and sr.PatientSex == ""
    # No patient identifier anywhere in the JSON or the console output.
    identifiers = [str(original.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate")]
    for value in filter(None, identifiers):
        assert value not in json.dumps(result) and value not in run.stdout + run.stderr


def test_monochrome1_reads_as_the_original(model, shared_data, tmp_path):
    """An inverted MONOCHROME1 copy of a real image is the same radiograph: the same probabilities."""
    original = pydicom.dcmread(shared_data / "dicom" / DX)
    inverted = pydicom.dcmread(shared_data / "dicom" / DX)
    inverted.PixelData = (255 - original.pixel_array).astype(np.uint8).tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    model_path, _ = model
    results = []
    for name, ds in (("orig", original), ("mono1", inverted)):
        run = _app(["-i", str(_study(tmp_path / name, ds)), "-o", str(tmp_path / f"out_{name}"), "-m",
                    str(model_path)])
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(_outputs(tmp_path / f"out_{name}")[0]["probabilities"])
    assert results[0] == pytest.approx(results[1], abs=1e-6)


def test_bad_inputs_are_refused_without_partial_output(model, shared_data, tmp_path, capsys):
    from monai_cxr_ssl.deploy.app import main

    model_path, _ = model
    dx = pydicom.dcmread(shared_data / "dicom" / DX)
    ct = pydicom.dcmread(shared_data / "dicom" / DX)
    ct.Modality = "CT"
    hand = pydicom.dcmread(shared_data / "dicom" / CR)
    hand.BodyPartExamined = "HAND"
    second = pydicom.dcmread(shared_data / "dicom" / DX)
    second.SOPInstanceUID = pydicom.uid.generate_uid()
    multiframe = pydicom.dcmread(shared_data / "dicom" / DX)
    multiframe.NumberOfFrames = 2
    multiframe.PixelData = multiframe.PixelData * 2
    corrupt = tmp_path / "corrupt"
    _study(corrupt, dx)
    (corrupt / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(300))
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (shared_data / "dicom" / DX).read_bytes()
    (truncated / "cut.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_model.ts").write_bytes(b"not torchscript")
    cases = {
        "empty folder": (tmp_path / "empty", model_path, "input folder is empty"),
        "no CR/DX series": (_study(tmp_path / "ct", ct), model_path, "no CR or DX series of the chest"),
        "a radiograph of another body part": (_study(tmp_path / "hand", hand), model_path, "no CR or DX series"),
        "corrupt DICOM": (corrupt, model_path, "broken.dcm: not a readable DICOM file"),
        "truncated DICOM": (truncated, model_path, "cut.dcm"),
        "two images in the series": (_study(tmp_path / "two", dx, second), model_path, "has 2 images"),
        "multi-frame image": (_study(tmp_path / "frames", multiframe), model_path, "holds 2 frames"),
        "model not TorchScript": (_study(tmp_path / "ok", dx), tmp_path / "not_a_model.ts", "not a TorchScript"),
    }
    for case, (folder, model_file, message) in cases.items():
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        code = main(["app", "-i", str(folder), "-o", str(out), "-m", str(model_file)])
        err = capsys.readouterr().err
        assert code == 1, case
        assert message in err and "Traceback" not in err, (case, err[-2000:])
        assert not out.exists() or list(out.iterdir()) == [], case  # no partial output, no staging folder

    # The console command exits non-zero with one clear line.
    run = _app(["-i", str(corrupt), "-o", str(tmp_path / "out_cli"), "-m", str(model_path)])
    assert run.returncode == 1 and "broken.dcm: not a readable DICOM file" in run.stderr
    assert "Traceback" not in run.stderr
