"""One run per output folder (monai_cxr_ssl.locking): refused second runs name the holder, a killed holder's lock
is free again, the pipeline's in-process stages re-enter it, and a fresh MLflow store survives concurrent first
uses. All with real concurrent processes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PAUSE_AFTER_EPOCH_1

from monai_cxr_ssl.locking import FolderInUseError, lock_output_dir, output_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HOLD = """import sys, time
from monai_cxr_ssl.locking import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path, caplog):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        with pytest.raises(FolderInUseError, match=rf"is in use by another run: pid {holder.pid} on .*-c"):
            with output_lock(out):
                pass
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):
            lock_output_dir(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # a killed holder cannot release; the kernel does, and the next run says whose run it was
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        with output_lock(out):
            assert f'"pid": {os.getpid()}' in (out / ".lock").read_text()
    assert f"the previous run here (pid {holder.pid} on" in caplog.text
    assert not (out / ".lock").exists()  # a clean release leaves no lock file behind


def test_the_lock_is_reentrant_in_one_process_and_free_after(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with output_lock(out):  # the pipeline's lock around its in-process stages, each taking it again
            lock_output_dir(out)  # a stage's initialize: this process holds it already
        assert subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(out)], env=ENV,
                              capture_output=True, timeout=120).returncode == 1
    done = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(out)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "held\n"


def test_every_entry_point_refuses_a_locked_output_folder(tmp_path):
    """Plain ``python -m monai.bundle run`` of a stage, and ``monai-cxr-ssl run/pipeline/sweep``: refused before
    touching data, with one line naming the holder (this test's process)."""
    out = tmp_path / "out"
    settings = [f"dataset_dir={tmp_path / 'no-data'}", f"output_dir={out}",
                f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "num_workers=0"]
    with output_lock(out):
        bundle = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file",
             repr([str(REPO / "bundles/cxr_classifier/configs/train.json"), str(REPO / "configs/demo.json")]),
             *(f"--{s.replace('=', ' ', 1)}".split(" ", 1)[i] for s in settings for i in (0, 1))],
            env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert bundle.returncode != 0
        assert f"{out}: the output folder is in use by another run: pid {os.getpid()}" in bundle.stderr
        cli = subprocess.run([sys.executable, "-c", f"""
from monai_cxr_ssl.cli import main
for command in (["run", "train"], ["pipeline"], ["sweep", "--lambdas", "0.5"]):
    try:
        main([command[0], "demo", *command[1:], "--set", *{settings!r}])
    except SystemExit as e:
        print("exit", command[0], e.code)
"""], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    exits = [line.split()[1:] for line in cli.stdout.splitlines() if line.startswith("exit ")]
    assert exits == [["run", "2"], ["pipeline", "2"], ["sweep", "2"]], cli.stderr[-3000:]
    errors = [line for line in cli.stderr.splitlines() if line.startswith("monai-cxr-ssl")]
    assert len(errors) == 3 and all(
        e.startswith(f"monai-cxr-ssl: error: {out}: the output folder is in use by another run: pid {os.getpid()}")
        for e in errors), errors
    assert not (tmp_path / "no-data").exists() and not out.exists()  # nothing written there; released: no lock file


def test_a_failed_plain_bundle_run_leaves_no_lock_behind(tmp_path):
    """Plain ``python -m monai.bundle run`` with a positive class the folders do not have: it fails after taking the
    lock; its exit releases it and removes the lock file and the output folder it made and left empty."""
    import numpy as np
    from PIL import Image

    for split, name in (("train", "NORMAL"), ("train", "PNEUMONIA"), ("test", "NORMAL"), ("test", "PNEUMONIA")):
        (tmp_path / "data" / split / name).mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "data" / split / name / "a.png")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         repr([str(REPO / "bundles/cxr_classifier/configs/train.json"), str(REPO / "configs/demo.json")]),
         "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(out),
         "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode != 0 and "class folder 'OPACITY' not found" in done.stderr, done.stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_concurrent_runs_on_a_fresh_store(tmp_path):
    """Two identical runs on one folder and a third elsewhere, started together on a fresh MLflow store: one of
    the two is refused, the others train, and nobody crashes in MLflow's schema migration."""
    import mlflow

    from monai_cxr_ssl.data import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_train=40, n_test=10, image_size=48)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    pause = tmp_path / "pause"

    def start(out: str, *paused: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "monai_cxr_ssl.cli", "run", "train", "demo", *paused[:1], "--set",
             f"dataset_dir={data}", f"output_dir={tmp_path / out}", f"tracking_uri={uri}", "experiment_name=lock",
             "image_size=40", "crop_size=32", "batch_size=8", "num_workers=0", "num_epochs=1",
             "labeled_fraction=0.5", *paused[1:]],
            env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )

    # The holder of "same" waits after its epoch, the folder locked however fast the machine, until the other run
    # on "same" has ended (refused).
    paused = (str(PAUSE_AFTER_EPOCH_1), f"pause_file={pause}")
    procs = [start("same", *paused), start("same", *paused), start("other")]
    deadline = time.monotonic() + 600
    while not Path(f"{pause}.reached").exists() or all(p.poll() is None for p in procs[:2]):
        assert any(p.poll() is None for p in procs[:2]) and time.monotonic() < deadline, "no run held 'same'"
        time.sleep(0.05)
    Path(f"{pause}.release").touch()
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results[:2])
    assert codes == [0, 2] and results[2][0] == 0, [e[-2000:] for _, e in results]
    refused = next(err for code, err in results[:2] if code == 2)
    assert f"{tmp_path / 'same'}: the output folder is in use by another run: pid " in refused.splitlines()[-1]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lock").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
