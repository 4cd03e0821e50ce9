"""Export a trained model to TorchScript with the bundle's metadata embedded, ready for MONAI Deploy.

The exported network ends with a sigmoid (``CXRDenseNet121(probabilities=True)``, no extra parameters), so the file
returns what its metadata promises: per-class probabilities of a ``(B, 1, crop, crop)`` image in [0, 1]. The
bundle's ``metadata.json`` is specialised for the model (class names, crop size) and gets a ``cxr_ssl`` block with
what a runtime needs beyond the network: the resize before the ten crops, the class names, the decision thresholds
and where the model came from (stage, method, MLflow run).

Thresholds: a number for every class, or ``"youden"`` — per class, the threshold that maximises Youden's J on the
stage's validation predictions (``validation_predictions.npz``, written by an evaluation with
``eval_split=validation``). By default Youden is used when those predictions exist, else 0.5.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.bundle import ConfigParser, ckpt_export, verify_net_in_out

from monai_cxr_ssl.evaluation import youden_threshold
from monai_cxr_ssl.utils import read_json
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, make_workflow

__all__ = ["final_stage_dir", "stage_config", "model_metadata", "export_model"]

NET_ID = "network_def"
EXPORT_OVERRIDES = {f"{NET_ID}#probabilities": True, f"{NET_ID}#pretrained_weights": None}
VALIDATION_PREDICTIONS = "validation_predictions.npz"


def final_stage_dir(path: str | os.PathLike) -> tuple[Path, dict]:
    """The stage folder to export for ``path`` and what is known of its run.

    ``path`` is a stage folder (``models/model.pt``) or a pipeline output folder (``results.json``), whose final
    trained stage (the last one with a model: the fine-tuned student of the last round, the mean teacher, ...) is
    chosen.
    """
    path = Path(path)
    if (path / "results.json").is_file():
        results = read_json(path / "results.json", "pipeline results", "re-run the pipeline")
        trained = [name for name in results["runs"] if (path / name / "models" / "model.pt").is_file()]
        if not trained:
            raise FileNotFoundError(f"{path}: no stage of this pipeline has a models/model.pt; re-run the pipeline.")
        stage = trained[-1]
        return path / stage, {"stage": stage, "method": results["method"], "source_run_id": results["runs"][stage]}
    if not (path / "models" / "model.pt").is_file():
        raise FileNotFoundError(
            f"{path} is neither a pipeline output folder (results.json) nor a trained stage folder "
            "(models/model.pt); pass the folder a pipeline or a training run wrote, after it finished."
        )
    return path, {"stage": path.name}


def stage_config(
    stage_dir: Path,
    configs: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    bundle: str | os.PathLike = DEFAULT_BUNDLE,
) -> dict[str, Any]:
    """The merged config a stage was trained with: its recorded ``config_executed.json`` (written by
    ``monai-cxr-ssl run`` and the pipeline) or, for a plain ``python -m monai.bundle run``, the ``configs`` and
    ``overrides`` it was run with."""
    if configs:
        return make_workflow(configs, bundle, **(overrides or {})).parser.get()
    recorded = stage_dir / "config_executed.json"
    if not recorded.is_file():
        raise FileNotFoundError(
            f"{recorded} does not exist (monai-cxr-ssl run and the pipeline record it; python -m monai.bundle run "
            "does not): pass the configs and overrides the stage was trained with, e.g. "
            "--configs train kermany --set dataset_dir=... image_size=64 crop_size=56."
        )
    return read_json(recorded, "executed config", "re-run the stage")


def _thresholds(stage_dir: Path, classes: list[str], threshold: float | str | None) -> tuple[dict[str, float], str]:
    """Per-class thresholds and a note on where they come from."""
    predictions = stage_dir / VALIDATION_PREDICTIONS
    if threshold is None:
        threshold = "youden" if predictions.is_file() else 0.5
    if threshold == "youden":
        if not predictions.is_file():
            raise FileNotFoundError(
                f"{predictions} does not exist: Youden thresholds need the stage's validation predictions. Evaluate "
                "it first (`monai-cxr-ssl run evaluate ... --set stage=<stage> eval_split=validation`) or pass "
                "--threshold <number>."
            )
        data = np.load(predictions)
        labels, probs = data["labels"].reshape(len(data["labels"]), -1), data["probs"].reshape(len(data["probs"]), -1)
        if probs.shape[1] != len(classes):
            raise ValueError(f"{predictions} has {probs.shape[1]} class(es), the model {len(classes)}; re-evaluate.")
        return {name: youden_threshold(labels[:, k], probs[:, k]) for k, name in enumerate(classes)}, (
            "youden on validation predictions")
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] or 'youden', got {threshold!r}.")
    return dict.fromkeys(classes, value), "fixed"


def model_metadata(
    stage_dir: str | os.PathLike, config: dict[str, Any], info: dict | None = None, threshold: float | str | None = None
) -> dict[str, Any]:
    """The bundle's metadata specialised for the model of ``stage_dir`` trained with ``config`` (see the module
    docstring)."""
    stage_dir = Path(stage_dir)
    parser = ConfigParser(config)
    split_file = parser.get_parsed_content("split_file")
    classes = read_json(split_file, "split file", "re-run the stage")["classes"]
    image_size, crop_size = int(parser.get_parsed_content("image_size")), int(parser.get_parsed_content("crop_size"))
    derived = isinstance(parser["num_classes"], str) and parser["num_classes"].startswith("$")  # from the split
    if not derived and int(parser.get_parsed_content("num_classes")) != len(classes):
        raise ValueError(f"{stage_dir}: num_classes {parser['num_classes']} but {split_file} names {len(classes)}.")
    thresholds, source = _thresholds(stage_dir, classes, threshold)

    meta = read_json(DEFAULT_BUNDLE / "configs" / "metadata.json", "bundle metadata", "reinstall monai-cxr-ssl")
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    image["spatial_shape"] = [crop_size, crop_size]
    pred.update(num_channels=len(classes), spatial_shape=[len(classes)],
                channel_def={str(k): name for k, name in enumerate(classes)})
    meta["label_classes"] = "one sigmoid probability per class: " + ", ".join(classes)
    meta["cxr_ssl"] = {
        "classes": classes,
        "image_size": image_size,
        "crop_size": crop_size,
        "test_time_augmentation": "ten_crop",
        "thresholds": thresholds,
        "thresholds_source": source,
        **(info or {}),
    }
    return meta


def export_model(
    path: str | os.PathLike,
    output: str | os.PathLike,
    threshold: float | str | None = None,
    configs: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    bundle: str | os.PathLike = DEFAULT_BUNDLE,
) -> dict[str, Any]:
    """Export the model of ``path`` (stage or pipeline folder) to the TorchScript file ``output``.

    Runs MONAI's ``ckpt_export`` on the stage's config (see ``stage_config``) and best checkpoint with the
    specialised metadata, then ``verify_net_in_out`` against that metadata; ``output`` appears only when both
    succeeded. Returns the embedded metadata.
    """
    stage_dir, info = final_stage_dir(path)
    config = stage_config(stage_dir, configs, overrides, bundle)
    meta = model_metadata(stage_dir, config, info, threshold)
    # the network's outputs are the split's classes: fix them so that exporting does not load the dataset again
    config = {**config, "num_classes": len(meta["cxr_ssl"]["classes"]),
              NET_ID: {**config[NET_ID], "num_classes": "@num_classes"}}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        meta_file, config_file = os.path.join(tmp, "metadata.json"), os.path.join(tmp, "config_executed.json")
        for file, content in ((meta_file, meta), (config_file, config)):
            with open(file, "w") as f:
                json.dump(content, f, indent=2)
        verify_net_in_out(net_id=NET_ID, meta_file=meta_file, config_file=config_file, **EXPORT_OVERRIDES)
        staged = os.path.join(tmp, "model.ts")
        ckpt_export(net_id=NET_ID, filepath=staged, ckpt_file=str(stage_dir / "models" / "model.pt"),
                    meta_file=meta_file, config_file=config_file, **EXPORT_OVERRIDES)
        os.replace(staged, output)
    return meta
