"""Checkpoint files and their provenance: what split and settings a stage's checkpoints were made with.

Every training stage writes ``models/provenance.json`` beside its ``model.pt`` and ``last.pt``: the split's
fingerprint (the image ids of each part, ``splits.split_fingerprint``) and the settings (the stage's
hyperparameters). A later stage that reads a checkpoint (the teacher of the pseudo-labels, the model a fine-tune
or mean teacher starts from, the model an evaluation scores) refuses one made for another split, since its
training images may be this split's validation or test images; a resumed stage refuses a ``last.pt`` made with
other settings.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from monai_cxr_ssl.distributed import unwrap
from monai_cxr_ssl.utils import read_json, write_json

__all__ = ["MODEL_CHECKPOINT", "PROVENANCE_FILE", "TRAINING_CHECKPOINT", "changed_settings", "load_weights",
           "read_checkpoint", "read_provenance", "read_state_dict", "write_provenance"]

logger = logging.getLogger("monai_cxr_ssl")

PROVENANCE_FILE = "provenance.json"


MODEL_CHECKPOINT = "a model checkpoint (the state dict a training stage saves as models/model.pt)"
TRAINING_CHECKPOINT = "a training checkpoint (the models/last.pt a training stage saves after every epoch)"


def read_checkpoint(path: str | os.PathLike, expected: str = MODEL_CHECKPOINT) -> Any:
    """``torch.load`` of ``path`` with ``weights_only=True`` (no code runs); a file that is not such a checkpoint
    raises one ``ValueError`` naming it and what was ``expected``. Torch's own hint (load it with
    ``weights_only=False``) is never passed on: that would run whatever the file holds."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint file here; expected {expected}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch reports foreign files with many exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        reason = f"{type(err).__name__}: {first}" if first else type(err).__name__
        if "weights_only" in str(err):
            reason = "it holds Python objects besides tensors, not loaded since loading them can run code"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({reason}); expected {expected}.") from None


def read_state_dict(
    path: str | os.PathLike, expected: str = MODEL_CHECKPOINT, wrapper_keys: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """``read_checkpoint`` of a file that must hold a state dict (a mapping of names to tensors), or one under the
    first of ``wrapper_keys`` it has (``{"state_dict": {...}}`` as training frameworks save them, a stage's
    ``last.pt`` under ``network``)."""
    state = read_checkpoint(path, expected)
    key = next((k for k in wrapper_keys if isinstance(state, dict) and isinstance(state.get(k), dict)), None)
    if key is not None:
        state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: holds a {type(state).__name__} that is not a state dict of tensors; "
                         f"expected {expected}.")
    return state


def write_provenance(models_dir: str | os.PathLike, split_fingerprint: str | None, settings: dict | None) -> None:
    """Record the split and settings the checkpoints in ``models_dir`` are made with."""
    write_json(Path(models_dir) / PROVENANCE_FILE, {"split_fingerprint": split_fingerprint, "settings": settings})


def read_provenance(models_dir: str | os.PathLike) -> dict | None:
    """The provenance record of ``models_dir``, or None when it has none (a checkpoint made elsewhere)."""
    path = Path(models_dir) / PROVENANCE_FILE
    if not path.is_file():
        return None
    remedy = "delete the stage folder and re-run the stage"
    record = read_json(path, "checkpoint provenance record", remedy)
    shape = {"split_fingerprint": (str, type(None)), "settings": (dict, type(None))}
    wrong = ([f"{type(record).__name__}, not an object"] if not isinstance(record, dict) else
             [f"its {key} is a {type(record.get(key)).__name__}" for key, types in shape.items()
              if not isinstance(record.get(key), types)])
    if wrong:
        raise ValueError(f"{path}: a damaged checkpoint provenance record ({wrong[0]}; this package writes "
                         "{\"split_fingerprint\": ..., \"settings\": {...}}); " + remedy + ".")
    return record


def changed_settings(old: dict, new: dict) -> list[str]:
    """The settings whose values differ between two settings dicts (JSON-normalised), sorted."""
    old, new = (json.loads(json.dumps(d, default=str)) for d in (old, new))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def load_weights(network: torch.nn.Module, path: str | os.PathLike, split: dict, what: str = "checkpoint") -> str:
    """Load the model weights ``path`` (a stage's ``models/model.pt``) into ``network`` after checking that they
    were trained on ``split``; returns ``path``.

    Raises a ``ValueError`` naming both split fingerprints when the checkpoint's provenance records another split,
    and one naming the file when it is not a checkpoint or does not fit the network. A checkpoint without a
    provenance record (trained elsewhere) is loaded with a warning: its split cannot be checked.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} here (run the stage that makes it first, or set its path).")
    record = read_provenance(path.parent)
    current = split["split_fingerprint"]
    if record is None:
        logger.warning("%s has no %s beside it: it was not trained by monai-cxr-ssl on this split, which cannot be "
                       "checked.", path, PROVENANCE_FILE)
    elif record.get("split_fingerprint") != current:
        raise ValueError(
            f"{what} {path} was trained on another split (split fingerprint {record.get('split_fingerprint')}, "
            f"this run's split {current}): its training images may be this split's validation or test images. "
            "Use the checkpoint of this output folder's own stage, or re-run that stage here."
        )
    state = read_state_dict(path)
    try:
        unwrap(network).load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{what} {path} does not fit this network ({first}); check num_classes and the "
                         "network settings it was trained with.") from None
    return str(path)
