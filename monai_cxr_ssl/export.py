"""Export a trained model to TorchScript with the bundle's metadata embedded, ready for MONAI Deploy.

The exported network ends with its probability layer (``CXRDenseNet121(probabilities=...)``: a sigmoid per class,
or a softmax ...: the stage's ``probabilities`` setting; no extra parameters), so the file returns what its
metadata promises: per-class probabilities of a ``(B, 1, crop, crop)`` image in [0, 1]; its
``pooled_features`` method gives the 1024-d features behind them. The bundle's ``metadata.json`` is specialised for
the model (class names, crop size) and gets a ``cxr_ssl`` block with what a runtime needs beyond the network: the
resize before the ten crops, the class names, the decision thresholds, the out-of-distribution threshold
(``monai_cxr_ssl.deploy.ood``; its statistics are the extra file ``ood_stats.npz``) and where the model came from
(stage, method, MLflow run).

Trust: a run folder is data, not code. Export never evaluates the recorded ``config_executed.json``: it reads the
plain values it needs (``num_classes``, ``image_size``, ``crop_size``, following ``@`` references and refusing ``$``
expressions), takes the classes from the experiment's ``split.json`` and builds the network from the installed
bundle's own ``inference.json``, which is also the config embedded in the TorchScript file. Checkpoints are loaded
with ``weights_only=True`` only.

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
import torch
from monai.bundle import ckpt_export, verify_net_in_out

from monai_cxr_ssl.checkpoints import read_state_dict
from monai_cxr_ssl.data.readers import ImageReadError
from monai_cxr_ssl.data.splits import load_split, subsample
from monai_cxr_ssl.evaluation import youden_threshold
from monai_cxr_ssl.networks.densenet import HEADS
from monai_cxr_ssl.probabilities import KINDS as PROBABILITY_KINDS
from monai_cxr_ssl.probabilities import num_logits
from monai_cxr_ssl.utils import file_in_the_way, read_json
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, make_workflow

__all__ = ["final_stage_dir", "stage_config", "config_value", "checkpoint_classes",
           "checkpoint_thresholds", "model_metadata", "export_model"]

NET_ID = "network_def"
EXPORT_OVERRIDES = {f"{NET_ID}#probabilities": "@probabilities", f"{NET_ID}#pretrained_weights": None}
VALIDATION_PREDICTIONS = "validation_predictions.npz"
EMBEDDED_CONFIG = "inference.json"  # the bundle config a runtime needs, with this model's values
OOD_MAX_IMAGES = 100  # per split part: each image is one forward pass; keeps export to minutes on a CPU
_PLAIN = (bool, int, float, str, type(None))


def final_stage_dir(path: str | os.PathLike) -> tuple[Path, dict]:
    """The stage folder to export for ``path`` and what is known of its run.

    ``path`` is a stage folder (``models/model.pt``), a pipeline output folder (``results.json``), whose final
    trained stage (the last step of its run with a model: the fine-tuned student of the last round, the mean
    teacher, ...; never the pre-training stage its ``pretrain`` names, whose model is an encoder for the teacher) is
    chosen, or an experiment folder without ``results.json`` (``split.json`` and stage folders), whose single
    trained stage is chosen.
    """
    path = Path(path)
    if (path / "results.json").is_file():
        results = read_json(path / "results.json", "pipeline results", "re-run the pipeline")
        trained = [name for name in results["runs"] if (path / name / "models" / "model.pt").is_file()
                   and name != results.get("pretrain")]
        if not trained:
            raise FileNotFoundError(f"{path}: no stage of this pipeline has a models/model.pt; re-run the pipeline.")
        stage = trained[-1]
        return path / stage, {"stage": stage, "method": results["method"], "source_run_id": results["runs"][stage]}
    if (path / "models" / "model.pt").is_file():
        return path, {"stage": path.name}
    stages = sorted(p.name for p in path.iterdir() if (p / "models" / "model.pt").is_file()) if path.is_dir() else []
    if len(stages) == 1:
        return path / stages[0], {"stage": stages[0]}
    if stages:
        raise ValueError(
            f"{path} has {len(stages)} trained stages ({', '.join(stages)}) but no results.json to say which is "
            f"final; pass one of them, e.g. {path / stages[-1]}.")
    raise FileNotFoundError(
        f"{path} is neither a pipeline output folder (results.json) nor a trained stage folder "
        "(models/model.pt) nor an experiment folder with one; pass the folder a pipeline or a training run wrote, "
        "after it finished."
    )


def stage_config(
    stage_dir: Path,
    configs: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    bundle: str | os.PathLike = DEFAULT_BUNDLE,
) -> dict[str, Any]:
    """The merged config a stage was trained with, unevaluated: its recorded ``config_executed.json`` (written by
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
    config = read_json(recorded, "executed config", "re-run the stage")
    if not isinstance(config, dict):
        raise ValueError(f"{recorded} is not a bundle config (a JSON object); re-run the stage.")
    return config


def _lookup(config: dict, key: str) -> Any:
    value: Any = config
    for part in key.split("#"):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(key)
    return value


def _is_plain(value: Any) -> bool:
    if isinstance(value, str):
        return not value.startswith(("$", "@", "%"))
    if isinstance(value, list):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(v) for v in value.values())
    return isinstance(value, _PLAIN)


def config_value(config: dict, key: str, source: str | os.PathLike) -> Any:
    """The plain JSON value of ``key`` (``#``-separated) in ``config``, following ``@`` references only.

    A recorded config is data: an expression (``$...``), a macro (``%...``) or a reference cycle is refused, never
    evaluated.

    Raises:
        ValueError: ``key`` is missing, an expression, or not a plain JSON value; the message names ``source``.
    """
    seen = [key]
    try:
        value = _lookup(config, key)
        while isinstance(value, str) and value.startswith("@"):
            ref = value[1:]
            if ref in seen:
                raise ValueError(f"{source}: {key} is a reference cycle ({' -> '.join([*seen, ref])}).")
            seen.append(ref)
            value = _lookup(config, ref)
    except KeyError as err:
        raise ValueError(f"{source}: no value for {' -> '.join(seen)} (missing {err.args[0]!r}); re-run the stage "
                         "or pass --configs/--set.") from None
    if not _is_plain(value):
        raise ValueError(
            f"{source}: {' -> '.join(seen)} is {json.dumps(value)[:80]}, not a plain value; export reads values and "
            "never evaluates a recorded config. Give it as a number (re-run with --set), or pass --configs/--set.")
    return value


def _int_value(config: dict, key: str, source: str | os.PathLike) -> int:
    value = config_value(config, key, source)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{source}: {key} is {value!r}, expected a positive integer.")
    return value


def _stage_of(ckpt_path: str | os.PathLike) -> Path | None:
    """The stage folder of a ``<stage>/models/<file>.pt`` checkpoint, else None."""
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "models" else None


def checkpoint_classes(ckpt_path: str | os.PathLike, num_classes: int) -> list[str]:
    """Class names for the outputs of the checkpoint: its experiment's ``split.json`` when it names
    ``num_classes`` classes, else ``class_0``, ``class_1``, ..."""
    stage = _stage_of(ckpt_path)
    split_file = stage.parent / "split.json" if stage else None
    if split_file is not None and split_file.is_file():
        classes = load_split(split_file)["classes"]
        if len(classes) == num_classes:
            return list(classes)
    return [f"class_{k}" for k in range(num_classes)]


def checkpoint_thresholds(ckpt_path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, float] | None:
    """Youden thresholds of the checkpoint's stage when it has validation predictions
    (``validation_predictions.npz``), else None (unknown)."""
    stage = _stage_of(ckpt_path)
    if stage is None or not (stage / VALIDATION_PREDICTIONS).is_file():
        return None
    return _thresholds(stage, list(class_names), "youden")[0]


def _network(num_classes: int, state: dict[str, torch.Tensor], ckpt: Path, probabilities: str = "sigmoid",
             head: dict | None = None, network: dict | None = None) -> torch.nn.Module:
    """The bundle's network with the checkpoint's weights, in eval mode, ending with its probability layer;
    ``head``: the model metadata's (``{"kind": "linear"}`` or ``{"kind": "mlp", "hidden": n}``); ``network``: its
    ``{"kind": "densenet121"}`` (default) or ``{"kind": "dcgan", "base_channels": n}`` (a GAN's discriminator)."""
    from monai_cxr_ssl.networks import CXRDenseNet121

    head = head or {"kind": "linear"}
    outputs = num_logits(num_classes, probabilities)
    if network and network["kind"] == "dcgan":
        from monai_cxr_ssl.networks.gan import DCGANDiscriminator

        net = DCGANDiscriminator(outputs, base_channels=network["base_channels"], probabilities=probabilities)
    else:
        net = CXRDenseNet121(num_classes=outputs, probabilities=probabilities, head=head["kind"],
                             **({"head_hidden": head["hidden"]} if "hidden" in head else {}))
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(
            f"{ckpt}: does not fit {type(net).__name__}(num_classes={num_classes}) ({first[:200]}); expected the "
            "checkpoint of the stage whose config and split.json are exported.") from None
    return net.eval()


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


def _features(net: torch.nn.Module, items: list[dict], part: str, split_file: Path, image_size: int,
              crop_size: int) -> np.ndarray:
    from monai_cxr_ssl.deploy.ood import image_features

    try:
        return image_features(net, [it["image"] for it in items], image_size, crop_size)
    except ImageReadError as err:
        raise ValueError(
            f"{split_file}: a {part} image for the out-of-distribution statistics cannot be read ({err}); put the "
            "dataset back where the split found it, or pass --ood-images 0 to export without the check.") from err


def ood_statistics(
    net: torch.nn.Module, stage_dir: Path, image_size: int, crop_size: int, max_images: int = OOD_MAX_IMAGES
) -> tuple[bytes, dict[str, Any]]:
    """The out-of-distribution statistics (``monai_cxr_ssl.deploy.ood``) of ``net`` on up to ``max_images`` of the
    split's labeled (fit) and validation (threshold) images, read as the bundle does: the file and its summary."""
    from monai_cxr_ssl.deploy.ood import OOD_STATS_FILE, QUANTILE, fit_ood

    split_file = stage_dir.parent / "split.json"
    split = load_split(split_file)
    train, validation = (subsample(split[part], max_images) for part in ("labeled", "validation"))
    train_features = _features(net, train, "labeled", split_file, image_size, crop_size)
    stats, distances = fit_ood(train_features, _features(net, validation, "validation", split_file, image_size,
                                                         crop_size))
    summary = {
        "method": "Mahalanobis distance of the pooled features (before the output layer) of the centre crop; "
                  "Ledoit-Wolf covariance",
        "threshold": stats.threshold, "quantile": QUANTILE, "num_train": len(train), "num_validation": len(validation),
        "validation_pass_rate": float(np.mean(distances <= stats.threshold)), "stats_file": OOD_STATS_FILE,
    }
    return stats.to_bytes(), summary


def model_metadata(
    stage_dir: str | os.PathLike,
    config: dict[str, Any],
    info: dict | None = None,
    threshold: float | str | None = None,
    source: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The bundle's metadata specialised for the model of ``stage_dir`` trained with ``config`` (see the module
    docstring): plain values of the config, classes of the experiment's ``split.json``."""
    stage_dir = Path(stage_dir)
    source = source or stage_dir / "config_executed.json"
    split_file = stage_dir.parent / "split.json"
    if not split_file.is_file():
        raise FileNotFoundError(
            f"{split_file} does not exist: export needs the experiment's split (its classes, and its images for the "
            f"out-of-distribution check) beside the stage folder {stage_dir.name}; pass a stage folder inside the "
            "output folder its training wrote.")
    classes = load_split(split_file)["classes"]
    image_size, crop_size = _int_value(config, "image_size", source), _int_value(config, "crop_size", source)
    recorded = config.get("num_classes")
    if not (isinstance(recorded, str) and recorded.startswith("$")):  # an expression derives it from the split
        num_classes = _int_value(config, "num_classes", source)
        if num_classes != len(classes):
            raise ValueError(f"{stage_dir}: num_classes {num_classes} but {split_file} names {len(classes)}.")
    thresholds, threshold_source = _thresholds(stage_dir, classes, threshold)
    kind = config_value(config, "probabilities", source) if "probabilities" in config else "sigmoid"
    if kind not in PROBABILITY_KINDS:
        raise ValueError(f"{source}: probabilities is {kind!r}, expected one of {', '.join(PROBABILITY_KINDS)}.")
    head = {"kind": config_value(config, "head", source) if "head" in config else "linear"}
    if head["kind"] not in HEADS:
        raise ValueError(f"{source}: head is {head['kind']!r}, expected one of {', '.join(HEADS)}.")
    if head["kind"] == "mlp":
        head["hidden"] = _int_value(config, "head_hidden", source)
    network = {"kind": config_value(config, "discriminator", source) if "discriminator" in config else "densenet121"}
    if network["kind"] not in ("densenet121", "dcgan"):
        raise ValueError(f"{source}: discriminator is {network['kind']!r}, expected dcgan or densenet121.")
    if network["kind"] == "dcgan":
        network["base_channels"] = _int_value(config, "gan_base_channels", source)

    meta = read_json(DEFAULT_BUNDLE / "configs" / "metadata.json", "bundle metadata", "reinstall monai-cxr-ssl")
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    image["spatial_shape"] = [crop_size, crop_size]
    pred.update(num_channels=len(classes), spatial_shape=[len(classes)],
                channel_def={str(k): name for k, name in enumerate(classes)})
    meta["label_classes"] = f"{PROBABILITY_KINDS[kind]}: " + ", ".join(classes)
    meta["cxr_ssl"] = {
        "classes": classes,
        "image_size": image_size,
        "crop_size": crop_size,
        "test_time_augmentation": "ten_crop",
        "thresholds": thresholds,
        "thresholds_source": threshold_source,
        "probabilities": kind,
        "head": head,
        "network": network,
        **(info or {}),
    }
    return meta


def output_file(output: str | os.PathLike) -> Path:
    """Where ``export -o output`` writes: ``output``, or ``output/model.ts`` when it is an existing folder; a
    blank name or one under a file is an error, raised before any work."""
    if not str(output).strip():
        raise ValueError("export -o: the output file name is empty; pass -o <file>.ts (default model.ts).")
    output = Path(output)
    if output.is_dir():
        return output / "model.ts"
    blocking = file_in_the_way(output)
    if blocking is not None:
        raise ValueError(f"export -o {output}: {blocking} is a file, not a folder; pass -o <folder>/<file>.ts.")
    return output


def export_model(
    path: str | os.PathLike,
    output: str | os.PathLike,
    threshold: float | str | None = None,
    configs: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    bundle: str | os.PathLike = DEFAULT_BUNDLE,
    ood_images: int = OOD_MAX_IMAGES,
) -> dict[str, Any]:
    """Export the model of ``path`` (stage, pipeline or experiment folder) to the TorchScript file ``output``.

    Checks the checkpoint (``checkpoints.read_state_dict``), fits the out-of-distribution statistics on up to
    ``ood_images`` images per split part (0: none, the deploy app then skips the check), then runs MONAI's
    ``verify_net_in_out`` and ``ckpt_export`` on the bundle's ``inference.json`` with the model's plain values;
    ``output`` (a file, or an existing folder to write ``model.ts`` in: ``output_file``) appears only when all
    succeeded. Returns the embedded metadata.
    """
    from monai_cxr_ssl.deploy.ood import OOD_STATS_FILE

    if ood_images < 0:
        raise ValueError(f"ood_images must be >= 0 (0: no out-of-distribution check), got {ood_images}.")
    output = output_file(output)
    stage_dir, info = final_stage_dir(path)
    source = "the --configs/--set given" if configs else stage_dir / "config_executed.json"
    config = stage_config(stage_dir, configs, overrides, bundle)
    meta = model_metadata(stage_dir, config, info, threshold, source)
    ckpt = stage_dir / "models" / "model.pt"
    info = meta["cxr_ssl"]
    net = _network(len(info["classes"]), read_state_dict(ckpt), ckpt, info["probabilities"], info["head"],
                   info["network"])
    stats = None
    if ood_images:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        stats, info["ood"] = ood_statistics(net.to(device), stage_dir, info["image_size"], info["crop_size"],
                                            ood_images)
        net.cpu()
    inference = read_json(Path(bundle) / "configs" / EMBEDDED_CONFIG, "bundle inference config",
                          "reinstall monai-cxr-ssl")
    inference.update(num_classes=len(info["classes"]), image_size=info["image_size"], crop_size=info["crop_size"],
                     class_names=info["classes"], probabilities=info["probabilities"], head=info["head"]["kind"],
                     head_hidden=info["head"].get("hidden", inference["head_hidden"]))
    if info["network"]["kind"] == "dcgan":  # the GAN's discriminator (``networks.gan.gan_discriminator``)
        inference["network_def"].update({"_target_": "monai_cxr_ssl.networks.gan.gan_discriminator", "kind": "dcgan",
                                         "base_channels": info["network"]["base_channels"]})
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        meta_file, config_file = os.path.join(tmp, "metadata.json"), os.path.join(tmp, EMBEDDED_CONFIG)
        for file, content in ((meta_file, meta), (config_file, inference)):
            with open(file, "w") as f:
                json.dump(content, f, indent=2)
        weights = os.path.join(tmp, "model.pt")  # the checked tensors, so that ckpt_export loads nothing else
        torch.save(net.state_dict(), weights)
        verify_net_in_out(net_id=NET_ID, meta_file=meta_file, config_file=config_file, **EXPORT_OVERRIDES)
        staged = os.path.join(tmp, "model.ts")
        ckpt_export(net_id=NET_ID, filepath=staged, ckpt_file=weights, meta_file=meta_file, config_file=config_file,
                    **EXPORT_OVERRIDES)
        if stats is not None:  # ckpt_export embeds JSON files only: add the statistics
            extra = {"metadata.json": "", EMBEDDED_CONFIG: ""}
            scripted = torch.jit.load(staged, _extra_files=extra)
            torch.jit.save(scripted, staged, _extra_files={**extra, OOD_STATS_FILE: stats})
        os.replace(staged, output)
    return meta
