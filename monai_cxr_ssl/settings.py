"""Checks of a stage's settings before any work starts: unknown override keys, numbers out of range, sizes that
DenseNet121 cannot take, an output folder that is a file.

``check_settings`` reads the parsed value of every id in ``RULES`` that a config has, so one call covers a stage
(``monai-cxr-ssl run``) or every stage of a pipeline at its start; ``check_values`` is the same check on a dict, for
the ``initialize`` section of plain ``python -m monai.bundle run``. MONAI merges unknown override keys silently, so
``check_override_keys`` compares the keys a user gave with the ids of the merged config.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from monai_cxr_ssl.methods import epoch_settings

__all__ = ["MIN_CROP_SIZE", "RULES", "check_override_keys", "check_settings", "check_values", "config_ids",
           "stage_epochs"]

# DenseNet121 down-samples by 32: a smaller crop has no pixels left before its last block.
MIN_CROP_SIZE = 32


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rule(test: Callable[[Any], bool], expected: str, nullable: bool = False) -> tuple[Callable[[Any], bool], str]:
    if nullable:
        return (lambda v: v is None or test(v)), f"{expected}, or null"
    return test, expected


def _interval(low: float, high: float, closed_low: bool, closed_high: bool, nullable: bool = False):
    text = f"a number in {'[' if closed_low else '('}{low:g}, {high:g}{']' if closed_high else ')'}"
    return _rule(
        lambda v: _number(v) and (v >= low if closed_low else v > low) and (v <= high if closed_high else v < high),
        text, nullable,
    )


def _whole(minimum: int, nullable: bool = False):
    return _rule(lambda v: _integer(v) and v >= minimum, f"a whole number >= {minimum}", nullable)


def _choice(*options: Any):
    return _rule(lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


_BOOL = _rule(lambda v: isinstance(v, bool), "true or false")
_PROBABILITY = _interval(0, 1, True, True)
_POSITIVE = _rule(lambda v: _number(v) and v > 0, "a number > 0")
_NON_NEGATIVE = _rule(lambda v: _number(v) and v >= 0, "a number >= 0")

# id -> (test, what is expected); ids a config lacks are not checked.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "labeled_fraction": _interval(0, 1, False, True),
    "val_fraction": _interval(0, 1, False, False),
    "labeled_prevalence": _interval(0, 1, False, False, nullable=True),
    "seed": _whole(0),
    "image_size": _whole(MIN_CROP_SIZE),
    "crop_size": _whole(MIN_CROP_SIZE),
    "batch_size": _whole(1),
    "num_epochs": _whole(1),
    "student_epochs": _whole(1),
    "finetune_epochs": _whole(1),
    "mean_teacher_epochs": _whole(1),
    "val_interval": _whole(1),
    "num_workers": _whole(0),
    "learning_rate": _POSITIVE,
    "lr_decay": _interval(0, 1, False, True),
    "cache_rate": _PROBABILITY,
    "flip_prob": _PROBABILITY,
    "affine_prob": _PROBABILITY,
    "perspective_prob": _PROBABILITY,
    "perspective_distortion": _PROBABILITY,
    "rotation_degrees": _interval(0, 180, True, True),
    "translate_fraction": _interval(0, 1, True, False),
    "scale_delta": _interval(0, 1, True, False),
    "resume": _BOOL,
    "bad_images": _choice("fail", "skip"),
    "allow_patient_overlap": _BOOL,
    "unlabeled_source": _rule(lambda v: isinstance(v, (str, os.PathLike)) and str(v).strip() != "",
                              "a folder or .csv file of unlabeled images", nullable=True),
    "unlabeled_source_column": _rule(lambda v: isinstance(v, str) and v.strip() != "", "a CSV column name"),
    "eval_split": _choice("labeled", "unlabeled", "validation", "test"),
    "max_unlabeled": _whole(1, nullable=True),
    "keep_fraction": _interval(0, 1, False, True),
    "soft_labels": _BOOL,
    "filter_threshold": _interval(0, 1, True, True, nullable=True),
    "sharpening": _choice(None, "aals"),
    "aals_t": _interval(0, 1, False, False),
    "aals_a0": _rule(lambda v: _number(v) and v >= 1, "a number >= 1"),
    "aals_per_image": _BOOL,
    "report_true_labels": _BOOL,
    "ema_decay": _interval(0, 1, False, False),
    "consistency_weight": _NON_NEGATIVE,
    "rampup_epochs": _whole(0),
    "separate_views": _BOOL,
    "rounds": _whole(1),
}


def check_values(values: Mapping[str, Any], where: str = "") -> None:
    """Raise a ``ValueError`` naming the first setting in ``values`` that breaks its rule in ``RULES``, the
    crop larger than the image, or an ``output_dir`` that is not a folder."""
    suffix = f" ({where})" if where else ""
    for key, value in values.items():
        if key in RULES:
            test, expected = RULES[key]
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
    if output_dir is not None and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"setting output_dir={str(output_dir)!r}{suffix} is a file, not a folder; choose a folder.")


def check_settings(parser: Any, where: str = "", config: dict | None = None) -> None:
    """``check_values`` over the ids of ``RULES`` (and ``output_dir``) that the config of ``parser`` has (or, given,
    that ``config`` has: the stage's own config, so a setting meant for another stage is checked there)."""
    ids = [key for key in (*RULES, "output_dir") if key in parser and (config is None or key in config)]
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
    return {**dict.fromkeys(epoch_settings(), overrides["num_epochs"]), **overrides}
