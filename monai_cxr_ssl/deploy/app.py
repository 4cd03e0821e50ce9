"""The chest X-ray classifier as a MONAI Deploy application.

DICOM folder → ``CXRDICOMLoaderOperator`` (the SDK's loader, also for files without the Part-10 header) →
``ChestSeriesSelectorOperator`` (per study, a radiograph modality; chest by BodyPartExamined or, without it, by a chest
word in the descriptions; an unknown body part only with ``--accept-unknown-body-part``) → ``CXRClassifierOperator``
(the bundle's DICOM conversion, resize and ten crops, and the out-of-distribution check; TorchScript from
``monai-cxr-ssl export``) → ``result.json`` and, through ``CXRSRWriterOperator``, a DICOM Comprehensive SR that
references the image and whose UID is derived from the image and the model (a re-run replaces it). An input folder
with several studies gets one folder of outputs per study, named by its StudyInstanceUID; a study that cannot be
classified is named with its reason on stderr and in ``skipped.json``, never dropped silently.

Inputs are checked before the graph starts (paths, files, model) and every output is written into a hidden
staging folder inside the output folder, moved into place only when the whole study succeeded: a failure leaves no
partial file. Expected problems end with one line on stderr and exit code 1.

Privacy: ``result.json`` and the logs carry no patient name, ID or demographics, only the Study/Series/SOP Instance
UIDs. The SR keeps the patient name and ID and the study attributes of the study it belongs to (DICOM requires every
instance of a study to carry the same patient identity, and a PACS files the SR by it) and blanks the birth date,
sex and referring physician (docs/deploy.md lists every attribute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from monai.data import load_net_with_metadata
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application

from monai_cxr_ssl.data import ImageReadError, check_image, is_dicom, read_dicom_dataset
from monai_cxr_ssl.deploy.ood import OOD_STATS_FILE, OODStats
from monai_cxr_ssl.deploy.operators import (
    ChestSeriesSelectorOperator,
    CXRClassifierOperator,
    CXRDICOMLoaderOperator,
    CXRSRWriterOperator,
    DeployInputError,
)

__all__ = ["CXRClassifierApp", "check_inputs", "load_model", "main"]

logger = logging.getLogger("monai_cxr_ssl.deploy")

MODEL_SUFFIXES = (".ts", ".pt")
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
ACCEPT_UNKNOWN_ENV = "MONAI_CXR_SSL_ACCEPT_UNKNOWN_BODY_PART"  # "1": the flag, for packaged apps


def _not_a_folder(path: Path, remedy: str) -> str:
    if path.exists():
        return (f"{path}: the input is a file, not a folder; the app reads a study's folder: pass {remedy}, e.g. "
                f"-i {path.parent}.")
    return f"{path}: input folder does not exist; pass {remedy}."


def check_inputs(input_folder: Path) -> list[Path]:
    """The DICOM files of ``input_folder`` (recursively, hidden files skipped); each must be DICOM by content
    (preamble, or a forced read that finds pixel data) and carry its UIDs, or the cause is named."""
    if not input_folder.is_dir():
        raise DeployInputError(_not_a_folder(input_folder, "-i <folder of DICOM files>"))
    files = sorted(p for p in input_folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DeployInputError(f"{input_folder}: the input folder is empty; give the folder of a study's DICOM files.")
    for path in files:
        if not is_dicom(path):
            raise DeployInputError(
                f"{path}: not a DICOM file (no Part-10 preamble, and a forced read finds no pixel data); remove it "
                "from the input folder.")
        try:
            ds = read_dicom_dataset(path)
            missing = [key for key in REQUIRED_UIDS if not ds.get(key)]  # reading them parses the header through
            problem = f"no {', '.join(missing)}" if missing else ""
        except Exception as err:  # pydicom reports damaged files with many exception types
            problem = f"{type(err).__name__}: {err}"
        if problem:
            try:  # the image check names the real cause (truncated pixel data, ...) when there is one
                check_image(path)
            except ImageReadError as err:
                problem = err.problem
            raise DeployInputError(
                f"{path}: not a readable DICOM file ({problem}); remove it from the input folder or re-export it.")
    return files


def load_model(model_path: Path) -> tuple[object, dict, OODStats | None, str]:
    """The TorchScript classifier, its metadata, its out-of-distribution statistics (None when exported without)
    and the file's SHA-256, from a file or from the single model file in a folder (a packaged MAP's model path)."""
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
        model, meta, extra = load_net_with_metadata(str(model_path), map_location="cpu",
                                                    more_extra_files=[OOD_STATS_FILE])
    except Exception as err:  # torch.jit.load reports foreign or corrupt files with many exception types
        raise DeployInputError(
            f"{model_path}: not a TorchScript model ({type(err).__name__}); export one with "
            "`monai-cxr-ssl export <run folder> -o model.ts`.") from err
    if "cxr_ssl" not in meta:
        raise DeployInputError(
            f"{model_path}: the model has no monai-cxr-ssl metadata (classes, image and crop size, thresholds); "
            "export it with `monai-cxr-ssl export <run folder> -o model.ts`.")
    stats = OODStats.from_bytes(extra[OOD_STATS_FILE]) if extra.get(OOD_STATS_FILE) else None
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    return model.eval(), meta, stats, digest


class CXRClassifierApp(Application):
    """DICOM study in, per-class probabilities and thresholded findings out (JSON + DICOM SR)."""

    def __init__(self, context: AppContext, model: object, meta: dict, ood: OODStats | None, model_sha256: str,
                 staging: Path, accept_unknown_body_part: bool = False) -> None:
        self.context, self.model, self.meta, self.ood, self.staging = context, model, meta, ood, staging
        self.model_sha256, self.accept_unknown = model_sha256, accept_unknown_body_part
        super().__init__()

    def compose(self) -> None:
        input_folder = Path(self.context.input_path)
        loader = CXRDICOMLoaderOperator(self, CountCondition(self, 1), input_folder=input_folder, name="loader")
        selector = self.selector = ChestSeriesSelectorOperator(  # the app reads its skipped studies after the run
            self, accept_unknown_body_part=self.accept_unknown, input_folder=input_folder, name="selector")
        classifier = CXRClassifierOperator(
            self, model=self.model, meta=self.meta, ood=self.ood, model_sha256=self.model_sha256,
            output_folder=self.staging, input_folder=input_folder, selector=selector,
            accept_unknown_body_part=self.accept_unknown, name="classifier")
        sr_writer = CXRSRWriterOperator(self, name="sr_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, classifier, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(classifier, sr_writer, {("report", "report")})


def _publish(staging: Path, output_folder: Path) -> list[Path]:
    """Move the finished outputs from ``staging`` into ``output_folder`` (replacing a previous run's)."""
    results = sorted(staging.rglob("result.json"))
    if not results or any(not list(r.parent.glob("*.dcm")) for r in results):
        raise RuntimeError(f"the app finished without writing result.json and its SR into {staging}")
    published = []
    for path in sorted(staging.iterdir()):
        target = output_folder / path.name
        if target.is_dir():  # a previous run's study folder
            shutil.rmtree(target)
        os.replace(path, target)
        published.extend(sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target])
    return published


def _options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This app's own flag and the paths the SDK will use (``-i/-o/-m`` or the HOLOSCAN_* variables), checked
    here because the SDK answers a bad path with its usage text; returns them and the SDK's argv."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--input")
    parser.add_argument("-o", "--output")
    parser.add_argument("-m", "--model")
    parser.add_argument("--accept-unknown-body-part", action="store_true")
    known, _ = parser.parse_known_args(argv[1:])
    sdk_argv = [arg for arg in argv if arg != "--accept-unknown-body-part"]
    known.input = known.input or os.environ.get("HOLOSCAN_INPUT_PATH")
    known.model = known.model or os.environ.get("HOLOSCAN_MODEL_PATH")
    known.accept_unknown_body_part |= os.environ.get(ACCEPT_UNKNOWN_ENV) == "1"
    if not known.input or not Path(known.input).is_dir():
        raise DeployInputError(_not_a_folder(Path(known.input or "(none)"),
                                             "-i <folder of DICOM files> (or set HOLOSCAN_INPUT_PATH)"))
    if not known.model or not Path(known.model).exists():
        raise DeployInputError(f"{known.model or '(none)'}: model file does not exist; pass -m <model.ts> (or set "
                               "HOLOSCAN_MODEL_PATH).")
    return known, sdk_argv


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app on ``-i/-o/-m`` (or HOLOSCAN_INPUT_PATH / HOLOSCAN_OUTPUT_PATH / HOLOSCAN_MODEL_PATH) and
    ``--accept-unknown-body-part`` (or MONAI_CXR_SSL_ACCEPT_UNKNOWN_BODY_PART=1)."""
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "CRITICAL")  # Python errors still reach the user, once
    try:
        options, sdk_argv = _options(list(sys.argv if argv is None else argv))
    except DeployInputError as err:
        print(f"monai-cxr-ssl deploy: error: {err}", file=sys.stderr)
        return 1
    context = Application.init_app_context(sdk_argv)
    input_folder, output_folder = Path(context.input_path), Path(context.output_path)
    staging = output_folder / f".partial-{uuid.uuid4().hex}"
    try:
        check_inputs(input_folder)
        model, meta, ood, digest = load_model(Path(context.model_path))
        staging.mkdir(parents=True)
        app = CXRClassifierApp(context, model, meta, ood, digest, staging, options.accept_unknown_body_part)
        app.run()
        skipped = app.selector.skipped
        if skipped:
            with open(staging / "skipped.json", "w") as f:
                json.dump([{"StudyInstanceUID": uid, "reason": reason} for uid, reason in skipped], f, indent=2)
        else:  # a previous run's list no longer applies
            (output_folder / "skipped.json").unlink(missing_ok=True)
        published = _publish(staging, output_folder)
    except (DeployInputError, ImageReadError) as err:
        print(f"monai-cxr-ssl deploy: error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path in published:
        print(f"wrote {path}")
    for uid, reason in skipped:
        print(f"monai-cxr-ssl deploy: skipped study {uid}: {reason}", file=sys.stderr)
    return 0
