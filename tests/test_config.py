"""Config without repetition: MLflow params (and resume settings) derived from the settings a stage uses, overlays
that hold only the keys they change, and one merge order for ``monai-cxr-ssl run`` and ``python -m monai.bundle
run``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from monai.bundle import ConfigParser

from monai_cxr_ssl.checkpoints import PROVENANCE_FILE
from monai_cxr_ssl.cli import main
from monai_cxr_ssl.config_items import BOOKKEEPING_IDS
from monai_cxr_ssl.data import make_synthetic_dataset
from monai_cxr_ssl.methods import named_configs
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, OVERLAYS_DIR, make_workflow, resolve_configs

CONFIGS = DEFAULT_BUNDLE / "configs"
TINY = {"image_size": 32, "crop_size": 32, "batch_size": 8, "num_workers": 0, "cache_rate": 1.0,
        "labeled_fraction": 0.5, "num_epochs": 1}


def _chain(files: list[str]) -> dict:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / f) for f in files])
    return parser.get()


def _overlays() -> list[tuple[list[str], str]]:
    """(base chain, overlay) for every stage overlay of the named configs and every overlay in configs/."""
    pairs = {(tuple(files[:i]), files[i]) for files in named_configs().values() for i in range(1, len(files))}
    pairs |= {(("train.json",), str(path)) for path in sorted(OVERLAYS_DIR.glob("*.json"))}
    return sorted((list(base), overlay) for base, overlay in pairs)


@pytest.mark.parametrize(("base", "overlay"), _overlays(), ids=lambda v: Path(v).name if isinstance(v, str) else "")
def test_overlays_hold_only_the_keys_they_change(base, overlay):
    """Every id an overlay sets is new or changes what the configs below it already have (nothing restated)."""
    below = ConfigParser(_chain(base))
    path = Path(overlay) if Path(overlay).is_absolute() else CONFIGS / overlay
    restated = []
    for key, value in json.loads(path.read_text()).items():
        if key.startswith("+"):
            assert value, f"{path.name}: {key} appends nothing"
            continue
        if key in below and below[key] == value:
            restated.append(key)
    assert not restated, f"{path.name} restates {restated} with the values {base} already give"


def test_no_hand_kept_settings_dict():
    for path in CONFIGS.glob("*.json"):
        text = path.read_text()
        assert "hyperparameters" not in text and "experiment_param\": \"$dict(" not in text, path.name
    assert "train#mlflow" in json.dumps(_chain(["train.json", "predict.json", "evaluate.json"])["validate"]["handlers"])


def test_plain_bundle_run_merges_overlays_like_monai_cxr_ssl(tmp_path):
    """``python -m monai.bundle run --config_file "[base, stage overlays, own overlays]"`` merges into the same
    config as ``monai-cxr-ssl run student <overlay>`` (``make_workflow``): the user's overlay sets the stage's own
    settings, whose defaults are in the stage's overlay."""
    overlay = tmp_path / "mine.json"
    overlay.write_text(json.dumps({"student_epochs": 2, "learning_rate": 0.002}))
    files = resolve_configs(DEFAULT_BUNDLE, ["student", str(overlay)])
    assert files == [str(CONFIGS / "train.json"), str(CONFIGS / "student.json"), str(overlay)]
    dump = tmp_path / "merged.json"
    overrides = {
        "bundle_root": str(DEFAULT_BUNDLE), "seed": 3,
        "initialize": [],
        "run": [f"$open({str(dump)!r}, 'w').write(__import__('json').dumps("
                "__import__('monai_cxr_ssl.config_items').config_items.resolving_parser()[0].get()))"],
    }
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": files, "meta_file": str(CONFIGS / "metadata.json"),
                                "logging_file": str(CONFIGS / "logging.conf"), **overrides}))
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--args_file", str(args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(dump.read_text())
    ours = make_workflow(["student", str(overlay)], **overrides).parser
    ours.resolve_macro_and_relative_ids()  # as parsing did in the plain run
    assert plain == json.loads(json.dumps(ours.get()))
    assert plain["train"]["trainer"]["max_epochs"] == "@student_epochs"  # student.json's, over the base config's
    assert plain["student_epochs"] == 2  # the user's overlay over student.json's default (10)
    assert plain["learning_rate"] == 0.002 and plain["stage"] == "student" and plain["seed"] == 3


# --- MLflow params of real stage runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Teacher (with ``--set learning_rate``), its evaluation, pseudo-labels and the mean teacher, run once through
    the CLI on tiny generated data; returns the settings and the MLflow runs by name."""
    root = tmp_path_factory.mktemp("config")
    data = make_synthetic_dataset(root / "data", n_train=40, n_test=8, image_size=32, prevalence=0.4, seed=3)
    settings = {**TINY, "dataset_dir": str(data), "output_dir": str(root / "out"), "experiment_name": "params",
                "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "learning_rate": 0.0005,
                "datasource": {"_target_": "monai_cxr_ssl.data.ClassFolders", "root": "@dataset_dir",
                               "positive_class": "OPACITY"}}
    common = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
    for stage, extra in (("train", []), ("evaluate", []), ("pseudo_label", ["keep_fraction=0.5", "aals_t=0.3"]),
                         ("mean_teacher", ["ema_decay=0.9"])):
        assert main(["run", stage, "--set", *common, *extra]) in (0, None), stage
    client = mlflow.MlflowClient(settings["tracking_uri"])
    experiment = client.get_experiment_by_name("params").experiment_id
    return settings, {r.info.run_name: r for r in client.search_runs([experiment])}


def _parsed(stage: str, settings: dict, **extra) -> ConfigParser:
    return make_workflow([stage], **settings, **extra).parser


@pytest.mark.slow
def test_params_are_the_settings_the_stage_uses(runs):
    settings, by_name = runs
    suffix = "-lambda0.5-seed0"
    teacher = by_name[f"teacher{suffix}"].data.params
    parser = _parsed("train", settings)
    split = json.loads((Path(settings["output_dir"]) / "split.json").read_text())
    # settings, named by their ids, with the values the config gives them (the override too)
    assert teacher["learning_rate"] == "0.0005" and teacher["labeled_fraction"] == "0.5"
    for key in ("image_size", "crop_size", "batch_size", "seed", "flip_prob", "lr_decay", "rotation_degrees",
                "min_positives", "num_classes", "stage"):
        assert teacher[key] == str(parser.get_parsed_content(key)), key
    # run facts that are no settings
    assert teacher["num_epochs"] == str(parser.get_parsed_content("train#trainer#max_epochs")) == "1"
    assert teacher["dataset_fingerprint"] == split["fingerprint"]
    assert teacher["split_fingerprint"] == split["split_fingerprint"]
    assert teacher["num_labeled"] == str(len(split["labeled"])) and teacher["classes"] == ",".join(split["classes"])
    # never used by the teacher, or bookkeeping
    unused = {"student_epochs", "keep_fraction", "ema_decay", "eval_split", "tta", "checkpoint", "check_settings",
              "run_params", "network"}
    assert not unused & teacher.keys() and not BOOKKEEPING_IDS & teacher.keys()
    # the checkpoint's settings are the same derivation
    record = json.loads((Path(settings["output_dir"]) / "teacher" / "models" / PROVENANCE_FILE).read_text())
    assert {k: str(v) for k, v in record["settings"].items()} == {k: v for k, v in teacher.items()
                                                                  if k not in ("max_epochs", "epoch_length")}

    evaluation = by_name[f"teacher{suffix}-evaluate"].data.params
    assert evaluation["checkpoint"] == str(Path(settings["output_dir"]) / "teacher" / "models" / "model.pt")
    assert evaluation["eval_split"] == "test" and evaluation["tta"] == "ten_crop" and evaluation["stage"] == "teacher"
    assert evaluation["image_size"] == "32" and evaluation["num_epochs"] == "1"
    assert not {"ckpt_path", "flip_prob", "keep_fraction", "val_interval"} & evaluation.keys()

    pseudo = by_name[f"pseudo_label{suffix}"].data.params
    assert pseudo["keep_fraction"] == "0.5" and pseudo["aals_t"] == "0.3" and pseudo["eval_split"] == "unlabeled"
    assert pseudo["teacher_run_id"] == by_name[f"teacher{suffix}"].info.run_id and pseudo["tta"] == "ten_crop"
    assert pseudo["teacher_checkpoint"] == evaluation["checkpoint"] and "checkpoint" not in pseudo

    mean_teacher = by_name[f"mean_teacher{suffix}"].data.params
    assert mean_teacher["ema_decay"] == "0.9" and mean_teacher["aals_t"] == "0.4"  # pseudo_label's aals_t is its own
    assert mean_teacher["num_epochs"] == mean_teacher["mean_teacher_epochs"] == "1"
    assert mean_teacher["init_checkpoint"] == evaluation["checkpoint"]
    assert mean_teacher["num_unlabeled_used"] == str(len(split["unlabeled"]))
    assert not {"keep_fraction", "student_epochs", "init_ckpt"} & mean_teacher.keys()

