"""The app's own operators: chest-radiograph series selection and the classifier, plus the pure prediction step.

The SDK's ``DICOMSeriesToVolumeOperator`` is not used: it neither inverts MONOCHROME1 nor applies the VOI LUT or
window, so the classifier reads the selected instance with the bundle's own DICOM conversion
(``monai_cxr_ssl.data.dicom_to_image``) and resizes it as the bundle's inference does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.operators import DICOMSeriesSelectorOperator
from monai.transforms import Resize
from monai.utils import convert_to_tensor

from monai_cxr_ssl import __version__
from monai_cxr_ssl.data import dicom_to_image
from monai_cxr_ssl.transforms.tencrop import ten_crop

__all__ = ["DeployInputError", "CHEST_RADIOGRAPH_RULES", "ChestSeriesSelectorOperator", "CXRClassifierOperator",
           "predict", "findings_text"]

logger = logging.getLogger("monai_cxr_ssl.deploy")

# The SDK's rule format: computed and digital radiography series (case-insensitive regular expression).
CHEST_RADIOGRAPH_RULES = json.dumps({"selections": [{"name": "CR/DX", "conditions": {"Modality": "(?i)^(CR|DX)$"}}]})
CHEST_BODY_PARTS = ("CHEST", "THORAX")


class DeployInputError(ValueError):
    """Input the app cannot classify (no radiograph series, several images, ...): reported without a traceback."""


def _body_part(series: Any) -> str:
    part = series.BodyPartExamined or series.get_sop_instances()[0].get_native_sop_instance().get(
        "BodyPartExamined", "")
    return str(part or "").strip().upper()


class ChestSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """Pick one CR/DX series per study: a series labelled chest first, else one without a body part; a series whose
    ``BodyPartExamined`` names another part (a hand, a knee) is never picked."""

    def __init__(self, fragment: Fragment, *args: Any, **kwargs: Any) -> None:
        super().__init__(fragment, *args, rules=CHEST_RADIOGRAPH_RULES, all_matched=True, **kwargs)

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        """The SDK's modality match, then the body-part preference; at most one series per study."""
        chosen = []
        for selected in super().filter(selection_rules, dicom_study_list, True, sort_by_sop_instance_count):
            candidates = [s for s in selected.selected_series if _body_part(s.series) in ("", *CHEST_BODY_PARTS)]
            if candidates:
                candidates.sort(key=lambda s: _body_part(s.series) == "")  # labelled chest series first
                study = StudySelectedSeries(selected.study)
                study.add_selected_series(SelectedSeries(candidates[0].selection_name, candidates[0].series, None))
                chosen.append(study)
        return chosen


def predict(model: torch.nn.Module, image: np.ndarray, image_size: int, crop_size: int) -> np.ndarray:
    """Per-class probabilities of one ``(H, W)`` image in [0, 1]: area resize to ``image_size``, then the mean over
    the ten ``crop_size`` crops of a model that returns probabilities (the bundle's inference, sigmoid inside)."""
    resized = Resize((image_size, image_size), mode="area")(torch.as_tensor(image, dtype=torch.float32)[None])
    crops = ten_crop(convert_to_tensor(resized, track_meta=False)[None], crop_size)  # (10, 1, 1, crop, crop)
    with torch.inference_mode():
        probs = model(crops.reshape(-1, *crops.shape[2:]))
    return probs.reshape(crops.shape[0], -1).mean(dim=0).numpy()


def findings_text(result: dict) -> str:
    """The SR's narrative: findings above threshold, every probability, the model, research-use notice."""
    model = result["model"]
    found = [f"{name} ({result['probabilities'][name]:.3f} >= {result['thresholds'][name]:.3f})"
             for name in result["findings"]]
    probs = ", ".join(f"{name} {p:.3f}" for name, p in result["probabilities"].items())
    return (f"Findings: {'; '.join(found) if found else 'none above threshold'}. Probabilities: {probs}. "
            f"Model: {model['name']} {model['version']} ({model.get('stage', '')}). Research use only, "
            "not for clinical decisions.")


class CXRClassifierOperator(Operator):
    """Classify the selected radiograph: writes ``result.json`` into ``output_folder`` and emits the SR text.

    Inputs: ``study_selected_series_list``. Outputs: ``result_text``. The JSON names the image by its Study, Series
    and SOP Instance UIDs only: no patient name, ID or demographics.
    """

    def __init__(
        self, fragment: Fragment, *args: Any, model: torch.nn.Module, meta: dict, output_folder: Path,
        input_folder: Path, **kwargs: Any,
    ) -> None:
        self.model, self.meta = model, meta
        self.output_folder, self.input_folder = Path(output_folder), Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("result_text")

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive("study_selected_series_list")
        if not selected:
            raise DeployInputError(
                f"{self.input_folder}: no CR or DX series of the chest (Modality CR/DX, BodyPartExamined CHEST or "
                "absent); give the folder of a chest radiograph study.")
        series = selected[0].selected_series[0].series
        instances = series.get_sop_instances()
        if len(instances) != 1:
            raise DeployInputError(
                f"{self.input_folder}: the selected {series.Modality} series has {len(instances)} images; the app "
                "classifies one 2-D radiograph per study, give a folder with a single image series.")
        ds = instances[0].get_native_sop_instance()
        image = dicom_to_image(ds, getattr(ds, "filename", None) or self.input_folder)
        info = self.meta["cxr_ssl"]
        probs = predict(self.model, image, info["image_size"], info["crop_size"])
        probabilities = {name: float(p) for name, p in zip(info["classes"], probs, strict=True)}
        result = {
            "probabilities": probabilities,
            "thresholds": info["thresholds"],
            "findings": [name for name, p in probabilities.items() if p >= info["thresholds"][name]],
            "model": {"name": self.meta.get("name", ""), "version": self.meta.get("version", ""),
                      **{k: info[k] for k in ("stage", "method", "source_run_id") if k in info}},
            "image": {"StudyInstanceUID": str(ds.StudyInstanceUID), "SeriesInstanceUID": str(ds.SeriesInstanceUID),
                      "SOPInstanceUID": str(ds.SOPInstanceUID), "Modality": str(ds.get("Modality", "")),
                      "BodyPartExamined": str(ds.get("BodyPartExamined", ""))},
            "app": {"name": "monai-cxr-ssl", "version": __version__},
        }
        with open(self.output_folder / "result.json", "w") as f:
            json.dump(result, f, indent=2)
        logger.info("findings: %s", ", ".join(result["findings"]) or "none above threshold")
        op_output.emit(findings_text(result), "result_text")
