"""The chest X-ray classifier as a MONAI Deploy application.

DICOM folder → ``DICOMDataLoaderOperator`` → ``ChestSeriesSelectorOperator`` (CR/DX, chest when the body part is
given) → ``CXRClassifierOperator`` (the bundle's DICOM conversion, resize and ten crops; TorchScript from
``monai-cxr-ssl export``) → ``result.json`` and, through ``DICOMTextSRWriterOperator``, a DICOM Basic Text SR.

Inputs are checked before the graph starts (folder, files, model) and every output is written into a hidden
staging folder inside the output folder, moved into place only when the whole study succeeded: a failure leaves no
partial file. Expected problems end with one line on stderr and exit code 1.

Privacy: ``result.json`` and the logs carry no patient name, ID or demographics, only the Study/Series/SOP Instance
UIDs. The SR keeps the patient name and ID of the study it belongs to (DICOM requires every instance of a study to
carry the same patient identity, and a PACS files the SR by it) and blanks the birth date, sex and referring
physician that the SDK's writer would copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import pydicom
from monai.data import load_net_with_metadata
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMTextSRWriterOperator
from monai.deploy.operators.dicom_utils import EquipmentInfo, ModelInfo

from monai_cxr_ssl import __version__
from monai_cxr_ssl.data import ImageReadError
from monai_cxr_ssl.deploy.operators import ChestSeriesSelectorOperator, CXRClassifierOperator, DeployInputError

__all__ = ["CXRClassifierApp", "check_inputs", "load_model", "main"]

logger = logging.getLogger("monai_cxr_ssl.deploy")

# Demographics the SDK's SR writer copies from the study, blanked: the SR needs the patient identity, not these.
BLANKED_SR_TAGS = {"PatientBirthDate": "", "PatientSex": "", "ReferringPhysicianName": ""}
MODEL_SUFFIXES = (".ts", ".pt")
SR_NAME_LENGTH = 51
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def check_inputs(input_folder: Path) -> list[Path]:
    """The DICOM files of ``input_folder`` (recursively, hidden files skipped); each must parse as DICOM."""
    if not input_folder.is_dir():
        raise DeployInputError(f"{input_folder}: input folder does not exist; pass -i <folder of DICOM files>.")
    files = sorted(p for p in input_folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DeployInputError(f"{input_folder}: the input folder is empty; give the folder of a study's DICOM files.")
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            missing = [key for key in REQUIRED_UIDS if not ds.get(key)]  # reading them parses the header through
            problem = f"no {', '.join(missing)}" if missing else ""
        except Exception as err:  # pydicom reports damaged files with many exception types
            problem = f"{type(err).__name__}: {err}"
        if problem:
            raise DeployInputError(
                f"{path}: not a readable DICOM file ({problem}); remove it from the input folder or re-export it.")
    return files


def load_model(model_path: Path) -> tuple[object, dict]:
    """The TorchScript classifier and its metadata from a file, or from the single model file in a folder (the
    layout of a packaged MAP's model path)."""
    if model_path.is_dir():
        candidates = sorted(p for p in model_path.rglob("*") if p.suffix in MODEL_SUFFIXES)
        if len(candidates) != 1:
            raise DeployInputError(
                f"{model_path}: expected one model file ({'/'.join(MODEL_SUFFIXES)}) in the model folder, found "
                f"{len(candidates)}; pass -m <model.ts>.")
        model_path = candidates[0]
    if not model_path.is_file():
        raise DeployInputError(f"{model_path}: model file does not exist; pass -m <model.ts>.")
    try:
        model, meta, _ = load_net_with_metadata(str(model_path), map_location="cpu")
    except Exception as err:  # torch.jit.load reports foreign or corrupt files with many exception types
        raise DeployInputError(
            f"{model_path}: not a TorchScript model ({type(err).__name__}); export one with "
            "`monai-cxr-ssl export <run folder> -o model.ts`.") from err
    if "cxr_ssl" not in meta:
        raise DeployInputError(
            f"{model_path}: the model has no monai-cxr-ssl metadata (classes, image and crop size, thresholds); "
            "export it with `monai-cxr-ssl export <run folder> -o model.ts`.")
    return model.eval(), meta


class CXRClassifierApp(Application):
    """DICOM study in, per-class probabilities and thresholded findings out (JSON + DICOM SR)."""

    def __init__(self, context: AppContext, model: object, meta: dict, staging: Path) -> None:
        self.context, self.model, self.meta, self.staging = context, model, meta, staging
        super().__init__()

    def compose(self) -> None:
        input_folder = Path(self.context.input_path)
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="loader")
        selector = ChestSeriesSelectorOperator(self, name="selector")
        classifier = CXRClassifierOperator(self, model=self.model, meta=self.meta, output_folder=self.staging,
                                           input_folder=input_folder, name="classifier")
        # The SR's OperatorsName is "AI Algorithm <name>", a 64-character field: a short name, the full one is in JSON.
        short_name = f"monai-cxr-ssl {self.meta['cxr_ssl'].get('stage', '')}".strip()[:SR_NAME_LENGTH]
        model_info = ModelInfo(creator="monai-cxr-ssl", name=short_name, version=self.meta.get("version", ""))
        sr_writer = DICOMTextSRWriterOperator(
            self, output_folder=self.staging, model_info=model_info, copy_tags=True,
            equipment_info=EquipmentInfo(manufacturer="monai-cxr-ssl", software_version_number=__version__),
            custom_tags=BLANKED_SR_TAGS, name="sr_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, classifier, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(classifier, sr_writer, {("result_text", "text")})
        self.add_flow(selector, sr_writer, {("study_selected_series_list", "study_selected_series_list")})


def _publish(staging: Path, output_folder: Path) -> list[Path]:
    """Move the finished outputs from ``staging`` into ``output_folder``."""
    outputs = sorted(staging.iterdir())
    if not any(p.name == "result.json" for p in outputs) or not any(p.suffix == ".dcm" for p in outputs):
        raise RuntimeError(f"the app finished without writing result.json and the SR into {staging}")
    published = []
    for path in outputs:
        target = output_folder / path.name
        os.replace(path, target)
        published.append(target)
    return published


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app on ``-i/-o/-m`` (or HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH)."""
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "CRITICAL")  # Python errors still reach the user, once
    context = Application.init_app_context(list(sys.argv if argv is None else argv))
    input_folder, output_folder = Path(context.input_path), Path(context.output_path)
    staging = output_folder / f".partial-{uuid.uuid4().hex}"
    try:
        check_inputs(input_folder)
        model, meta = load_model(Path(context.model_path))
        staging.mkdir(parents=True)
        CXRClassifierApp(context, model, meta, staging).run()
        published = _publish(staging, output_folder)
    except (DeployInputError, ImageReadError) as err:
        print(f"monai-cxr-ssl deploy: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path in published:
        print(f"wrote {path}")
    return 0
