"""The config items a bundle workflow uses, and the MLflow params and resume settings derived from them.

A stage's settings are written once, as ids of its config. ``used_config`` finds the items a workflow uses by
following references from ``initialize``/``run``/``finalize``; ``run_params`` (a ``_target_`` of the bundle's
``run_params`` id) turns the used top-level settings with plain values into the stage's MLflow params, named by
their ids, plus the run facts the config declares (fingerprints, class lists, counts). The same dict is the
``settings`` that ``ResumableCheckpoint`` records and compares, so a changed setting never resumes a stale
``last.pt``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "BOOKKEEPING_IDS", "MAX_LIST", "ROOTS", "params_of", "read_ids", "resolving_parser", "run_params", "used_config",
    "uses",
]

ROOTS = ("initialize", "run", "finalize")
# Settings that change where or how fast results are made, not the results: they do not re-run stages and are not
# params. The dataset folder is one: the split file's fingerprint of image ids and labels stops any stage if the data
# itself differs. The output folders are another: a stage's folder, or its checkpoints' and split's paths.
BOOKKEEPING_IDS = frozenset(
    {"bundle_root", "tracking_uri", "experiment_name", "run_name", "run_suffix", "executed_config", "device",
     "num_workers", "cache_rate", "resume", "dataset_dir", "mlflow_run_record", "mlflow_parent_run_id",
     "output_dir", "stage_dir", "ckpt_dir", "split_file"}
)
# A setting whose value is a list of more items than this (an image list, say) is no param.
MAX_LIST = 32
_SCALARS = (str, int, float, bool, type(None))


def _reachable(parser: Any, roots: Iterable[str], skip: Iterable[str] = ()) -> dict[str, Any]:
    """Raw items of ``parser`` reachable by reference from ``roots``, without entering ``skip``."""
    from monai.bundle.reference_resolver import ReferenceResolver

    skip = set(skip)
    found: dict[str, Any] = {}
    todo = [r for r in roots if r in parser]
    while todo:
        id_ = todo.pop()
        if id_ in found or id_ in skip or id_ not in parser:
            continue
        found[id_] = parser[id_]
        todo += ReferenceResolver.find_refs_in_config(parser[id_], id_)
    return found


def read_ids(parser: Any, roots: Sequence[str] = ROOTS) -> frozenset[str]:
    """The ids a workflow reads: reachable by reference from ``roots``, bookkeeping ids included."""
    return frozenset(_reachable(parser, roots))


def uses(ids: frozenset[str], key: str) -> bool:
    """Whether a workflow reading ``ids`` (``read_ids``) reads the setting ``key`` (``aals_t``,
    ``train#trainer#max_epochs``): the id itself, an item inside it or one containing it."""
    key = key.replace("#", "::")
    return any(id_ == key or id_.startswith(key + "::") or key.startswith(id_ + "::") for id_ in ids)


def used_config(parser: Any, roots: Sequence[str] = ROOTS) -> dict[str, Any]:
    """The raw config items a workflow uses: those reachable by reference from ``roots``, minus bookkeeping ids.

    Settings a stage never reads (another stage's κ, a pipeline option) are not in it, so changing them does not
    re-run the stage. Returned JSON-normalised, ids sorted.
    """
    used = _reachable(parser, roots, BOOKKEEPING_IDS)
    return json.loads(json.dumps(dict(sorted(used.items())), default=str))


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) <= MAX_LIST and all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def _param(value: Any) -> Any:
    """A param's value: a list as its items joined by commas (``classes`` = ``"A,B"``), a plain value as it is."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def params_of(
    parser: Any,
    facts: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    busy: Iterable[str] = (),
) -> dict[str, Any]:
    """The params of the workflow of ``parser``: every used top-level setting (``used_config``) whose value is plain
    (a number, string, bool, null, or a list of at most ``MAX_LIST`` of them), directly or as the value of its
    ``$`` expression or ``@`` reference, named by its id or by ``names[id]``; then ``facts`` (name → value, lists
    joined by commas). The ids in ``initialize``/``run``/``finalize`` themselves (``@check_settings``) are steps,
    not settings. ``busy``: ids being resolved now, whose dependants are left out (evaluating them would recurse).
    """
    names = dict(names or {})
    steps = {entry[1:] for root in ROOTS for entry in parser.get(root, None) or ()
             if isinstance(entry, str) and entry.startswith("@")}
    busy = set(busy)
    resolved = parser.ref_resolver.resolved_content
    params: dict[str, Any] = {}
    for id_, raw in _reachable(parser, ROOTS, BOOKKEEPING_IDS).items():
        if "::" in id_ or id_ in ROOTS or id_ in steps or id_ in busy or isinstance(raw, dict):
            continue
        if id_ not in resolved and busy & set(_reachable(parser, [id_])):
            continue
        value = parser.get_parsed_content(id_)
        if _plain(value):
            params[names.get(id_, id_)] = _param(value)
    params.update({name: _param(value) for name, value in (facts or {}).items()})
    return dict(sorted(params.items()))


def resolving_parser() -> tuple[Any, frozenset[str]]:
    """The ``ConfigParser`` resolving the config expression or component that calls this, and the ids it is
    resolving now. MONAI gives an expression no handle to its parser, so the caller's frames are searched: this
    works the same under ``python -m monai.bundle run`` and ``monai-cxr-ssl run``."""
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    resolving = []
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ReferenceResolver) and frame.f_code.co_name == "_resolve_one_item":
            resolving.append((owner, frame.f_locals.get("id")))
        elif isinstance(owner, ConfigParser):
            return owner, frozenset(id_ for resolver, id_ in resolving if resolver is owner.ref_resolver)
        frame = frame.f_back
    raise RuntimeError("resolving_parser: not called while a bundle config is being parsed (use it as a config "
                       "item's _target_ or in a '$' expression).")


def run_params(facts: Mapping[str, Any] | None = None, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``params_of`` the config that calls this (the bundle's ``run_params`` id): the stage's MLflow params and its
    ``ResumableCheckpoint`` settings, with ``facts`` (run facts that are not settings) and ``names`` (id → param
    name, e.g. ``ckpt_path`` → ``checkpoint``)."""
    parser, busy = resolving_parser()
    return params_of(parser, facts, names, busy)
