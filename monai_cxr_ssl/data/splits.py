"""Labeled / unlabeled / validation / test splits: stratified, patient-grouped, reproducible, and saved to disk.

``prepare_split`` is the entry point bundles call: it loads a source, checks its images once, splits and writes
the result as JSON, and on later runs returns that file after checking the data and settings have not changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from monai_cxr_ssl import distributed
from monai_cxr_ssl.data.unlabeled import ID_PREFIX, drop_duplicates, load_unlabeled_source
from monai_cxr_ssl.utils import read_json, write_json

__all__ = [
    "check_num_classes", "fingerprint", "load_split", "make_split", "prepare_split", "select_classes",
    "split_fingerprint", "subsample", "training_images",
]

logger = logging.getLogger("monai_cxr_ssl")

SPLIT_VERSION = 1
PARTS = ("labeled", "unlabeled", "validation", "test")
_BAD_IMAGE_POLICIES = ("fail", "skip")


def fingerprint(items: Sequence[dict]) -> str:
    """SHA-256 (hex) of the sorted ``(id, label)`` pairs of ``items``.

    Uses ids (paths relative to the dataset root), so moving the dataset folder keeps the fingerprint, while
    adding, removing or relabelling an image changes it.
    """
    pairs = sorted((it["id"], [float(v) for v in it["label"]]) for it in items)
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def split_fingerprint(split: dict) -> str:
    """SHA-256 (hex) of the image ids of each part of ``split``.

    ``fingerprint`` identifies the data; this identifies the split of it: two seeds or labeled fractions give other
    parts and so another value. Files a later stage reads (pseudo-labels, the filtered list, checkpoints) carry it.
    """
    parts = {part: sorted(it["id"] for it in split[part]) for part in PARTS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _groups(items: list[dict]) -> list[list[dict]]:
    """Items grouped by patient (items without a patient id are their own group), in a deterministic order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for it in items:
        key = ("patient", str(it["patient_id"])) if it.get("patient_id") is not None else ("image", it["id"])
        groups[key].append(it)
    return [groups[k] for k in sorted(groups)]


def _strata(groups: list[list[dict]], num_classes: int) -> dict[int, list[list[dict]]]:
    """Groups keyed by their rarest positive class (``num_classes`` means no positive at all)."""
    counts = np.zeros(num_classes)
    for group in groups:
        for it in group:
            counts += np.asarray(it["label"]) > 0
    rarity = np.argsort(counts, kind="stable")  # class indices, rarest first
    strata: dict[int, list[list[dict]]] = defaultdict(list)
    for group in groups:
        positive = np.any([np.asarray(it["label"]) > 0 for it in group], axis=0)
        strata[next((int(c) for c in rarity if positive[c]), num_classes)].append(group)
    return strata


def _allocate(
    strata: dict[int, list[list[dict]]], fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, list[dict]]:
    """Deal the groups of each stratum, shuffled, to the parts in proportion to ``fractions`` (by image count).

    Each group goes to the part furthest below its target share of the images dealt so far; the shortfall
    carries over between strata, so every stratum is split close to the fractions and the totals match them.
    """
    names = [k for k, f in fractions.items() if f > 0]
    share = np.array([fractions[k] for k in names]) / sum(fractions[k] for k in names)
    dealt, seen = np.zeros(len(names)), 0
    parts: dict[str, list[dict]] = {k: [] for k in fractions}
    for key in sorted(strata):
        for i in rng.permutation(len(strata[key])):
            group = strata[key][i]
            seen += len(group)
            best = int(np.argmax(share * seen - dealt))
            dealt[best] += len(group)
            parts[names[best]].extend(group)
    return {k: sorted(v, key=lambda it: it["id"]) for k, v in parts.items()}


def _check_fraction(name: str, value: float, allow_one: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    upper_ok = number and (value <= 1 if allow_one else value < 1)
    if not (number and 0 < value and upper_ok):
        interval = "(0, 1]" if allow_one else "(0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}.")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def _positives(items: Sequence[dict], num_classes: int) -> list[int]:
    """Number of positive images per class."""
    if not items:
        return [0] * num_classes
    return [int(n) for n in (np.asarray([it["label"] for it in items]) > 0).sum(axis=0)]


def _limit_prevalence(parts: dict[str, list[dict]], prevalence: float, num_classes: int, rng) -> None:
    """Move labeled positives to the unlabeled part until positives are ``prevalence`` of the labeled part."""
    _check_fraction("labeled_prevalence", prevalence)
    if num_classes != 1:
        raise ValueError("labeled_prevalence applies to binary labels only (num_classes=1).")
    positives = [it for it in parts["labeled"] if it["label"][0] > 0]
    negatives = [it for it in parts["labeled"] if it["label"][0] <= 0]
    keep = max(1, round(prevalence * len(negatives) / (1 - prevalence)))
    if keep >= len(positives):
        return
    moved = {positives[i]["id"] for i in rng.choice(len(positives), size=len(positives) - keep, replace=False)}
    parts["unlabeled"] = sorted(parts["unlabeled"] + [it for it in positives if it["id"] in moved],
                                key=lambda it: it["id"])
    parts["labeled"] = [it for it in parts["labeled"] if it["id"] not in moved]


def _per_class(groups: list[list[dict]], per_class: int, names: list[str], rng) -> dict[str, list[dict]]:
    """``per_class`` labeled images of each class (for binary labels: the positives and the negatives), whole
    patients drawn at random, the rest unlabeled; the classes must be mutually exclusive.

    A patient whose images would overshoot a class's count is passed over, so each class gets exactly
    ``per_class`` images unless the patients left cannot make the count (then fewer, logged)."""
    binary = len(names) == 1
    classes = [f"not {names[0]}", names[0]] if binary else names

    def class_of(it: dict) -> int:
        positive = [c for c, v in enumerate(it["label"]) if v > 0]
        if binary:
            return len(positive)
        if len(positive) != 1:
            raise ValueError(
                f"labeled_per_class needs mutually exclusive classes (one per image); image {it['id']!r} has "
                f"{len(positive)} positive class(es) among {names}. Use labeled_fraction for multi-label data.")
        return positive[0]

    by_class: dict[int, list[list[dict]]] = defaultdict(list)
    for group in groups:
        kinds = [class_of(it) for it in group]  # every image checked
        by_class[kinds[0]].append(group)  # a patient with images of several classes counts as its first image's
    labeled, unlabeled = [], []
    for c, name in enumerate(classes):
        available = sum(len(g) for g in by_class[c])
        if available < per_class:
            raise ValueError(
                f"labeled_per_class={per_class}: class {name!r} has {available} image(s) in the training pool; lower "
                "labeled_per_class or use labeled_fraction.")
        taken = 0
        for i in rng.permutation(len(by_class[c])):
            group = by_class[c][i]
            if taken + len(group) <= per_class:
                labeled.extend(group)
                taken += len(group)
            else:
                unlabeled.extend(group)
        if taken < per_class:
            logger.warning("labeled_per_class=%d: class %r gets %d labeled image(s): its patients left have more "
                           "images each than the count lacks.", per_class, name, taken)
    return {"labeled": sorted(labeled, key=lambda it: it["id"]),
            "unlabeled": sorted(unlabeled, key=lambda it: it["id"])}


def make_split(
    pool: Sequence[dict],
    labeled_fraction: float,
    seed: int = 0,
    val_fraction: float = 0.1,
    validation: Sequence[dict] | None = None,
    test: Sequence[dict] | None = None,
    test_fraction: float = 0.2,
    classes: Sequence[str] | None = None,
    labeled_prevalence: float | None = None,
    min_positives: int = 1,
    labeled_per_class: int | None = None,
) -> dict[str, Any]:
    """Split datalist items into ``labeled``, ``unlabeled``, ``validation`` and ``test`` parts.

    ``validation`` (``val_fraction`` of the pool) and ``test`` (``test_fraction`` of the pool) are carved from
    ``pool`` unless given; the rest is split into labeled (``labeled_fraction`` of it) and unlabeled images.
    Validation and test do not depend on ``labeled_fraction``, so runs with different fractions are compared
    on the same held-out images.

    - Grouped: all images of a patient land in one part; items with ``patient_id`` None are their own group.
    - Stratified: groups are stratified by their rarest positive class (rarity counted over the images split),
      or "no positive". For binary labels this is simply positive vs negative; for multi-label data it keeps
      the rare classes, which are the ones at risk of vanishing from a small labeled part, represented.
    - Deterministic: inputs are sorted by id and shuffled with ``numpy.random.default_rng(seed)``.

    ``classes`` (optional) names the classes (default ``#0``, ``#1`` ...).

    ``min_positives``: a multi-label class with fewer positives than this in the labeled part is left out, logged
    with its positives in the training pool and the labeled part: its label is dropped from every item (the split
    is made with it, so leaving it out does not move images). The result's ``classes`` lists the kept classes and
    ``left_out_classes`` maps each left-out class to ``{"pool": n, "labeled": m}`` (training-pool and labeled
    positives).

    ``labeled_prevalence`` (binary labels only) lowers the share of positives in the labeled part to this value by
    moving randomly chosen labeled positives to the unlabeled part, to study a rarer finding on the same images;
    a labeled part already at or below it is left as it is.

    ``labeled_per_class`` (mutually exclusive classes only; for binary labels the negatives are a class) replaces
    ``labeled_fraction``: the labeled part is that many images of each class, whole patients drawn at random
    (``_per_class``), as in the semi-supervised GAN papers' tables (10 or 100 labeled images per class).

    Raises:
        ValueError: on bad fractions, an empty pool, duplicate ids, a labeled part where no class keeps
            ``min_positives`` positives, or (binary labels) one without a negative.
    """
    _check_count("min_positives", min_positives)
    if labeled_per_class is not None:
        _check_count("labeled_per_class", labeled_per_class)
    _check_fraction("labeled_fraction", labeled_fraction, allow_one=True)
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if not pool:
        raise ValueError("cannot split an empty pool of images; check the dataset source settings.")
    carved = {"test": test_fraction if test is None else 0.0, "validation": val_fraction if validation is None else 0.0}
    if sum(carved.values()) >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}.")
    items = sorted(pool, key=lambda it: it["id"])
    duplicates = [k for k, n in Counter(it["id"] for it in items).items() if n > 1]
    if duplicates:
        raise ValueError(f"the pool lists {len(duplicates)} image id(s) more than once, e.g. {duplicates[:5]}.")
    num_classes = len(items[0]["label"])
    if num_classes == 0 or any(len(it["label"]) != num_classes for it in items):
        raise ValueError("every item needs a label vector of the same, non-zero length.")

    rng = np.random.default_rng(seed)
    groups = _groups(items)
    held_out = _allocate(_strata(groups, num_classes), {"train": 1 - sum(carved.values()), **carved}, rng)
    train_groups = _groups(held_out["train"])
    names = list(classes) if classes is not None else [f"#{c}" for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for label vectors of length {num_classes}.")
    if labeled_per_class is not None:
        if labeled_prevalence is not None:
            raise ValueError("labeled_prevalence and labeled_per_class both set the labeled part's classes; set one.")
        parts = _per_class(train_groups, labeled_per_class, names, rng)
    else:
        parts = _allocate(_strata(train_groups, num_classes),
                          {"labeled": labeled_fraction, "unlabeled": 1 - labeled_fraction}, rng)
    if labeled_prevalence is not None:
        _limit_prevalence(parts, labeled_prevalence, num_classes, rng)
    parts["validation"] = held_out["validation"] if validation is None else sorted(validation, key=lambda it: it["id"])
    parts["test"] = held_out["test"] if test is None else sorted(test, key=lambda it: it["id"])

    labeled = parts["labeled"]
    positives = _positives(labeled, num_classes)
    in_pool = _positives(labeled + parts["unlabeled"], num_classes)
    num_train = len(labeled) + len(parts["unlabeled"])
    # the fractions that carved validation and test images out of the pool, named where they leave it too small
    carving = " and ".join(f"{'val' if k == 'validation' else 'test'}_fraction={v}" for k, v in carved.items() if v)
    leave = "leave" if " and " in carving else "leaves"
    if num_train == 0:
        raise ValueError(f"{carving or 'the split lists'} {leave} no image of the {len(items)} for training; lower "
                         f"{'them' if ' and ' in carving else 'it'}.")
    left = f": what {carving} {leave} of {len(items)}" if carving else ""
    size = (f"labeled_fraction={labeled_fraction}" if labeled_per_class is None
            else f"labeled_per_class={labeled_per_class}")
    where = f"the labeled part ({len(labeled)} of {num_train} training images{left}; {size}, seed={seed})"
    fractions = [part.split("=")[0] for part in carving.split(" and ")] if carving else []
    remedy = "try another seed" + (f" or a lower {' or '.join(fractions)}" if fractions else "")
    if num_classes == 1 and (positives[0] == 0 or positives[0] == len(labeled)):
        kind, pool_count = ("positive", in_pool[0]) if positives[0] == 0 else ("negative", num_train - in_pool[0])
        raise ValueError(
            f"{where} has no {kind} example of class {names[0]!r} ({pool_count} in the training pool): whole "
            f"patients move between parts, so a larger labeled_fraction need not help; {remedy}."
        )
    rare = [c for c in range(num_classes) if positives[c] < min_positives]
    counts = {names[c]: {"pool": in_pool[c], "labeled": positives[c]} for c in rare}
    advice = (f"fewer than min_positives={min_positives} positive(s) in {where}: "
              + ", ".join(f"{n} ({v['pool']} in the training pool, {v['labeled']} labeled)" for n, v in counts.items()))
    if len(rare) == num_classes:
        raise ValueError(
            f"every class has {advice}; whole patients move between parts, so a larger labeled_fraction need not "
            "help: try another seed, a lower min_positives, or `classes` to select classes that occur."
        )
    if rare:
        logger.warning(
            "leaving out class(es) %s from training and reporting: %s. To keep them: another seed, a lower "
            "min_positives, or `classes` to choose the classes.", [names[c] for c in rare], advice,
        )
    keep = [c for c in range(num_classes) if c not in rare]
    result: dict[str, Any] = {k: select_classes(parts[k], keep) if rare else parts[k] for k in PARTS}
    result["classes"] = [names[c] for c in keep]
    result["left_out_classes"] = counts
    return result


def select_classes(items: Sequence[dict], keep: Sequence[int]) -> list[dict]:
    """Copies of ``items`` whose ``label`` vectors hold only the classes at indices ``keep``, in that order."""
    return [{**it, "label": [it["label"][c] for c in keep]} for it in items]


def check_num_classes(num_classes: int, split: dict) -> int:
    """``num_classes`` (the network's outputs) if it equals the number of classes the split keeps; else ValueError.

    The bundles derive it from the split (``"$len(@split['classes'])"``), so only a set value can differ.
    """
    if int(num_classes) != len(split["classes"]):
        raise ValueError(
            f"num_classes is {num_classes} but the split keeps {len(split['classes'])} class(es) {split['classes']}; "
            f"remove the num_classes setting (it follows the split) or set it to {len(split['classes'])}."
        )
    return int(num_classes)


def load_split(path: str | os.PathLike) -> dict:
    """Read a split file written by :func:`prepare_split`."""
    split = read_json(path, "split file", "create it with prepare_split (delete a corrupt one to make a new split)")
    required = {"version", "fingerprint", "params", "classes", *PARTS}
    if not isinstance(split, dict) or not required <= split.keys() or split["version"] != SPLIT_VERSION:
        raise ValueError(f"{path} is not a version-{SPLIT_VERSION} split file; delete it to make a new split.")
    return split


def _check_images(items: list[dict], bad_images: str, what: str = "") -> list[str]:
    """Ids of the images that fail ``check_image``; raises for ``bad_images='fail'`` if there are any.

    ``what`` names the images in messages (``"unlabeled_source "``); the error gives the first one's problem.
    """
    from monai_cxr_ssl.data.readers import ImageReadError, check_image

    bad, problem = [], ""
    for it in tqdm(items, desc=f"checking {what}images", disable=None):
        try:
            check_image(it["image"])
        except ImageReadError as err:
            bad.append(it)
            problem = problem or err.problem
    if bad and bad_images == "fail":
        raise ValueError(
            f"{len(bad)} {what}image(s) cannot be read, e.g. {[it['image'] for it in bad[:5]]} (the first: "
            f"{problem}); fix or remove them, or set bad_images='skip' to drop them."
        )
    if bad:
        logger.warning("skipping %d unreadable %simage(s) (bad_images='skip'), e.g. %s", len(bad), what,
                       [it["image"] for it in bad[:5]])
    return sorted(it["id"] for it in bad)


def _combined(source_fingerprint: str, unlabeled_fingerprint: str) -> str:
    """The dataset fingerprint of a split with an ``unlabeled_source``: both fingerprints in one."""
    return hashlib.sha256(f"{source_fingerprint}+{unlabeled_fingerprint}".encode()).hexdigest()


def _changed(split: dict, split_file: Path, current: str, source_fingerprint: str, extra, params: dict) -> str:
    """Why ``split`` (read from ``split_file``) cannot be reused with the fingerprint ``current`` and ``params``:
    what changed, and what to do."""
    before = split.get("unlabeled_source")
    source_kept = split["fingerprint"] == (
        source_fingerprint if before is None else _combined(source_fingerprint, before["fingerprint"]))
    if split["fingerprint"] == current:
        what = f"parameters (was {split['params']}, now {params})"
    elif not source_kept:
        what = "data"
    elif before is None:
        what = f"data: it was made without unlabeled_source, now unlabeled_source={extra.source!r}"
    elif extra is None:
        what = f"data: it was made with unlabeled_source={before['path']!r}, now unlabeled_source is null"
    else:
        was = {it["id"] for it in split["unlabeled"] if it["id"].startswith(ID_PREFIX)}
        was |= set(before["duplicates"]) | set(before["skipped"])
        now = {it["id"] for it in extra.items}
        added, removed = sorted(now - was), sorted(was - now)
        change = (f"{len(added)} image(s) added (e.g. {added[:3]}), {len(removed)} removed (e.g. {removed[:3]})"
                  if added or removed else "the same file names, but some files changed size (replaced)")
        what = f"unlabeled images: unlabeled_source={extra.source!r} has {change}"
    return (f"split file {split_file} was made from different {what}; the data or settings changed since the split "
            "was made. Delete the file to make a new split, or use another output folder.")


def _unlabeled_part(extra, everything: list[dict], bad_images: str) -> tuple[list[dict], dict]:
    """The ``unlabeled_source`` images that join the unlabeled part (``{"image", "id"}``, no label) and the record
    of what was found, dropped and why, for the split file."""
    kept, duplicates = drop_duplicates(extra.items, everything)
    if duplicates:
        logger.warning(
            "unlabeled_source: dropping %d image(s) whose file equals one of the dataset's or an earlier one of the "
            "unlabeled_source, e.g. %s", len(duplicates), [f"{k} = {v}" for k, v in list(duplicates.items())[:5]],
        )
    if extra.ignored:
        logger.warning("unlabeled_source: ignoring %d file(s) that are not images, e.g. %s", len(extra.ignored),
                       extra.ignored[:10])
    skipped = set(_check_images(kept, bad_images, "unlabeled_source "))
    added = [{"image": it["image"], "id": it["id"]} for it in kept if it["id"] not in skipped]
    if not added:
        raise ValueError(
            f"unlabeled_source={extra.source!r} adds no image: of its {len(extra.items)} image(s), {len(duplicates)} "
            f"copy the dataset's (or each other) and {len(skipped)} cannot be read; give a folder or CSV of other "
            "images, or set unlabeled_source to null."
        )
    record = {
        "path": extra.source,
        "fingerprint": extra.fingerprint,
        "counts": {"found": len(extra.items), "added": len(added), "duplicates": len(duplicates),
                   "skipped": len(skipped), "ignored": len(extra.ignored)},
        "duplicates": duplicates,
        "skipped": sorted(skipped),
        "ignored_examples": extra.ignored[:20],
    }
    logger.info("unlabeled_source %s: %s", extra.source, ", ".join(f"{k}={v}" for k, v in record["counts"].items()))
    return added, record


def _patient_overlap(data, allow: bool) -> dict[str, int]:
    """Patients with images in more than one of the source's own parts (training pool, validation, test).

    A patient on both sides of a split makes validation or test scores optimistic, so it is refused unless
    ``allow``. The message gives counts and positions in the source's lists, never the patient ids.
    """
    parts = {"training pool": data.pool, "validation": data.validation or [], "test": data.test or []}
    patients = {name: {it["patient_id"] for it in items if it.get("patient_id") is not None}
                for name, items in parts.items()}
    names = list(parts)
    overlaps = {}
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = patients[first] & patients[second]
            if not shared:
                continue
            overlaps[f"{first}/{second}"] = len(shared)
            positions = [n for n, it in enumerate(parts[second], 1) if it.get("patient_id") in shared][:5]
            message = (
                f"{len(shared)} patient(s) have images in both the {first} and the {second} lists of the dataset "
                f"source (e.g. the images at positions {positions} of the {second} list, counted from 1)"
            )
            if not allow:
                raise ValueError(
                    f"{message}: a patient on both sides makes the {second} scores optimistic. Fix the split lists "
                    "(train_val_list.txt / test_list.txt, or the CSV's split column) or set allow_patient_overlap: "
                    "true to accept the overlap."
                )
            logger.warning("%s; accepted (allow_patient_overlap: true).", message)
    return overlaps


def _chosen_classes(classes: Sequence[str] | None, available: Sequence[str], source: str) -> list[int]:
    """Indices into ``available`` of the ``classes`` setting (None: all), checked."""
    if classes is None:
        return list(range(len(available)))
    if isinstance(classes, str) or not classes:
        raise ValueError(f"classes must be a non-empty list of class names or null (all), got {classes!r}.")
    unknown = [c for c in classes if c not in available]
    repeated = sorted({c for c in classes if list(classes).count(c) > 1})
    if unknown or repeated:
        what = f"unknown class(es) {unknown}" if unknown else f"class(es) {repeated} listed twice"
        raise ValueError(f"classes: {what} for the {source} source; choose from {list(available)} or null (all).")
    return [list(available).index(c) for c in classes]


EVAL_ID_PREFIX = "eval_source:"  # the ids of an eval_source's images, apart from the labeled source's


def _load_eval_source(eval_source):
    """``eval_source.load()``, refusing anything that is not a dataset source with labels."""
    if not callable(getattr(eval_source, "load", None)):
        raise ValueError(
            f"eval_source={eval_source!r} is not a dataset source with labels: it names the site whose labeled images "
            "validate and test the model, e.g. {\"_target_\": \"monai_cxr_ssl.data.ChestXray14\", \"root\": ...}. "
            "Images without labels go to unlabeled_source.")
    return eval_source.load()


def _eval_part(eval_source, data, classes: list[str], seed: int, val_fraction: float, test_fraction: float,
               bad_images: str) -> tuple[dict[str, list[dict]], dict]:
    """The images of ``eval_source`` (a labeled dataset source: the site B that the labeled source A's model is
    for; ``data`` is what it loaded): its validation and test images with labels mapped onto A's ``classes``, carved
    as A's are (its own lists when it has them; patient-grouped, stratified, ``seed``), and its training pool
    without labels (the unlabeled part); and the split's record of them."""
    foreign = [c for c in data.classes if c not in classes]
    if foreign:
        raise ValueError(
            f"eval_source {eval_source!r} has class(es) {foreign} that the labeled source does not have (its classes: "
            f"{classes}); a model cannot be tested on classes it never learnt. Select eval_source's classes among "
            "those (its task, classes or label columns).")
    where = [data.classes.index(c) if c in data.classes else None for c in classes]

    def mapped(items: list[dict] | None) -> list[dict] | None:
        if items is None:
            return None
        return [{**it, "id": EVAL_ID_PREFIX + it["id"],
                 "label": [0.0 if k is None else it["label"][k] for k in where]} for it in items]

    everything = data.pool + (data.validation or []) + (data.test or [])
    skipped = set(_check_images(everything, bad_images, "eval_source "))
    kept = {name: mapped([it for it in part if it["id"] not in skipped]) if part is not None else None
            for name, part in (("pool", data.pool), ("validation", data.validation), ("test", data.test))}
    carved = {"validation": val_fraction if kept["validation"] is None else 0.0,
              "test": test_fraction if kept["test"] is None else 0.0}
    rng = np.random.default_rng(seed)
    held_out = _allocate(_strata(_groups(sorted(kept["pool"], key=lambda it: it["id"])), len(classes)),
                         {"train": 1 - sum(carved.values()), **carved}, rng)
    parts = {"unlabeled": [{"image": it["image"], "id": it["id"]} for it in held_out["train"]],
             "validation": kept["validation"] or held_out["validation"], "test": kept["test"] or held_out["test"]}
    parts = {k: sorted(({key: val for key, val in it.items() if key != "patient_id"} for it in v),
                       key=lambda it: it["id"]) for k, v in parts.items()}
    for name in ("validation", "test"):
        if not parts[name]:
            raise ValueError(f"eval_source {eval_source!r} leaves no {name} image; give it more images or a larger "
                             f"{'val' if name == 'validation' else 'test'}_fraction.")
    record = {"source": repr(eval_source), "classes": list(data.classes), "fingerprint": fingerprint(everything),
              "counts": {k: len(v) for k, v in parts.items()}, "skipped": sorted(skipped)}
    return parts, record


@distributed.main_process_first()  # under torchrun rank 0 makes the file, the other ranks read it
def prepare_split(
    source,
    split_file: str | os.PathLike,
    labeled_fraction: float,
    seed: int = 0,
    val_fraction: float = 0.1,
    bad_images: str = "fail",
    num_classes: int | None = None,
    labeled_prevalence: float | None = None,
    allow_patient_overlap: bool = False,
    classes: Sequence[str] | None = None,
    min_positives: int = 1,
    unlabeled_source: str | os.PathLike | None = None,
    unlabeled_source_column: str = "image",
    eval_source=None,
    labeled_per_class: int | None = None,
) -> dict:
    """Load ``source``, then return the split stored in ``split_file``, making and writing it on first use.

    Args:
        source: a dataset source (``monai_cxr_ssl.data.datasets``), anything with ``load() -> SourceData``.
        split_file: JSON file for the split; reused when the data and parameters are unchanged.
        labeled_fraction: share of the training images that keep their labels, in (0, 1].
        seed: seed of the split.
        val_fraction: share of the pool held out for validation when the source has no validation split.
        bad_images: ``"fail"`` to stop on unreadable images, ``"skip"`` to leave them out (listed in ``skipped``).
        num_classes: the network's number of outputs, checked against the kept classes when given.
        labeled_prevalence: for binary labels, the share of positives to subsample the labeled part to (the rest
            of its positives become unlabeled); None keeps the stratified share.
        allow_patient_overlap: accept a source whose own validation or test lists share patients with its
            training pool (refused by default, see ``_patient_overlap``).
        classes: the source's classes to use, in this order (e.g. some ChestX-ray14 pathologies); None: all.
        min_positives: classes with fewer labeled positives are left out of training and reporting (logged, and
            listed in the split's ``left_out_classes``); see ``make_split``.
        unlabeled_source: a folder (searched recursively) or a ``.csv`` list of images without labels, added to the
            unlabeled part (see ``monai_cxr_ssl.data.unlabeled``). Files equal to a dataset image or to an earlier
            one are dropped, unreadable ones follow ``bad_images``; the split's ``unlabeled_source`` records the
            counts and the dropped ids. With it, no unlabeled item keeps a label (every batch of that part then
            collates alike); ``positives["unlabeled"]`` still counts those of the source's own unlabeled images.
        unlabeled_source_column: the CSV column with the image paths (relative to the CSV's folder or absolute).
        eval_source: another dataset source with labels (site B) for domain adaptation: the labeled part stays
            ``source``'s (site A: the same images as without it), the unlabeled part is B's training pool without
            labels (with ``unlabeled_source``'s images, if given), validation and test are B's images (its own
            lists, or carved from its pool as A's are), labels mapped onto A's classes by name; B's classes must be
            among A's. The split's ``eval_source`` records B, its counts and what it replaced.
        labeled_per_class: that many labeled images of each class instead of ``labeled_fraction`` (mutually
            exclusive classes; see ``make_split``).

    Returns:
        The split: ``labeled``, ``unlabeled``, ``validation`` and ``test`` datalists plus ``classes`` (the kept
        classes; labels hold these only), ``left_out_classes``, ``counts``, ``positives``, ``fingerprint``,
        ``params`` and ``skipped``. Patient ids only serve the grouping; the stored items drop ``patient_id`` so
        the file carries no patient identifiers.
    """
    if bad_images not in _BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {_BAD_IMAGE_POLICIES}, got {bad_images!r}.")
    _check_fraction("labeled_fraction", labeled_fraction, allow_one=True)  # before the (slow) image check
    _check_fraction("val_fraction", val_fraction)
    data = source.load()
    overlaps = _patient_overlap(data, allow_patient_overlap)
    everything = data.pool + (data.validation or []) + (data.test or [])
    params = {"labeled_fraction": labeled_fraction, "seed": seed, "val_fraction": val_fraction, "test_fraction": 0.2}
    # recorded only when set, so that earlier split files stay valid
    if labeled_prevalence is not None:
        params["labeled_prevalence"] = labeled_prevalence
    if classes is not None:
        params["classes"] = list(classes)
    if min_positives != 1:
        params["min_positives"] = min_positives
    if eval_source is not None:
        params["eval_source"] = repr(eval_source)
    if labeled_per_class is not None:
        _check_count("labeled_per_class", labeled_per_class)
        params["labeled_per_class"] = labeled_per_class
    source_fingerprint = current = fingerprint(everything)
    extra = None
    if unlabeled_source is not None:
        extra = load_unlabeled_source(unlabeled_source, unlabeled_source_column)
        current = _combined(source_fingerprint, extra.fingerprint)
    site_data, site_items = None, []
    if eval_source is not None:
        site_data = _load_eval_source(eval_source)
        site_items = site_data.pool + (site_data.validation or []) + (site_data.test or [])
        current = _combined(current, fingerprint(site_items))
    split_file = Path(split_file)
    if split_file.exists():
        split = load_split(split_file)
        if split["fingerprint"] != current or split["params"] != params:
            raise ValueError(_changed(split, split_file, current, source_fingerprint, extra, params))
        # Same ids and labels, but the dataset folder may have moved: take image paths from the source.
        paths = {it["id"]: it["image"] for it in everything + (extra.items if extra else [])}
        paths.update({EVAL_ID_PREFIX + it["id"]: it["image"] for it in site_items})
        for part in PARTS:
            for it in split[part]:
                it["image"] = paths[it["id"]]
        if num_classes is not None:
            check_num_classes(num_classes, split)
        split["split_fingerprint"] = split_fingerprint(split)
        return split

    chosen = _chosen_classes(classes, data.classes, type(source).__name__)
    skipped = set(_check_images(everything, bad_images))
    keep = select_classes([it for it in data.pool if it["id"] not in skipped], chosen)
    validation, test = (select_classes([it for it in p or [] if it["id"] not in skipped], chosen) or None
                        for p in (data.validation, data.test))
    made = make_split(
        keep,
        labeled_fraction,
        seed=seed,
        val_fraction=val_fraction,
        validation=validation,
        test=test,
        test_fraction=params["test_fraction"],
        classes=[data.classes[c] for c in chosen],
        labeled_prevalence=labeled_prevalence,
        min_positives=min_positives,
        labeled_per_class=labeled_per_class,
    )
    if num_classes is not None:
        check_num_classes(num_classes, made)
    # Patient ids only serve the grouping above; they are not written out.
    parts = {k: [{key: val for key, val in it.items() if key != "patient_id"} for it in made[k]] for k in PARTS}
    n = len(made["classes"])
    positives = {k: _positives(v, n) for k, v in parts.items()}
    evaluated = None
    if eval_source is not None:  # site B's images for everything but the labeled part
        site, evaluated = _eval_part(eval_source, site_data, made["classes"], seed, val_fraction,
                                     params["test_fraction"], bad_images)
        evaluated["replaced"] = {k: len(parts[k]) for k in site}
        parts.update(site)
        positives.update({k: _positives(v, n) for k, v in site.items() if k != "unlabeled"}, unlabeled=[0] * n)
    if extra is not None:
        added, record = _unlabeled_part(extra, everything, bad_images)
        unlabeled = [{key: val for key, val in it.items() if key != "label"} for it in parts["unlabeled"]]
        parts["unlabeled"] = sorted(unlabeled + added, key=lambda it: it["id"])
    split = {
        "version": SPLIT_VERSION,
        "fingerprint": current,
        "params": params,
        "classes": made["classes"],
        "left_out_classes": made["left_out_classes"],
        "counts": {k: len(v) for k, v in parts.items()},
        "positives": positives,
        **parts,
        "skipped": sorted(skipped),
        **({"patient_overlap": overlaps} if overlaps else {}),
        **({"unlabeled_source": record} if extra is not None else {}),
        **({"eval_source": evaluated} if evaluated is not None else {}),
    }
    split["split_fingerprint"] = split_fingerprint(split)
    write_json(split_file, split)
    logger.info("split %s: %s", split_file, ", ".join(f"{k}={v}" for k, v in split["counts"].items()))
    return split


def subsample(items: Sequence[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """At most ``limit`` of ``items``, drawn at random with ``seed`` and kept in their original order.

    Lets benchmarks cap the unlabeled pool that is pseudo-labelled; ``None`` keeps everything.
    """
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise ValueError(f"max_unlabeled must be a positive number of images or null, got {limit}.")
    keep = np.sort(np.random.default_rng(seed).choice(len(items), size=limit, replace=False))
    return [items[i] for i in keep]


def training_images(split: dict, max_unlabeled: int | None = None, seed: int = 0, labeled: bool = True) -> list[dict]:
    """The images a stage without labels (a self-supervised pre-training) learns from: the unlabeled split's (capped
    at ``max_unlabeled``, ``subsample``) and, with ``labeled``, the labeled split's, without their labels. The
    validation and test images stay out, as for every other stage."""
    items = [*(split["labeled"] if labeled else []), *subsample(split["unlabeled"], max_unlabeled, seed)]
    return [{key: value for key, value in item.items() if key != "label"} for item in items]
