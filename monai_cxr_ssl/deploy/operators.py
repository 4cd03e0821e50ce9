"""The app's own operators: DICOM loading (also without the Part-10 header), chest-radiograph series selection, the
classifier with its out-of-distribution check, and a DICOM Comprehensive SR writer, plus the pure prediction steps.

The SDK's ``DICOMSeriesToVolumeOperator`` is not used: it neither inverts MONOCHROME1 nor applies the VOI LUT or
window, so the classifier reads the selected instance with the bundle's own DICOM conversion
(``monai_cxr_ssl.data.dicom_to_image``) and resizes it as the bundle's inference does.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator
from monai.transforms import Resize
from monai.utils import convert_to_tensor
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from monai_cxr_ssl import __version__
from monai_cxr_ssl.data import ACCEPTED_MODALITIES, dicom_to_image, read_dicom_dataset
from monai_cxr_ssl.deploy.inversion import looks_inverted
from monai_cxr_ssl.deploy.ood import OODStats, centre_crop
from monai_cxr_ssl.transforms.tencrop import ten_crop

__all__ = ["DeployInputError", "CHEST_RADIOGRAPH_RULES", "CHEST_WORDS", "body_part_evidence", "CXRDICOMLoaderOperator",
           "ChestSeriesSelectorOperator", "CXRClassifierOperator", "CXRSRWriterOperator", "predict", "findings_text",
           "sr_uids", "build_sr"]

logger = logging.getLogger("monai_cxr_ssl.deploy")

# The SDK's rule format: the radiograph modalities the reader accepts (case-insensitive regular expression).
CHEST_RADIOGRAPH_RULES = json.dumps(
    {"selections": [{"name": "radiograph", "conditions": {"Modality": f"(?i)^({'|'.join(ACCEPTED_MODALITIES)})$"}}]})
CHEST_BODY_PARTS = ("CHEST", "THORAX")
# Words that say "chest" in descriptions, in English, French, German, Italian, Spanish, Portuguese and Dutch
# (not Dutch "long", an English word).
CHEST_WORDS = re.compile(
    r"(?<![a-z])(chest|thorax|thoracic|thx|cxr|lungs?|pulmonary|poumons?|thoracique|brust|brustkorb|lunge|torace|"
    r"polmoni|t[oó]rax|pecho|pulm[oó]n|pulm[oõ]es|borst|borstkas|longen)(?![a-z])", re.IGNORECASE)
DESCRIPTION_TAGS = ("StudyDescription", "SeriesDescription", "ProtocolName")
SR_SERIES_NUMBER = 9901
SR_FILE = "{uid}.dcm"
# The patient and study attributes the SR keeps from its image (through highdicom); nothing else is copied.
SR_KEPT_TAGS = ("PatientName", "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "StudyID", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyDescription")
# Type-2 attributes the SR must have: empty when the image has none; the demographics are always empty.
SR_TYPE2_TAGS = ("PatientName", "PatientID", "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
                 "PatientBirthDate", "PatientSex", "ReferringPhysicianName")


class DeployInputError(ValueError):
    """Input the app cannot classify (no radiograph series, several images, ...): reported without a traceback."""


def body_part_evidence(ds: pydicom.Dataset) -> tuple[str, str]:
    """``("chest" | "other" | "unknown", why)`` for an image's header.

    ``BodyPartExamined`` decides when present (CHEST/THORAX or a chest word: chest; anything else: other). Without it,
    a chest word (``CHEST_WORDS``) in StudyDescription, SeriesDescription or ProtocolName says chest; else the body
    part is unknown. ViewPosition (PA/AP/LAT) is not evidence: hands and knees are taken PA/AP/LAT too.
    """
    part = str(ds.get("BodyPartExamined") or "").strip()
    if part:
        if part.upper() in CHEST_BODY_PARTS or CHEST_WORDS.search(part):
            return "chest", f"BodyPartExamined {part}"
        return "other", f"BodyPartExamined {part}"
    for tag in DESCRIPTION_TAGS:
        match = CHEST_WORDS.search(str(ds.get(tag) or ""))
        if match:
            return "chest", f"BodyPartExamined absent; {tag} says {match[0]!r}"
    return "unknown", "BodyPartExamined absent and no chest word in " + ", ".join(DESCRIPTION_TAGS)


def _first_instance(series: Any) -> pydicom.Dataset:
    return series.get_sop_instances()[0].get_native_sop_instance()


class CXRDICOMLoaderOperator(DICOMDataLoaderOperator):
    """The SDK's DICOM loader, which also takes files without the Part-10 header.

    The SDK reads every file with ``dcmread(file)``, which refuses a header-less file ("Use force=True"); such
    files (already checked to be DICOM by content) are parsed with force and handed on as in-memory Part-10 files.
    """

    def _load_data(self, files: list[str]) -> list:
        warned = _Messages()
        self._logger.addHandler(warned)
        try:
            studies = super()._load_data([_as_part10(Path(f)) for f in files])
        finally:
            self._logger.removeHandler(warned)
        # The SDK logs and drops an instance it cannot parse (a malformed position, ...), which would later read as
        # "no chest radiograph" or an empty series: name the file instead.
        loaded = {str(instance.get_native_sop_instance().SOPInstanceUID) for study in studies
                  for series in study.get_all_series() for instance in series.get_sop_instances()}
        if len(loaded) == len(files):  # every file is in a series: nothing to read again
            return studies
        for path in files:
            ds = read_dicom_dataset(Path(path))
            if str(ds.SOPInstanceUID) not in loaded and ds.SOPClassUID not in self.SOP_CLASSES_TO_IGNORE:
                raise DeployInputError(
                    f"{path}: the DICOM loader could not place this {ds.get('Modality', '')} image in a series "
                    f"({'; '.join(warned.messages) or 'no reason given'}); re-export it or remove it from the input "
                    "folder.")
        return studies


class _Messages(logging.Handler):
    """Keeps the warnings a logger emits, to quote them in an error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _as_part10(path: Path) -> str | io.BytesIO:
    with open(path, "rb") as f:
        if f.read(132)[128:] == b"DICM":
            return str(path)
    ds = read_dicom_dataset(path)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.preamble = b"\0" * 128
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    buffer.name = str(path)  # pydicom keeps it as the dataset's filename, which errors name
    return buffer


class ChestSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """Pick one radiograph series per study: a series that says chest (``body_part_evidence``) first, then, only with
    ``accept_unknown_body_part``, one whose body part is unknown; another body part is never picked.

    ``num_studies`` and ``skipped`` (``(StudyInstanceUID, reason)`` for each study without such a series) are kept
    for the classifier and the app, which name every skipped study.
    """

    def __init__(self, fragment: Fragment, *args: Any, accept_unknown_body_part: bool = False,
                 input_folder: Path | None = None, **kwargs: Any) -> None:
        self.accept_unknown, self.input_folder = accept_unknown_body_part, input_folder
        self.num_studies, self.skipped = 0, []
        super().__init__(fragment, *args, rules=CHEST_RADIOGRAPH_RULES, all_matched=True, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        """The SDK's modality match, then the body-part decision; at most one series per study."""
        studies = list(dicom_study_list)
        matched = {id(selected.study): selected
                   for selected in super().filter(selection_rules, studies, True, sort_by_sop_instance_count)}
        self.num_studies, self.skipped = len(studies), []
        chosen, unknown = [], 0
        for dicom_study in studies:
            selected = matched.get(id(dicom_study))
            ranked: dict[str, list] = {"chest": [], "unknown": [], "other": []}
            for s in selected.selected_series if selected is not None else []:
                kind = body_part_evidence(_first_instance(s.series))[0]
                ranked[kind if kind in ranked else "other"].append(s)
            unknown += len(ranked["unknown"])
            candidates = ranked["chest"] + (ranked["unknown"] if self.accept_unknown else [])
            if candidates:
                study = StudySelectedSeries(dicom_study)
                study.add_selected_series(SelectedSeries(candidates[0].selection_name, candidates[0].series, None))
                chosen.append(study)
            elif ranked["unknown"]:
                self.skipped.append((dicom_study.StudyInstanceUID, (
                    f"no radiograph series says it shows the chest ({len(ranked['unknown'])} with BodyPartExamined "
                    f"absent and no chest word in {', '.join(DESCRIPTION_TAGS)}; --accept-unknown-body-part "
                    "classifies them)")))
            else:
                self.skipped.append((dicom_study.StudyInstanceUID, (
                    f"no radiograph series of the chest (Modality {'/'.join(ACCEPTED_MODALITIES)}, not another body "
                    "part)")))
        if not chosen and unknown:
            raise DeployInputError(
                f"{self.input_folder or 'input'}: no radiograph series says it shows the chest ({unknown} series with "
                f"BodyPartExamined absent and no chest word in {', '.join(DESCRIPTION_TAGS)}); the app refuses images "
                "it cannot tell are chest radiographs. Pass --accept-unknown-body-part to classify them anyway.")
        return chosen


def predict(model: torch.nn.Module, image: np.ndarray, image_size: int, crop_size: int) -> np.ndarray:
    """Per-class probabilities of one ``(H, W)`` image in [0, 1]: area resize to ``image_size``, then the mean over
    the ten ``crop_size`` crops of a model that returns probabilities (the exported network, whose probability
    layer is ``monai_cxr_ssl.probabilities.probability_layer``), as the bundle's ten-crop inferer averages them."""
    resized = Resize((image_size, image_size), mode="area")(torch.as_tensor(image, dtype=torch.float32)[None])
    crops = ten_crop(convert_to_tensor(resized, track_meta=False)[None], crop_size)  # (10, 1, 1, crop, crop)
    with torch.inference_mode():
        probs = model(crops.reshape(-1, *crops.shape[2:]))
    return probs.reshape(crops.shape[0], -1).mean(dim=0).numpy()


def ood_result(model: torch.nn.Module, stats: OODStats | None, image: np.ndarray, image_size: int,
               crop_size: int) -> dict[str, Any]:
    """The out-of-distribution check of one image (see ``monai_cxr_ssl.deploy.ood``): distance, threshold, verdict."""
    if stats is None or not hasattr(model, "pooled_features"):
        return {"checked": False, "reason": "the model was exported without out-of-distribution statistics"}
    with torch.inference_mode():
        features = model.pooled_features(centre_crop(image, image_size, crop_size)[None]).double().numpy()
    distance = float(stats.distance(features)[0])
    return {"checked": True, "distance": distance, "threshold": stats.threshold,
            "in_distribution": distance <= stats.threshold}


def findings_text(result: dict) -> str:
    """The SR's narrative: findings above threshold and every probability, or why findings are withheld; the
    body-part evidence, the model, research-use notice."""
    model = result["model"]
    if result.get("findings_withheld"):
        summary = f"Findings withheld: {result['findings_withheld']}."
    else:
        found = [f"{name} ({result['probabilities'][name]:.3f} >= {result['thresholds'][name]:.3f})"
                 for name in result["findings"]]
        probs = ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items())
        summary = f"Findings: {'; '.join(found) if found else 'none above threshold'}. Probabilities: {probs}."
    ood = result["ood"]
    check = (f"out-of-distribution distance {ood['distance']:.2f} (threshold {ood['threshold']:.2f})" if ood["checked"]
             else "no out-of-distribution check")
    part = result["body_part"]
    accepted = " (accepted with --accept-unknown-body-part)" if part["decision"] == "unknown" else ""
    return (f"{summary} Body part: {part['evidence']}{accepted}; {check}. Model: {model['name']} {model['version']} "
            f"({model.get('stage', '')}). Research use only, not for clinical decisions.")


class CXRClassifierOperator(Operator):
    """Classify the selected radiograph of each study: writes ``result.json`` into ``output_folder`` (into
    ``output_folder/<StudyInstanceUID>/`` when the input holds several studies), emits ``[(result, dataset,
    folder)]``. A study that cannot be classified (a series of several images) is added to the selector's
    ``skipped`` with its reason; when no study can be, the run fails naming why.

    Inputs: ``study_selected_series_list``. Outputs: ``report``. The JSON names the image by its Study, Series and
    SOP Instance UIDs only: no patient name, ID or demographics. Findings are withheld (empty, with the reason in
    ``findings_withheld``) when the image fails the out-of-distribution check.
    """

    def __init__(
        self, fragment: Fragment, *args: Any, model: torch.nn.Module, meta: dict, ood: OODStats | None,
        model_sha256: str, output_folder: Path, input_folder: Path, selector: ChestSeriesSelectorOperator,
        accept_unknown_body_part: bool = False, **kwargs: Any,
    ) -> None:
        self.model, self.meta, self.ood, self.model_sha256 = model, meta, ood, model_sha256
        self.accept_unknown, self.selector = accept_unknown_body_part, selector
        self.output_folder, self.input_folder = Path(output_folder), Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("report")

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive("study_selected_series_list") or []
        reports = []
        for study in selected:
            series = study.selected_series[0].series
            instances = series.get_sop_instances()
            if len(instances) != 1:
                self.selector.skipped.append((study.study.StudyInstanceUID, (
                    f"the selected {series.Modality} series has {len(instances)} images; the app classifies one 2-D "
                    "radiograph per study, give a study with a single image series")))
                continue
            ds = instances[0].get_native_sop_instance()
            folder = self.output_folder / (str(ds.StudyInstanceUID) if self.selector.num_studies > 1 else "")
            folder.mkdir(parents=True, exist_ok=True)
            reports.append((self.classify(ds), ds, folder))
            with open(folder / "result.json", "w") as f:
                json.dump(reports[-1][0], f, indent=2)
        if not reports:
            reasons = "; ".join(reason for _, reason in self.selector.skipped)
            raise DeployInputError(f"{self.input_folder}: {reasons or 'no radiograph series of the chest'}; give the "
                                   "folder of a chest radiograph study.")
        op_output.emit(reports, "report")

    def classify(self, ds: pydicom.Dataset) -> dict:
        """The result of one radiograph: probabilities, findings (or why they are withheld), provenance."""
        image = dicom_to_image(ds, getattr(ds, "filename", None) or self.input_folder)
        info = self.meta["cxr_ssl"]
        probs = predict(self.model, image, info["image_size"], info["crop_size"])
        probabilities = {name: float(p) for name, p in zip(info["classes"], probs, strict=True)}
        ood = ood_result(self.model, self.ood, image, info["image_size"], info["crop_size"])
        findings = [name for name, p in probabilities.items() if p >= info["thresholds"][name]]
        withheld = None
        if ood["checked"] and not ood["in_distribution"]:
            withheld = (f"the image does not look like the model's training images (out-of-distribution distance "
                        f"{ood['distance']:.2f} > threshold {ood['threshold']:.2f}); not a chest radiograph the "
                        "model can judge")
        else:  # a negative radiograph can pass the out-of-distribution check
            withheld = looks_inverted(image, str(ds.get("PhotometricInterpretation", "")))
        if withheld is not None:
            findings = []
        decision, evidence = body_part_evidence(ds)
        result = {
            "probabilities": probabilities,
            "thresholds": info["thresholds"],
            "findings": findings,
            "findings_withheld": withheld,
            "ood": ood,
            "body_part": {"decision": decision, "evidence": evidence,
                          "accept_unknown_body_part": self.accept_unknown},
            "model": {"name": self.meta.get("name", ""), "version": self.meta.get("version", ""),
                      **{k: info[k] for k in ("stage", "method", "source_run_id") if k in info},
                      "sha256": self.model_sha256},
            "image": {"StudyInstanceUID": str(ds.StudyInstanceUID), "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                      "SOPInstanceUID": str(ds.SOPInstanceUID), "Modality": str(ds.get("Modality", "")),
                      "BodyPartExamined": str(ds.get("BodyPartExamined", ""))},
            "app": {"name": "monai-cxr-ssl", "version": __version__},
        }
        sr_uid, _ = sr_uids(ds, result["model"])
        result["sr"] = {"SOPInstanceUID": sr_uid, "file": SR_FILE.format(uid=sr_uid)}
        logger.info("study %s findings: %s", ds.StudyInstanceUID, withheld or ", ".join(findings)
                    or "none above threshold")
        return result


def sr_uids(source: pydicom.Dataset, model: dict) -> tuple[str, str]:
    """The SR's SOP Instance and Series Instance UIDs, derived from the source image and the model's identity
    (``pydicom.uid.generate_uid(entropy_srcs=...)``): a re-run with the same model replaces its SR."""
    identity = [model.get(k, "") for k in ("name", "version", "stage", "source_run_id", "sha256")]
    sop = generate_uid(entropy_srcs=["monai-cxr-ssl SR", str(source.SOPInstanceUID), *identity])
    series = generate_uid(entropy_srcs=["monai-cxr-ssl SR series", str(source.StudyInstanceUID), *identity])
    return sop, series


def build_sr(source: pydicom.Dataset, result: dict) -> hd.sr.ComprehensiveSR:
    """A Comprehensive SR in the source image's study: a Diagnostic Imaging Report container holding the findings
    text (``findings_text``), the algorithm name and an IMAGE item referencing the source instance, which is also
    its evidence (CurrentRequestedProcedureEvidenceSequence). Of the source's patient and study attributes only
    ``SR_KEPT_TAGS`` are kept; birth date, sex and referring physician are written empty."""
    sop_uid, series_uid = sr_uids(source, result["model"])
    evidence = pydicom.Dataset()  # only what the SR needs of the image: highdicom copies whatever it is given
    for tag in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", *SR_KEPT_TAGS):
        if tag in source:
            evidence.add(source[tag])
    for tag in SR_TYPE2_TAGS:
        if tag not in evidence:
            setattr(evidence, tag, "")
    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport)
    root.ContentSequence = [
        hd.sr.TextContentItem(name=codes.DCM.Finding, value=findings_text(result)[:1024],
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        hd.sr.TextContentItem(name=codes.DCM.AlgorithmName, value=f"monai-cxr-ssl {result['model']['version']}",
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        hd.sr.ImageContentItem(name=codes.DCM.SourceImageForImageProcessingOperation,
                               referenced_sop_class_uid=source.SOPClassUID,
                               referenced_sop_instance_uid=source.SOPInstanceUID,
                               relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
    ]
    with warnings.catch_warnings():  # highdicom's warning on an unusual patient name quotes the name: not logged
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sr = hd.sr.ComprehensiveSR(
            evidence=[evidence], content=root, series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_uid, instance_number=1, manufacturer="monai-cxr-ssl", is_complete=True,
            series_description="monai-cxr-ssl AI findings (research use only)", software_versions=__version__)
    return sr


class CXRSRWriterOperator(Operator):
    """Write each of the classifier's reports as a DICOM Comprehensive SR (``build_sr``) beside its ``result.json``.

    Replaces the SDK's ``DICOMTextSRWriterOperator``, which draws a random SOP Instance UID on every run and
    references no image (no evidence sequence, no IMAGE content item).
    """

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("report")

    def compute(self, op_input, op_output, context) -> None:
        for result, source, folder in op_input.receive("report"):
            build_sr(source, result).save_as(folder / result["sr"]["file"], enforce_file_format=True)
