"""The ``monai-cxr-ssl`` command: recorded executed config, clear errors for bad settings, nothing left by a failed
stage."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TINY = ["image_size=40", "crop_size=32", "batch_size=8", "num_workers=0", "num_epochs=1"]


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "monai_cxr_ssl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("cli") / "data", n_train=60, n_test=20, image_size=48)


def test_run_records_executed_config_in_mlflow(data, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    done = _cli(
        "run", "train", "demo", "--set", f"dataset_dir={data}", f"output_dir={out}", f"tracking_uri={uri}",
        "experiment_name=cli", "labeled_fraction=0.5", *TINY, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    executed = json.loads((out / "teacher" / "config_executed.json").read_text())
    assert executed["labeled_fraction"] == 0.5 and executed["num_epochs"] == 1
    assert executed["datasource"]["positive_class"] == "OPACITY"  # the overlay was merged
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config_executed.json", "split.json"}

    # A stage that fails after initialize takes back what it made, not what the teacher stage made before it.
    made = sorted(p.relative_to(out) for p in out.rglob("*"))
    failed = _cli(
        "run", "evaluate", "demo", "--set", f"dataset_dir={data}", f"output_dir={out}", f"tracking_uri={uri}",
        "experiment_name=cli", "labeled_fraction=0.5", "validate#dataloader#batch_size=0", *TINY, cwd=tmp_path,
    )  # a loader the checks do not know: it fails when the evaluation starts
    assert failed.returncode == 2 and "batch_size" in failed.stderr.splitlines()[-1]
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == made  # no config_evaluate.json left


@pytest.mark.parametrize(
    "setting, message",
    [
        ("labeled_fraction=0", "labeled_fraction=0 must be a number in (0, 1]"),
        ("datasource#positive_class=EFFUSION", "class folder 'EFFUSION' not found"),
        ("num_classes=3", "num_classes"),
    ],
)
def test_bad_settings_fail_before_training(data, tmp_path, setting, message):
    out = tmp_path / "out"
    done = _cli(
        "run", "train", "demo", "--set", f"dataset_dir={data}", f"output_dir={out}",
        f"tracking_uri=sqlite:///{tmp_path / 'm.db'}", *TINY, setting, cwd=tmp_path,
    )
    assert done.returncode == 2
    assert message in done.stderr.splitlines()[-1]
    assert not (out / "teacher" / "models").exists()  # nothing trained, nothing half-written
    assert not (out / "teacher" / "config_executed.json").exists() and not (out / "split.json").exists()


def test_only_the_deploy_app_imports_the_monai_deploy_sdk():
    """The base package must work without the deploy extra: no module outside monai_cxr_ssl/deploy imports it."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "monai_cxr_ssl"
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "monai.deploy" or name.startswith("monai.deploy.") for name in names):
                importers.add(path.relative_to(package).parts[0])
    assert importers == {"deploy"}


def test_compare_imports_neither_torch_nor_monai(tmp_path):
    """``compare`` reads MLflow runs only: run on a real SQLite store, the command imports neither torch nor MONAI
    (they take seconds to import; see bench/cli_startup.py for the timings)."""
    import mlflow
    import numpy as np

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cxr", artifact_location=(tmp_path / "artifacts").as_uri())
    labels = np.array([[0], [1], [0], [1], [1], [0]], dtype=np.float32)
    for stage, seed, value in (("teacher", 0, 0.7), ("teacher", 1, 0.8), ("finetune", 0, 0.9)):
        run = client.create_run(experiment, run_name=f"{stage}-lambda0.05-seed{seed}-evaluate").info.run_id
        for key, param in {"stage": stage, "labeled_fraction": 0.05, "seed": seed, "eval_split": "test"}.items():
            client.log_param(run, key, param)
        client.log_metric(run, "test_mean_auroc", value)
        client.log_metric(run, "test_auroc_A", value)
        np.savez(tmp_path / "test_predictions.npz", labels=labels, probs=labels * value)
        client.log_artifact(run, str(tmp_path / "test_predictions.npz"))
        client.set_terminated(run)

    code = ("import json, sys\nfrom monai_cxr_ssl.cli import main\nmain(sys.argv[1:])\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'monai'})))")
    done = subprocess.run(
        [sys.executable, "-c", code, "compare", "cxr", "--tracking-uri", uri, "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| 5% | 0.750 ± 0.071 (n=2) |" in done.stdout  # it did compare: the teacher's mean ± std over 2 seeds
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["output_dir="], "setting output_dir='' must be a path that is not empty or blank"),
        (["output_dir=  "], "setting output_dir='  ' must be a path that is not empty or blank"),
        (["dataset_dir="], "setting dataset_dir='' must be a path"),
        (["output_dir={tmp}/a_file/out"], "lies under {tmp}/a_file, which is a file, not a folder"),
        (["tracking_uri=foo://bar"], "setting tracking_uri='foo://bar': MLflow has no tracking store for the scheme"),
        (["tracking_uri=sqlite:///{tmp}"], "{tmp} is a folder, not a SQLite database file"),
        (["seed"], "'seed' is not of the form key=value"),
        (["val_fraction=0.99"], "val_fraction=0.99 leaves"),
        (["--nproc-per-node", "0"], "--nproc-per-node must be a whole number >= 1"),
        (["{tmp}/broken.json"], "config overlay {tmp}/broken.json: not valid JSON"),
    ],
)
def test_bad_paths_and_arguments_exit_2_with_one_line(data, tmp_path, capsys, args, message):
    """Each bad input stops before any work with exit code 2 and one line naming the setting or file; nothing is
    written, in the output folder or the current one."""
    from monai_cxr_ssl import cli

    (tmp_path / "a_file").write_text("a file")
    (tmp_path / "broken.json").write_text('{"num_epochs": 2,\n')
    args = [a.format(tmp=tmp_path) for a in args]
    options = [a for a in args if a.startswith("--") or a.endswith(".json") or a.isdigit()]
    settings = [a for a in args if a not in options]
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_:
        cli.main(["run", "train", "demo", *options, "--set", f"dataset_dir={data}", f"output_dir={tmp_path / 'out'}",
                  *TINY, *settings])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("monai-cxr-ssl: error: ") and message.format(tmp=tmp_path) in err[-1], err[-3:]
    assert "Traceback" not in "\n".join(err)
    assert sorted(tmp_path.iterdir()) == before  # no split.json, no stage folder, no store


def test_compare_refuses_a_folder_as_its_sqlite_store(tmp_path):
    done = _cli("compare", "cxr", "--tracking-uri", f"sqlite:///{tmp_path}", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path} is a folder, not a SQLite database file" in done.stderr.splitlines()[-1]
