"""The MONAI Deploy app end to end on DICOM files made here (a DX and a JPEG-baseline CR) and, when they are here, on
the real ones: ``python -m monai_cxr_ssl.deploy`` as a user runs it, its outputs against the bundle's own inference,
its privacy, and every bad input it must refuse cleanly."""

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

from conftest import radiograph_dicom, shared_path  # noqa: E402
from monai.data import save_net_with_metadata  # noqa: E402

from monai_cxr_ssl.networks import CXRDenseNet121  # noqa: E402
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE  # noqa: E402

DX, CR = "DX", "CR"
REAL = {DX: "nih_cxr_dx_uncompressed.dcm", CR: "siim_cxr_cr_jpeg_baseline.dcm"}
CLASSES = ["Effusion", "Pneumonia"]
IMAGE_SIZE, CROP_SIZE = 64, 56
TIMEOUT = 300


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, CXRDenseNet121]:
    """An exported-format classifier (random weights; what matters is that app and bundle agree) and its network."""
    torch.manual_seed(0)
    net = CXRDenseNet121(num_classes=len(CLASSES)).eval()
    exported = CXRDenseNet121(num_classes=len(CLASSES), probabilities="sigmoid").eval()
    exported.load_state_dict(net.state_dict())
    meta = json.loads((DEFAULT_BUNDLE / "configs" / "metadata.json").read_text())
    meta["cxr_ssl"] = {"classes": CLASSES, "image_size": IMAGE_SIZE, "crop_size": CROP_SIZE,
                       "thresholds": {"Effusion": 0.5, "Pneumonia": 0.3}, "stage": "finetune"}
    path = tmp_path_factory.mktemp("model") / "model.ts"
    save_net_with_metadata(torch.jit.script(exported), str(path), meta_values=meta)
    return path, net


def _generated_dicoms(folder: Path) -> dict[str, Path]:
    """A 256 x 256 DX (uncompressed, no BodyPartExamined nor a chest word, like the real NIH file) and a CR of the
    chest stored as JPEG baseline (like the real SIIM file): smooth anatomy-like shading with noise."""
    import io

    from PIL import Image
    from pydicom.encaps import encapsulate

    yy, xx = np.mgrid[:256, :256] / 255.0
    rng = np.random.default_rng(0)
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(
        -(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    pixels = np.clip(200 - 120 * lungs + 30 * yy + rng.normal(0, 6, lungs.shape), 0, 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    dx = radiograph_dicom(pixels, "DX", StudyDescription="No Finding")
    del dx.BodyPartExamined, dx.ViewPosition
    dx.save_as(folder / "dx.dcm", enforce_file_format=True)
    cr = radiograph_dicom(pixels[:, ::-1], "CR", SeriesDescription="view: PA")
    jpeg = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(jpeg, "JPEG", quality=95)
    cr.PixelData = encapsulate([jpeg.getvalue()])
    cr["PixelData"].VR, cr["PixelData"].is_undefined_length = "OB", True
    cr.file_meta.TransferSyntaxUID, cr.LossyImageCompression = pydicom.uid.JPEGBaseline8Bit, "01"
    cr.save_as(folder / "cr.dcm", enforce_file_format=True)
    return {DX: folder / "dx.dcm", CR: folder / "cr.dcm"}


@pytest.fixture(scope="module", params=["generated", pytest.param("real", marks=pytest.mark.realdata)])
def dicoms(request, tmp_path_factory) -> dict[str, Path]:
    """The DX and CR files every test here runs on: made here, then the real ones (skipped when absent)."""
    if request.param == "real":
        return {kind: shared_path("dicom", name) for kind, name in REAL.items()}
    return _generated_dicoms(tmp_path_factory.mktemp("dicom"))


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
def test_app_classifies_a_study_as_the_bundle_does(name, model, dicoms, tmp_path):
    source = dicoms[name]
    original = pydicom.dcmread(source)
    study = _study(tmp_path / "in", original)
    model_path, net = model
    if name == DX:  # no BodyPartExamined nor a chest word in its descriptions: classified only when accepted
        run = _app(["-i", str(study), "-o", str(tmp_path / "out"), "-m", str(model_path), "--accept-unknown-body-part"])
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
    assert result["body_part"] == (
        {"decision": "unknown", "evidence": "BodyPartExamined absent and no chest word in StudyDescription, "
         "SeriesDescription, ProtocolName", "accept_unknown_body_part": True} if name == DX else
        {"decision": "chest", "evidence": "BodyPartExamined CHEST", "accept_unknown_body_part": False})

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


def test_every_study_of_the_input_is_classified_or_named(model, dicoms, tmp_path, capsys):
    """Two chest studies and a CT study in one folder: each chest study gets its own folder of outputs (the same
    probabilities as alone), the CT study is named on stderr and in skipped.json; nothing is dropped silently."""
    studies = []
    for k in range(3):
        ds = pydicom.dcmread(dicoms[DX])
        ds.BodyPartExamined = "CHEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        if k == 1:
            ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).tobytes()  # another image (upside down)
        if k == 2:
            ds.Modality = "CT"
        studies.append(ds)
    folder = _study(tmp_path / "in", *studies)
    code, err = _run(["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(model[0])], capsys)
    assert code == 0, err[-2000:]
    chest, ct = [str(ds.StudyInstanceUID) for ds in studies[:2]], str(studies[2].StudyInstanceUID)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*chest, "skipped.json"])
    results = {uid: _outputs(tmp_path / "out" / uid) for uid in chest}
    for uid, (result, sr) in results.items():
        assert result["image"]["StudyInstanceUID"] == uid == sr.StudyInstanceUID
    assert results[chest[0]][0]["probabilities"] != results[chest[1]][0]["probabilities"]
    (skipped,) = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert skipped["StudyInstanceUID"] == ct and skipped["reason"].startswith("no radiograph series of the chest")
    assert f"skipped study {ct}: no radiograph series of the chest" in err

    alone = _study(tmp_path / "alone", studies[0])  # the first study alone: the same probabilities, flat outputs
    code, err = _run(["-i", str(alone), "-o", str(tmp_path / "alone_out"), "-m", str(model[0])], capsys)
    assert code == 0 and "skipped" not in err, err[-2000:]
    assert _outputs(tmp_path / "alone_out")[0]["probabilities"] == results[chest[0]][0]["probabilities"]


def test_monochrome1_reads_as_the_original(model, dicoms, tmp_path):
    """An inverted MONOCHROME1 copy of an image is the same radiograph: the same probabilities."""
    original = pydicom.dcmread(dicoms[DX])
    inverted = pydicom.dcmread(dicoms[DX])
    inverted.PixelData = (255 - original.pixel_array).astype(np.uint8).tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    model_path, _ = model
    results = []
    for name, ds in (("orig", original), ("mono1", inverted)):
        run = _app(["-i", str(_study(tmp_path / name, ds)), "-o", str(tmp_path / f"out_{name}"), "-m",
                    str(model_path), "--accept-unknown-body-part"])
        assert run.returncode == 0, run.stderr[-3000:]
        results.append(_outputs(tmp_path / f"out_{name}")[0]["probabilities"])
    assert results[0] == pytest.approx(results[1], abs=1e-6)


def test_monochrome1_label_on_pixels_never_inverted_is_withheld(model, dicoms, tmp_path):
    """A MONOCHROME1 label on pixels that were never inverted reads as a negative radiograph: findings withheld,
    with the reason; the correctly labelled image is classified."""
    model_path, _ = model
    mislabelled = pydicom.dcmread(dicoms[DX])
    mislabelled.PhotometricInterpretation = "MONOCHROME1"
    results = {}
    for name, ds in (("orig", pydicom.dcmread(dicoms[DX])), ("mislabelled", mislabelled)):
        run = _app(["-i", str(_study(tmp_path / name, ds)), "-o", str(tmp_path / f"out_{name}"), "-m",
                    str(model_path), "--accept-unknown-body-part"])
        assert run.returncode == 0, run.stderr[-3000:]
        results[name] = _outputs(tmp_path / f"out_{name}")[0]
    assert results["orig"]["findings_withheld"] is None
    assert results["mislabelled"]["findings"] == []
    assert "reads as a negative (PhotometricInterpretation MONOCHROME1" in results["mislabelled"]["findings_withheld"]


def test_bad_inputs_are_refused_without_partial_output(model, dicoms, tmp_path, capsys):
    from monai_cxr_ssl.deploy.app import main

    model_path, _ = model
    dx = pydicom.dcmread(dicoms[DX])
    ct = pydicom.dcmread(dicoms[DX])
    ct.Modality = "CT"
    hand = pydicom.dcmread(dicoms[CR])
    hand.BodyPartExamined = "HAND"
    second = pydicom.dcmread(dicoms[DX])
    second.SOPInstanceUID = pydicom.uid.generate_uid()
    multiframe = pydicom.dcmread(dicoms[DX])
    multiframe.NumberOfFrames = 2
    multiframe.PixelData = multiframe.PixelData * 2
    corrupt = tmp_path / "corrupt"
    _study(corrupt, dx)
    (corrupt / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(300))
    text_file = tmp_path / "text_file"
    _study(text_file, dx)
    (text_file / "notes.txt").write_text("not an image")
    cut_jpeg = tmp_path / "cut_jpeg"
    cut_jpeg.mkdir()
    jpeg = (dicoms[CR]).read_bytes()
    (cut_jpeg / "cut.dcm").write_bytes(jpeg[: len(jpeg) // 2])
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    data = (dicoms[DX]).read_bytes()
    (truncated / "cut.dcm").write_bytes(data[: len(data) // 2])
    unplaced = pydicom.dcmread(dicoms[DX])  # an OT image whose position the SDK's loader cannot parse
    unplaced.Modality = "OT"
    unplaced.add_new(0x00200032, "LO", "a\\b\\c")  # ImagePositionPatient, not numbers
    (tmp_path / "empty").mkdir()
    (tmp_path / "not_a_model.ts").write_bytes(b"not torchscript")
    cases = {
        "empty folder": (tmp_path / "empty", model_path, "input folder is empty"),
        "no CR/DX series": (_study(tmp_path / "ct", ct), model_path, "no radiograph series of the chest"),
        "a radiograph of another body part": (_study(tmp_path / "hand", hand), model_path, "no radiograph series"),
        "corrupt DICOM": (corrupt, model_path, "broken.dcm: not a readable DICOM file"),
        "truncated DICOM": (truncated, model_path, "cut.dcm"),
        "truncated JPEG CR": (cut_jpeg, model_path, "cut.dcm: not a readable DICOM file (the file has no complete "
                              "DICOM pixel data (truncated"),
        "a text file among the images": (text_file, model_path, "notes.txt: not a DICOM file"),
        "two images in the series": (_study(tmp_path / "two", dx, second), model_path, "has 2 images"),
        "multi-frame image": (_study(tmp_path / "frames", multiframe), model_path, "holds 2 frames"),
        "model not TorchScript": (_study(tmp_path / "ok", dx), tmp_path / "not_a_model.ts", "not a TorchScript"),
        "an image the loader cannot place in a series": (_study(tmp_path / "unplaced", unplaced), model_path,
                                                         "image0.dcm: the DICOM loader could not place this OT image"),
        "a file given as the input folder": (tmp_path / "ok" / "image0.dcm", model_path,
                                             "image0.dcm: the input is a file, not a folder"),
    }
    for case, (folder, model_file, message) in cases.items():
        out = tmp_path / f"out_{case.replace(' ', '_')}"
        code = main(["app", "-i", str(folder), "-o", str(out), "-m", str(model_file), "--accept-unknown-body-part"])
        err = capsys.readouterr().err
        assert code == 1, case
        assert message in err and "Traceback" not in err, (case, err[-2000:])
        assert not out.exists() or list(out.iterdir()) == [], case  # no partial output, no staging folder

    # The console command exits non-zero with one clear line.
    run = _app(["-i", str(corrupt), "-o", str(tmp_path / "out_cli"), "-m", str(model_path)])
    assert run.returncode == 1 and "broken.dcm: not a readable DICOM file" in run.stderr
    assert "Traceback" not in run.stderr


def _run(args: list[str], capsys) -> tuple[int, str]:
    from monai_cxr_ssl.deploy.app import main

    code = main(["app", *args])
    return code, capsys.readouterr().err


def test_sr_references_its_image_and_a_rerun_replaces_it(model, dicoms, tmp_path, capsys):
    import highdicom as hd

    source = pydicom.dcmread(dicoms[CR])
    source.AccessionNumber, source.PatientAge, source.OtherPatientIDs = "ACC123", "045Y", "OTHER-ID"
    study, out = _study(tmp_path / "in", source), tmp_path / "out"
    model_path, _ = model
    uids = []
    for _ in range(2):  # the second run replaces the first run's SR: same UIDs, same file, nothing added
        code, err = _run(["-i", str(study), "-o", str(out), "-m", str(model_path)], capsys)
        assert code == 0, err[-2000:]
        result, sr = _outputs(out)
        assert result["sr"]["SOPInstanceUID"] == sr.SOPInstanceUID
        uids.append((sr.SOPInstanceUID, sr.SeriesInstanceUID))
    assert uids[0] == uids[1]
    assert sr.SOPInstanceUID != source.SOPInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID

    # Evidence: the study's current requested procedure evidence lists the source instance.
    (evidence,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    (ref,) = series.ReferencedSOPSequence
    assert (series.SeriesInstanceUID, ref.ReferencedSOPInstanceUID, ref.ReferencedSOPClassUID) == (
        source.SeriesInstanceUID, source.SOPInstanceUID, source.SOPClassUID)
    # Content: an IMAGE item referencing the same instance, next to the findings text.
    kinds = {item.ValueType: item for item in sr.ContentSequence}
    assert {"TEXT", "IMAGE"} <= kinds.keys()
    (image_ref,) = kinds["IMAGE"].ReferencedSOPSequence
    assert image_ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    # highdicom parses it back as a valid Comprehensive SR; the study/patient attributes kept, demographics blank.
    parsed = hd.sr.srread(next(out.glob("*.dcm")))
    assert isinstance(parsed, hd.sr.ComprehensiveSR)
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage and sr.file_meta.TransferSyntaxUID
    for key in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyID", "StudyDate"):
        assert str(sr.get(key, "")) == str(source.get(key, "")), key
    assert sr.PatientBirthDate == "" and sr.PatientSex == "" and sr.ReferringPhysicianName == ""
    assert "PatientAge" not in sr and "OtherPatientIDs" not in sr  # nothing else of the image is copied
    assert str(source.PatientName) not in err


@pytest.mark.parametrize(("tags", "decision"), [
    ({"BodyPartExamined": "CHEST"}, "chest"),
    ({"BodyPartExamined": "HAND"}, "other"),
    ({"StudyDescription": "Rx Tórax PA"}, "chest"),
    ({"SeriesDescription": "Poumons face"}, "chest"),
    ({"ProtocolName": "Brustkorb 2 Ebenen"}, "chest"),
    ({"StudyDescription": "THX pa"}, "chest"),
    ({"StudyDescription": "long bone survey"}, "unknown"),
    ({"SeriesDescription": "OPG panoramic", "ViewPosition": "PA"}, "unknown"),
    ({}, "unknown"),
])
def test_body_part_evidence(tags, decision):
    from monai_cxr_ssl.deploy.operators import body_part_evidence

    ds = pydicom.Dataset()
    for key, value in tags.items():
        setattr(ds, key, value)
    assert body_part_evidence(ds)[0] == decision


def test_unknown_body_part_is_refused_unless_accepted(model, dicoms, tmp_path, capsys):
    """A dental panoramic CR without BodyPartExamined used to be classified (exit 0, PNEUMONIA in the SR)."""
    dental = pydicom.dcmread(dicoms[CR])
    del dental.BodyPartExamined
    dental.SeriesDescription, dental.ViewPosition = "OPG panoramic", ""
    study, model_path = _study(tmp_path / "dental", dental), model[0]
    code, err = _run(["-i", str(study), "-o", str(tmp_path / "refused"), "-m", str(model_path)], capsys)
    assert code == 1 and "no radiograph series says it shows the chest" in err and "--accept-unknown-body-part" in err
    assert not (tmp_path / "refused").exists() or list((tmp_path / "refused").iterdir()) == []
    code, err = _run(["-i", str(study), "-o", str(tmp_path / "accepted"), "-m", str(model_path),
                      "--accept-unknown-body-part"], capsys)
    assert code == 0, err[-2000:]
    result, sr = _outputs(tmp_path / "accepted")
    assert result["body_part"]["decision"] == "unknown" and result["body_part"]["accept_unknown_body_part"]
    assert "accepted with --accept-unknown-body-part" in sr.ContentSequence[0].TextValue

    dental.StudyDescription = "RX TÓRAX PA"  # a chest word in Spanish: no flag needed
    code, err = _run(["-i", str(_study(tmp_path / "torax", dental)), "-o", str(tmp_path / "torax_out"), "-m",
                      str(model_path)], capsys)
    assert code == 0, err[-2000:]
    assert _outputs(tmp_path / "torax_out")[0]["body_part"]["evidence"] == (
        "BodyPartExamined absent; StudyDescription says 'TÓRAX'")


def test_dicom_without_part10_header_is_classified(model, dicoms, tmp_path, capsys):
    source = dicoms[DX]
    ds = pydicom.dcmread(source)
    del ds.file_meta
    ds.preamble = None
    folder = tmp_path / "raw"
    folder.mkdir()
    ds.save_as(folder / "IM0001", enforce_file_format=False, implicit_vr=True, little_endian=True)
    model_path, net = model
    code, err = _run(["-i", str(folder), "-o", str(tmp_path / "out"), "-m", str(model_path),
                      "--accept-unknown-body-part"], capsys)
    assert code == 0, err[-2000:]
    result, _ = _outputs(tmp_path / "out")
    got = np.array([result["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, _bundle_probabilities(net, source), atol=1e-5, rtol=0)


def test_missing_paths_exit_1_with_one_line(model, tmp_path, capsys):
    model_path = model[0]
    (tmp_path / "in").mkdir()
    for args, message in (
        (["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), "-m", str(model_path)],
         "nowhere: input folder does not exist"),
        (["-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "none.ts")],
         "none.ts: model file does not exist"),
    ):
        code, err = _run(args, capsys)
        assert code == 1 and message in err and "usage" not in err.lower(), err
        assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def ood_model(model, tmp_path_factory) -> tuple[Path, object, np.ndarray]:
    """The ``model`` classifier with out-of-distribution statistics of real NIH chest X-rays (60 to fit, 30 to set
    the threshold), as ``monai-cxr-ssl export`` embeds them."""
    from monai.data import load_net_with_metadata

    from monai_cxr_ssl.deploy.ood import OOD_STATS_FILE, fit_ood, image_features

    sample = shared_path("chestxray14_sample", "images")
    scripted, meta, _ = load_net_with_metadata(str(model[0]))
    images = sorted(sample.glob("*.png"))
    train = image_features(scripted, images[:60], IMAGE_SIZE, CROP_SIZE)
    stats, _ = fit_ood(train, image_features(scripted, images[60:90], IMAGE_SIZE, CROP_SIZE))
    path = tmp_path_factory.mktemp("ood") / "model.ts"
    save_net_with_metadata(scripted, str(path), meta_values=meta, more_extra_files={OOD_STATS_FILE: stats.to_bytes()})
    return path, stats, train


@pytest.mark.realdata
def test_out_of_distribution_images_get_no_findings(ood_model, tmp_path, capsys):
    """Real chest X-rays (NIH sample to fit, the real DX and CR to test); skips without them."""
    from sklearn.covariance import LedoitWolf

    model_path, stats, train = ood_model
    fitted = LedoitWolf().fit(train)
    dx = pydicom.dcmread(shared_path("dicom", REAL[DX]))
    flipped = pydicom.dcmread(shared_path("dicom", REAL[DX]))
    flipped.PixelData = np.ascontiguousarray(dx.pixel_array[::-1]).tobytes()  # upside down
    ct_like = pydicom.dcmread(shared_path("dicom", REAL[DX]))
    yy, xx = np.mgrid[:1024, :1024]
    disk = ((yy - 512) ** 2 + (xx - 512) ** 2 < 400**2) * 150 + np.random.default_rng(0).integers(0, 30, (1024, 1024))
    ct_like.PixelData = disk.astype(np.uint8).tobytes()  # an axial-slice-like disk in a real DICOM
    cr = pydicom.dcmread(shared_path("dicom", REAL[CR]))
    cases = {"dx": (dx, True), "cr": (cr, True), "flipped": (flipped, False), "ct_like": (ct_like, False)}
    for name, (ds, chest) in cases.items():
        code, err = _run(["-i", str(_study(tmp_path / name, ds)), "-o", str(tmp_path / f"out_{name}"), "-m",
                          str(model_path), "--accept-unknown-body-part"], capsys)
        assert code == 0, err[-2000:]
        result, sr = _outputs(tmp_path / f"out_{name}")
        ood = result["ood"]
        assert ood["checked"] and ood["threshold"] == pytest.approx(stats.threshold)
        assert ood["in_distribution"] is chest, (name, ood)
        text = sr.ContentSequence[0].TextValue
        if chest:
            assert result["findings_withheld"] is None and "Probabilities:" in text
        else:
            assert result["findings"] == [] and "out-of-distribution distance" in result["findings_withheld"]
            assert text.startswith("Findings withheld: the image does not look like") and "Probabilities" not in text
        # The distance is sklearn's Mahalanobis distance (squared there) under the same Ledoit-Wolf fit.
        from monai_cxr_ssl.data import dicom_to_image
        from monai_cxr_ssl.deploy.ood import centre_crop

        scripted = torch.jit.load(str(model_path))
        with torch.no_grad():
            features = scripted.pooled_features(centre_crop(dicom_to_image(ds, name), IMAGE_SIZE, CROP_SIZE)[None])
        expected = np.sqrt(fitted.mahalanobis(features.double().numpy()))[0]
        assert ood["distance"] == pytest.approx(expected, rel=1e-3)
