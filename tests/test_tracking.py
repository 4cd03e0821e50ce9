"""The stages' MLflow runs (monai_cxr_ssl.handlers.MLFlowRunHandler, monai_cxr_ssl.tracking): a killed run no
longer captures later runs of the same name, and training goes on through an outage of a real ``mlflow server``
on loopback, its tracking calls sent when the run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import PAUSE_AFTER_EPOCH_1, wait_for_pause

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "bundles" / "cxr_classifier" / "configs" / "train.json", REPO / "configs" / "demo.json"]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TINY = {"image_size": 40, "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.5, "num_workers": 0}
RUN_NAME = "teacher-lambda0.5-seed0"


def _bundle_run(cwd: Path, *overlays: Path, **args) -> list[str]:
    files = [str(p) for p in [*CONFIGS, *overlays]]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files)]
    for key, value in {**TINY, **args}.items():
        cmd += [f"--{key}", str(value)]
    return cmd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tracking") / "data", n_train=40, n_test=10, image_size=48)


def test_a_killed_run_does_not_capture_later_runs(data, tmp_path):
    """MONAI's handler continued the oldest unfinished run of its name: after a killed run, every later run with
    a changed setting failed with "Changing param values is not allowed", in any folder and with resume false."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = {"dataset_dir": data, "tracking_uri": uri, "experiment_name": "killed", "num_epochs": 2}
    first, pause = tmp_path / "first", tmp_path / "pause"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_bundle_run(tmp_path, PAUSE_AFTER_EPOCH_1, **common, output_dir=first,
                                            pause_file=pause), cwd=tmp_path, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)
    wait_for_pause(proc, pause, tmp_path / "killed.log")  # killed after epoch 1, at a known point
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed = json.loads((first / "teacher" / "mlflow_run.json").read_text())["run_id"]

    for args in ({"output_dir": tmp_path / "second", "learning_rate": 0.001},
                 {"output_dir": first, "learning_rate": 0.001, "num_epochs": 1, "resume": False}):
        done = subprocess.run(_bundle_run(tmp_path, **{**common, **args}), cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    client = mlflow.MlflowClient(uri)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("killed").experiment_id])}
    assert len(runs) == 3
    assert runs[killed].info.status == "KILLED" and runs[killed].info.run_name == RUN_NAME + "-superseded"
    assert runs[killed].data.params["learning_rate"] == "0.0003"  # demo.json's
    new = [r for r in runs.values() if r.info.run_id != killed]
    assert [r.info.run_name for r in new] == [RUN_NAME] * 2
    for run in new:
        assert run.info.status == "FINISHED" and run.data.params["learning_rate"] == "0.001"
    restarted = json.loads((first / "teacher" / "mlflow_run.json").read_text())["run_id"]
    assert restarted in runs and restarted != killed and runs[restarted].data.params["num_epochs"] == "1"

    # no image (patient) identifiers in params or tags
    split = json.loads((first / "split.json").read_text())
    names = {Path(item["id"]).stem for key in ("labeled", "unlabeled", "validation", "test") for item in split[key]}
    for run in runs.values():
        logged = json.dumps([run.data.params, run.data.tags])
        assert not [n for n in names if n in logged], run.info.run_name


def test_training_goes_on_while_the_tracking_server_is_down(data, tmp_path, mlflow_server):
    out, pause = tmp_path / "out", tmp_path / "pause"
    cmd = _bundle_run(tmp_path, PAUSE_AFTER_EPOCH_1, dataset_dir=data, output_dir=out,
                      tracking_uri=mlflow_server.uri, experiment_name="outage", num_epochs=2, pause_file=pause)
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    record = out / "teacher" / "mlflow_run.json"
    wait_for_pause(proc, pause, log_file)  # epoch 1 is on the server; the run waits while the server goes away
    assert record.exists()
    mlflow_server.stop()
    Path(f"{pause}.release").touch()
    assert proc.wait(timeout=600) == 0, log_file.read_text()[-3000:]
    log = log_file.read_text()
    warnings = [line for line in log.splitlines() if " - monai_cxr_ssl - WARNING - " in line]
    assert len(warnings) == 2, log[-3000:]  # the outage, and where the calls stay
    # no stack trace, and no retries: MLflow's default 7 retries with back-off blocked every call for 4 minutes
    assert "Traceback" not in log and "Retrying" not in log
    assert "unreachable (" in warnings[0] and "tracking calls stay in" in warnings[1]
    trainer = __import__("torch").load(out / "teacher" / "models" / "last.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] // trainer["epoch_length"] == 2  # training finished without the server
    pending = out / "teacher" / "mlflow_pending.jsonl"
    assert pending.stat().st_size > 0

    mlflow_server.start()
    # the same command again: training is finished, the stage resumes its run and sends what it kept
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not pending.exists()
    client = mlflow.MlflowClient(mlflow_server.uri)
    run_id = json.loads(record.read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == RUN_NAME
    for key in ("train_loss", "val_auroc"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert run.data.params["num_epochs"] == "2" and "split.json" in {a.path for a in client.list_artifacts(run_id)}
    assert len(client.search_runs([run.info.experiment_id])) == 1
