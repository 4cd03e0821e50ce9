"""Checks of a stage's settings before any work starts: unknown override keys, numbers out of range, sizes that
DenseNet121 cannot take, an output folder that is a file.

``check_settings`` reads the parsed value of every id with a rule (``all_rules``: the shared ``RULES`` and the
registered stage kinds' own, ``StageKind.rules``) that a config has, so one call covers a stage
(``monai-cxr-ssl run``) or every stage of a pipeline at its start; ``check_values`` is the same check on a dict, for
the ``initialize`` section of plain ``python -m monai.bundle run``. MONAI merges unknown override keys silently, so
``check_override_keys`` compares the keys a user gave with the ids of the merged config.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from monai_cxr_ssl import methods
from monai_cxr_ssl.probabilities import KINDS as PROBABILITY_KINDS
from monai_cxr_ssl.rules import BOOL, POSITIVE, PROBABILITY, Rule, at_least, choice, interval, rule, whole
from monai_cxr_ssl.utils import file_in_the_way

__all__ = ["MIN_CROP_SIZE", "PATH_SETTINGS", "RULES", "TRACKING_SCHEMES", "all_rules", "check_override_keys",
           "check_settings", "check_tracking_uri", "check_values", "config_ids", "stage_epochs"]

# DenseNet121 down-samples by 32: a smaller crop has no pixels left before its last block.
MIN_CROP_SIZE = 32


# The URI schemes MLflow has a tracking store for (its own list, in the error an unknown scheme gets); plugins add
# theirs under the "mlflow.tracking_store" entry points. Checked without MLflow: a client connects to the store.
TRACKING_SCHEMES = {"", "file", "databricks", "databricks-uc", "uc", "http", "https", "postgresql", "mysql", "sqlite",
                    "mssql"}

# Settings that name a file or folder: an empty or blank one would silently mean the current folder or the root.
PATH_SETTINGS = ("output_dir", "stage_dir", "ckpt_dir", "split_file", "dataset_dir", "bundle_root", "ckpt_path",
                 "init_ckpt", "filtered_file", "pseudo_label_file", "mlflow_run_record")
PATH = rule(lambda v: isinstance(v, (str, os.PathLike)) and str(v).strip() != "", "a path that is not empty or blank")

# The settings every stage shares: id -> (test, what is expected); ids a config lacks are not checked. A method's own
# settings are declared with its stage kinds (``StageKind.rules``, ``methods.setting_rules``).
RULES: dict[str, Rule] = {
    "labeled_fraction": interval(0, 1, False, True),
    "val_fraction": interval(0, 1, False, False),
    "labeled_prevalence": interval(0, 1, False, False, nullable=True),
    "labeled_per_class": whole(1, nullable=True),
    "seed": whole(0),
    "image_size": whole(MIN_CROP_SIZE),
    "crop_size": whole(MIN_CROP_SIZE),
    "batch_size": whole(1),
    "num_epochs": whole(1),
    "val_interval": whole(1),
    "num_workers": whole(0),
    "learning_rate": POSITIVE,
    "lr_decay": interval(0, 1, False, True),
    "cache_rate": PROBABILITY,
    "flip_prob": PROBABILITY,
    "affine_prob": PROBABILITY,
    "perspective_prob": PROBABILITY,
    "perspective_distortion": PROBABILITY,
    "rotation_degrees": interval(0, 180, True, True),
    "translate_fraction": interval(0, 1, True, False),
    "scale_delta": interval(0, 1, True, False),
    "resume": BOOL,
    "bad_images": choice("fail", "skip"),
    "allow_patient_overlap": BOOL,
    **dict.fromkeys(PATH_SETTINGS, PATH),
    "encoder_init": rule(PATH[0], PATH[1], nullable=True),
    "unlabeled_source": rule(PATH[0], "a folder or .csv file of unlabeled images", nullable=True),
    "unlabeled_source_column": rule(lambda v: isinstance(v, str) and v.strip() != "", "a CSV column name"),
    "eval_split": choice("labeled", "unlabeled", "validation", "test"),
    "max_unlabeled": whole(1, nullable=True),
    "use_labeled_images": BOOL,  # a stage without labels (label_free.json) learns from the labeled images too
    "probabilities": choice(*PROBABILITY_KINDS),
    "linear_probe": BOOL,  # the teacher trains only a new head on its frozen (pre-trained) encoder
    "head": choice("linear", "mlp"),  # networks.densenet.HEADS, not imported: torch stays off the CLI's start path
    "head_hidden": whole(1),
    "head_dropout": interval(0, 1, True, False),
    # AALS (``monai_cxr_ssl.sharpening``): the mean teacher's targets and the pseudo-labels' optional sharpening
    "aals_t": interval(0, 1, False, False),
    "aals_a0": at_least(1),
}


def all_rules() -> dict[str, Rule]:
    """The shared rules and those of every registered stage kind."""
    return {**RULES, **methods.setting_rules()}


def check_values(values: Mapping[str, Any], where: str = "") -> None:
    """Raise a ``ValueError`` naming the first setting in ``values`` that breaks its rule (``all_rules``), the
    crop larger than the image, or an ``output_dir`` that is not a folder."""
    suffix = f" ({where})" if where else ""
    rules = all_rules()
    for key, value in values.items():
        if key in rules:
            test, expected = rules[key]
            if not test(value):
                raise ValueError(f"setting {key}={value!r}{suffix} must be {expected}.")
    image, crop = values.get("image_size"), values.get("crop_size")
    if image is not None and crop is not None and crop > image:
        raise ValueError(
            f"setting crop_size={crop} is larger than image_size={image}{suffix}: the crops are cut from the resized "
            "image; set crop_size <= image_size (the paper: 224 of 256)."
        )
    if values.get("training") and values.get("batch_size") == 1:
        raise ValueError(f"setting batch_size=1{suffix}: training needs at least 2 images per batch (batch norm).")
    output_dir = values.get("output_dir")
    if output_dir is not None:
        _check_folder(Path(output_dir), suffix)
    if "tracking_uri" in values:
        check_tracking_uri(values["tracking_uri"], f"setting tracking_uri{suffix}")


def _check_folder(output_dir: Path, suffix: str) -> None:
    """An output folder that is a file, or lies under one, cannot be made."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"setting output_dir={str(output_dir)!r}{suffix} is a file, not a folder; choose a folder.")
    blocking = file_in_the_way(output_dir)
    if blocking is not None:
        raise ValueError(f"setting output_dir={str(output_dir)!r}{suffix} lies under {blocking}, which is a file, "
                         "not a folder; choose a folder.")


def check_tracking_uri(tracking_uri: Any, setting: str = "setting tracking_uri") -> None:
    """Raise a ``ValueError`` naming ``setting`` (or ``MLFLOW_TRACKING_URI`` where that wins) when the tracking URI
    cannot name an MLflow store: blank, a scheme MLflow has no store for, or a SQLite database that is a folder.
    Checked before connecting: MLflow retries a SQLite file it cannot open for about two minutes."""
    from importlib.metadata import entry_points
    from urllib.parse import urlparse

    name = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else setting
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (str(tracking_uri) if isinstance(tracking_uri, os.PathLike)
                                                     else tracking_uri)  # MLflow's: the variable wins
    hint = "give a folder, sqlite:///<file>.db or the http(s):// address of an MLflow server"
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"{name}={uri!r} is empty; {hint}.")
    scheme = urlparse(uri).scheme.split("+")[0]
    known = TRACKING_SCHEMES | {e.name for e in entry_points(group="mlflow.tracking_store")}
    if scheme not in known and len(scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"{name}={uri!r}: MLflow has no tracking store for the scheme {scheme!r} (it has "
                         f"{', '.join(sorted(s for s in known if s))}); {hint}.")
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_dir():
        raise ValueError(f"{name}={uri!r}: {uri[len('sqlite:///'):]} is a folder, not a SQLite database file; "
                         "give a file in it, e.g. sqlite:///" + str(Path(uri[len("sqlite:///"):]) / "mlflow.db") + ".")


def check_settings(parser: Any, where: str = "", config: dict | None = None) -> None:
    """``check_values`` over the ids of ``all_rules()`` (and ``tracking_uri``) that the config of ``parser`` has (or,
    given, that ``config`` has: the stage's own config, so a setting meant for another stage is checked there)."""
    # the raw top level, not ``key in parser``: for each id it lacks MONAI ranks every key by edit distance (3.6 s of
    # a tiny pipeline's 25 s under cProfile)
    top = parser.get()
    ids = [key for key in (*all_rules(), "tracking_uri") if key in top and (config is None or key in config)]
    values = {}
    for key in ids:
        try:
            values[key] = parser.get_parsed_content(key)
        except Exception as err:  # an expression that does not evaluate, e.g. a string where a number belongs
            raise ValueError(f"setting {key}={parser[key]!r}{' (' + where + ')' if where else ''} does not "
                             f"evaluate: {err}") from None
    values["training"] = "run" in parser and "train::trainer" in str(parser["run"]).replace("#", "::")
    check_values(values, where)


def config_ids(config: Any, prefix: str = "") -> Iterable[str]:
    """Every id of a raw config (``a``, ``a#b``, ``a#b#0`` ...)."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        id_ = f"{prefix}#{key}" if prefix else str(key)
        yield id_
        yield from config_ids(value, id_)


def _known(key: str, config: dict) -> bool:
    """Whether ``key`` names an id of ``config`` or an argument added to one of its components (``a#b`` with
    ``a`` a dict): a typo in a top-level setting is never known."""
    parts = key.replace("::", "#").split("#")
    node: Any = config
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return i > 0 and i == len(parts) - 1 and isinstance(node, dict)
    return True


def check_override_keys(keys: Iterable[str], configs: Iterable[dict], extra: Iterable[str] = (),
                        where: str = "") -> None:
    """Raise a ``ValueError`` for override ``keys`` that no config in ``configs`` has, listing the closest ids."""
    configs, extra = list(configs), set(extra)
    unknown = [k for k in keys if k not in extra and not any(_known(k, c) for c in configs)]
    if not unknown:
        return
    ids = sorted(extra.union(*(config_ids(c) for c in configs)))
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key.replace("::", "#"), ids, n=3, cutoff=0.6)
        lines.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    plural = "s" if len(unknown) > 1 else ""
    raise ValueError(f"unknown setting{plural} {'; '.join(lines)}{' in ' + where if where else ''}: no stage config "
                     "has it (check the spelling; settings are the ids of the bundle's configs).")


def stage_epochs(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with the general ``num_epochs`` copied to every per-stage epoch setting the user did not give
    (the registered stage kinds', ``methods.epoch_settings``): ``num_epochs=2`` shortens every stage,
    ``student_epochs=3`` still wins for the student."""
    if "num_epochs" not in overrides:
        return dict(overrides)
    return {**dict.fromkeys(methods.epoch_settings(), overrides["num_epochs"]), **overrides}
