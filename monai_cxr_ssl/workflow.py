"""Run the bundles' configs in-process, as ``python -m monai.bundle run`` does, one run per output folder,
recording the executed config."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monai_cxr_ssl.locking import output_lock
from monai_cxr_ssl.methods import named_configs
from monai_cxr_ssl.settings import stage_epochs
from monai_cxr_ssl.utils import atomic_write, write_json

if TYPE_CHECKING:  # MONAI (and torch) are imported where a workflow is made: the CLI's start path imports this module
    from monai.bundle import ConfigParser, ConfigWorkflow

logger = logging.getLogger("monai_cxr_ssl")

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
# The repository's bundles/ and configs/ are the source; a source checkout (and an editable install) uses them, an
# installed wheel has copies of them inside the package (setup.py's build_py puts them there).
_DATA_ROOT = REPO_ROOT if (REPO_ROOT / "bundles" / "cxr_classifier" / "configs").is_dir() else PACKAGE_DIR
DEFAULT_BUNDLE = _DATA_ROOT / "bundles" / "cxr_classifier"
OVERLAYS_DIR = _DATA_ROOT / "configs"


def resolve_configs(bundle: str | os.PathLike, configs: Sequence[str]) -> list[str]:
    """Turn config names (``train``, ``evaluate``, ``student`` ...) and overlay paths into a list of files.

    A bare overlay name such as ``cpu_small`` is looked up in the repository's ``configs/`` folder. The files
    come in the order base config, the stage's overlays (``predict.json`` and ``evaluate.json``, ``student.json``
    ...), then the user's overlays: the last one wins, so a user's overlay sets a stage's settings
    (``student_epochs``) as ``--set`` does, and the defaults of a method's settings live in its own overlay, not in
    the base config.
    """
    bundle = Path(bundle)
    if not (bundle / "configs").is_dir():
        raise FileNotFoundError(f"{bundle}: not a MONAI bundle (no configs/ folder); pass --bundle <bundle dir>.")
    stage: list[str] = []
    overlays: list[str] = []
    named = named_configs()  # evaluate and each stage of a method are overlays on train, as in model-zoo bundles
    for name in configs:
        if name in named:
            stage += [str(bundle / "configs" / f) for f in named[name]]
            continue
        path = Path(name)
        if not path.suffix and (OVERLAYS_DIR / f"{name}.json").is_file():
            path = OVERLAYS_DIR / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"config {name!r} not found: use one of {sorted(named)}, a JSON/YAML file, "
                f"or an overlay name from {OVERLAYS_DIR}."
            )
        _check_overlay(path)
        overlays.append(str(path))
    return list(dict.fromkeys(stage)) + overlays


def _check_overlay(path: Path) -> None:
    """A user's overlay must parse as MONAI reads it (JSON, or YAML for .yaml/.yml) into an object of settings;
    MONAI's own error would not name the file."""
    import yaml

    kind = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
    try:
        text = path.read_text()
        content = yaml.safe_load(text) if kind == "YAML" else json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"config overlay {path}: not valid {kind} ({first}); fix the file.") from None
    if not isinstance(content, dict):
        raise ValueError(f"config overlay {path}: holds a {type(content).__name__}, not an object of settings "
                         '({"key": value, ...}); fix the file.')


def make_workflow(
    configs: Sequence[str], bundle: str | os.PathLike = DEFAULT_BUNDLE, **overrides: Any
) -> ConfigWorkflow:
    """A bundle workflow for ``configs`` (names or files, see ``resolve_configs``) with ``overrides``, not yet run.

    A general ``num_epochs`` override also sets the per-stage epochs the overrides do not give (``stage_epochs``).
    The workflow has its MONAI ``workflow_type`` (``workflow_type_of``), so that ``check_properties()`` checks the
    ids MONAI's tools look up (``train#trainer``, ``evaluator`` ...).
    """
    from monai_cxr_ssl.bundle_workflow import CXRConfigWorkflow

    bundle = Path(bundle).resolve()
    overrides = stage_epochs(overrides)
    overrides.setdefault("bundle_root", str(bundle))
    files = resolve_configs(bundle, configs)
    return CXRConfigWorkflow(
        config_file=files,
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type_of(files, overrides),
        **overrides,
    )


def workflow_type_of(files: Sequence[str], overrides: dict[str, Any] | None = None) -> str:
    """MONAI's workflow type of the merged ``files``: ``"train"`` when its ``run`` starts ``train#trainer`` (the
    training stages), else ``"infer"`` (a run of an evaluator: evaluation, pseudo-labelling, inference)."""
    from monai.bundle import ConfigParser

    run = (overrides or {}).get("run", ConfigParser.load_config_files(list(files)).get("run"))
    return "train" if "train#trainer" in str(run).replace("::", "#") else "infer"


def run_workflow(workflow: ConfigWorkflow) -> ConfigWorkflow:
    """Initialise, run and finalise ``workflow`` holding the lock on its ``output_dir``; returns it so callers can
    read parsed results.

    Once ``initialize`` has succeeded the merged config (files plus overrides) is written to the path in the
    config's ``executed_config``, so that the MLflow run can keep it as an artifact. If the workflow then fails
    without saving a checkpoint to resume from (``train#checkpoint``'s ``last.pt`` unchanged), what this run
    created is taken away again: the executed config (an earlier one is put back) and the split file if this
    run made it. A failure that leaves a resumable checkpoint keeps both: the resumed run needs them.
    """
    from monai_cxr_ssl.distributed import is_main_process

    parser = workflow.parser
    lock = output_lock(parser.get_parsed_content("output_dir")) if "output_dir" in parser else nullcontext()
    with lock:
        before = _Snapshot(parser)
        try:
            workflow.initialize()  # under torchrun (multi_gpu.json) this starts the process group
            if "executed_config" in parser and is_main_process():
                write_json(before.executed_config, parser.get())
            workflow.run()
            workflow.finalize()
        except BaseException:
            if is_main_process():
                before.undo_if_not_resumable()
            raise
    return workflow


class _Snapshot:
    """The files a failed workflow may have to take back, as they were before it ran."""

    def __init__(self, parser: ConfigParser) -> None:
        def path(id_: str) -> Path | None:
            return Path(parser.get_parsed_content(id_)) if id_ in parser else None

        self.executed_config = path("executed_config")
        self.config_bytes = _read(self.executed_config)
        self.split_file = path("split_file")
        self.split_existed = self.split_file is not None and self.split_file.exists()
        self.checkpoint = None
        if "train#checkpoint#save_dir" in parser:
            save_dir = parser.get_parsed_content("train#checkpoint#save_dir")
            self.checkpoint = Path(save_dir) / parser.get("train#checkpoint#filename", "last.pt")
        self.checkpoint_stamp = _stamp(self.checkpoint)

    def undo_if_not_resumable(self) -> None:
        if self.checkpoint is not None and _stamp(self.checkpoint) != self.checkpoint_stamp:
            return  # it saved a checkpoint: a resume continues from it with this config and split
        if self.executed_config is not None:
            if self.config_bytes is None:
                self.executed_config.unlink(missing_ok=True)
            elif _read(self.executed_config) != self.config_bytes:
                with atomic_write(self.executed_config, "wb") as f:
                    f.write(self.config_bytes)
        if self.split_file is not None and not self.split_existed:
            self.split_file.unlink(missing_ok=True)


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None and path.is_file() else None


def _stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_ino
