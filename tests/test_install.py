"""The bundle as MONAI's tools see it: workflow types and ``check_properties``; where the bundle and overlays are
found (the repository in a checkout, the package data in an installed wheel: .ci/wheel_test.sh builds and runs
that)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, OVERLAYS_DIR, REPO_ROOT, make_workflow

TINY = {"image_size": 40, "crop_size": 32, "batch_size": 8, "num_workers": 0, "num_epochs": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("install") / "data", n_train=40, n_test=20, image_size=40)


def _initialised(configs, tmp_path, data, bundle=DEFAULT_BUNDLE, **overrides):
    """A workflow of ``configs`` with its config parsed; ``initialize=[]`` skips the stage's own initialisation
    (checkpoint loading, the output lock): the property check is about the config's ids."""
    workflow = make_workflow(configs, bundle, dataset_dir=str(data), output_dir=str(tmp_path / "out"),
                             tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", initialize=[], **overrides)
    workflow.initialize()
    return workflow


@pytest.mark.parametrize(
    "configs, workflow_type, engine",
    [
        (["train", "demo"], "train", "train#trainer"),
        (["mean_teacher", "demo"], "train", "train#trainer"),
        (["evaluate", "demo"], "infer", "validate#evaluator"),
        (["pseudo_label", "demo"], "infer", "validate#evaluator"),
        (["inference"], "infer", "evaluator"),
    ],
)
def test_workflows_pass_monai_property_checks(configs, workflow_type, engine, tmp_path, data):
    workflow = _initialised(configs, tmp_path, data, **({"num_workers": 0} if configs == ["inference"] else TINY))
    assert workflow.workflow_type == workflow_type
    assert workflow.check_properties() == []  # no required property missing, no optional one with a wrong id
    # MONAI's property names reach this bundle's engine: the trainer of a training workflow, the evaluator else
    name = "trainer" if workflow_type == "train" else "evaluator"
    assert getattr(workflow, name) is workflow.parser.get_parsed_content(engine)


def test_a_missing_required_property_is_reported(tmp_path, data):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    train = json.loads((bundle / "configs" / "train.json").read_text())
    del train["train"]["trainer"]
    (bundle / "configs" / "train.json").write_text(json.dumps(train))
    workflow = _initialised(["train", "demo"], tmp_path, data, bundle=bundle, **TINY)
    assert workflow.workflow_type == "train"
    assert workflow.check_properties() == ["trainer", "max_epochs"]  # max_epochs is train#trainer#max_epochs


def test_a_checkout_uses_its_bundle_and_overlays_folders():
    assert DEFAULT_BUNDLE == REPO_ROOT / "bundles" / "cxr_classifier" and OVERLAYS_DIR == REPO_ROOT / "configs"
    for flag, folder in (([], DEFAULT_BUNDLE), (["--overlays"], OVERLAYS_DIR)):
        done = subprocess.run([sys.executable, "-m", "monai_cxr_ssl.cli", "bundle-path", *flag], capture_output=True,
                              text=True, timeout=120, check=True)
        assert done.stdout.strip() == str(folder)
