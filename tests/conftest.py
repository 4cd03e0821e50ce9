"""Shared pytest fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from monai_cxr_ssl.launch import omp_num_threads

# The real data beside the repository; MONAI_CXR_SSL_SHARED_DATA points elsewhere (a missing folder shows what a clean
# clone runs).
SHARED_DATA = Path(os.environ.get("MONAI_CXR_SSL_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))
# pytest-xdist's workers (`make test`) share the cores as torchrun's processes do: each worker's torch, and the
# processes its tests start, get CPUs / workers threads (two tiny pipelines side by side on 2 cores took 101 s with 2
# threads each, 29 s with 1). Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ["OMP_NUM_THREADS"] = omp_num_threads(int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
# A training overlay: after epoch 1 (its last.pt written) the run touches ``<pause_file>.reached`` and waits, up to
# 10 minutes, for ``<pause_file>.release``; a test kills it or releases it there, at a known point, with no race.
PAUSE_AFTER_EPOCH_1 = Path(__file__).resolve().parent / "data" / "pause_after_epoch_1.json"


# The test files that take minutes, longest first, run before the others: `make test`'s workers (pytest-xdist,
# --dist loadfile --no-loadscope-reorder) take whole files in this order, so no long file is left running alone at
# the end while the other worker idles.
LONG_FILES = ("test_distributed.py", "test_readme.py", "test_pipeline.py", "test_s2mts2.py", "test_simclr.py",
              "test_ssl_gan.py", "test_mean_teacher_bundle.py", "test_tracking.py")


def pytest_collection_modifyitems(items: list) -> None:
    """The ``LONG_FILES`` first; a file's tests stay together and in their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def shared_path(*parts: str) -> Path:
    """A path under the real-data folder; the test skips, naming it and how to point elsewhere, when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set MONAI_CXR_SSL_SHARED_DATA to the folder that holds it)")
    return path


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder beside the repository; tests that use it skip when it is absent."""
    return shared_path()


def wait_for_pause(proc: subprocess.Popen, pause_file: Path, log: Path | None = None, timeout: float = 600) -> None:
    """Wait until a run started with ``PAUSE_AFTER_EPOCH_1`` and ``pause_file`` holds after epoch 1; ``log`` (its
    output, every rank's for a multi-process run) is quoted when it ends first or does not pause in time."""
    reached = Path(f"{pause_file}.reached")
    deadline = time.monotonic() + timeout
    while not reached.exists():
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"the run ended (exit {proc.returncode}) before it paused after epoch 1\n{tail}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)  # with its workers, if it has any
            tail = log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else ""
            pytest.fail(f"the run did not reach the end of epoch 1 in {timeout} s and was killed with its processes; "
                        f"what they printed:\n{tail}", pytrace=False)
        time.sleep(0.05)


def kill_after_epoch_1(cmd: list[str], cwd: Path, pause_file: Path, timeout: float = 600) -> None:
    """Start ``cmd`` (run with ``PAUSE_AFTER_EPOCH_1`` and ``pause_file``), wait until it holds after epoch 1 and
    kill it with SIGKILL: a run interrupted where nothing can clean up."""
    log = Path(cwd) / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    wait_for_pause(proc, pause_file, log, timeout=timeout)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def bundle_error(configs: list[str], settings: dict) -> BaseException:
    """The error at the root of a bundle run's failure (an ``initialize`` step's arrives wrapped by MONAI)."""
    from monai_cxr_ssl.launch import run_bundle

    with pytest.raises(Exception) as info:  # noqa: PT011 (any wrapper; the root cause is returned)
        run_bundle(configs, **settings)
    cause = info.value
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return cause


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.extend(kids := children.get(todo.pop(), []))
        todo.extend(kids)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_processes(cmd: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
    """Run a command that starts several processes (torchrun, ``--nproc-per-node``) and return what it printed.
    Past ``timeout`` seconds it is killed with every process below it and the test fails with what they all printed
    (a hung rank shows the step it reached), instead of waiting or leaving orphans that hold the pipes."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **popen)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        hung = proc.poll() is None
        kill_tree(proc.pid)  # also the workers of a launcher that ended with them still running
        proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if hung:
        pytest.fail(f"{' '.join(map(str, cmd))[:300]} did not end in {timeout} s and was killed with its processes; "
                    f"what they printed:\n--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-10000:]}",
                    pytrace=False)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def radiograph_dicom(pixels, modality: str = "DX", **elements):
    """A Part-10 CR/DX image of the chest with the identity and study tags a PACS export carries (8-bit
    MONOCHROME2), for tests that cannot rely on the real DICOM files."""
    import numpy as np
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = {"DX": pydicom.uid.DigitalXRayImageStorageForPresentation,
                 "CR": pydicom.uid.ComputedRadiographyImageStorage}.get(modality, pydicom.uid.CTImageStorage)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "PID-0042", "19700101", "F"
    ds.StudyID, ds.StudyDate, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "20240101", "ACC-7", "Roe^R"
    ds.set_pixel_data(np.asarray(pixels, dtype=np.uint8), "MONOCHROME2", 8)
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def reference_ten_crop_probabilities(net, images, crop: int):
    """Mean sigmoid over the ten crops (four corners, centre, and their horizontal flips) of (B, 1, H, W) images,
    written out here by slicing, independently of the package's ten-crop code."""
    import torch

    height, width = images.shape[-2:]
    top, left = round((height - crop) / 2), round((width - crop) / 2)
    offsets = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop), (top, left)]
    crops = [images[..., y:y + crop, x:x + crop] for y, x in offsets]
    crops += [torch.flip(c, dims=[-1]) for c in crops]
    with torch.no_grad():
        return torch.stack([torch.sigmoid(net(c)) for c in crops]).mean(dim=0)


class MlflowServer:
    """A real ``mlflow server`` on loopback (a free port, its own SQLite store) that a test can stop, as when its
    machine goes away, and start again on the same store and port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.uri = f"http://127.0.0.1:{s.getsockname()[1]}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts"), "--host", "127.0.0.1",
             "--port", self.uri.rsplit(":", 1)[1], "--workers", "1"],
            # without MLflow's job runner: eight huey processes the tests never use (machine CPU over a start and 15 s:
            # 39.4 and 37.2 s with it, 10.1 and 8.3 s without)
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("mlflow server did not start on loopback")
                time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    """A started ``MlflowServer``, stopped after the test."""
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    server.stop()


def checkpoint_probabilities(checkpoint: Path, images: list, image_size: int, crop_size: int):
    """Ten-crop probabilities (N, K) of a stage's ``model.pt`` on image files, loaded as the bundle loads them
    (LoadCXRImaged, area resize) and cropped by ``reference_ten_crop_probabilities``: the independent value a
    stage's saved predictions and AUROC are checked against."""
    import torch
    from monai.transforms import Compose, Resized

    from monai_cxr_ssl.data import LoadCXRImaged
    from monai_cxr_ssl.networks import CXRDenseNet121

    state = torch.load(checkpoint, weights_only=True)
    net = CXRDenseNet121(num_classes=state["class_layers.out.weight"].shape[0])
    net.load_state_dict(state)
    net.eval()
    load = Compose([LoadCXRImaged("image"), Resized("image", [image_size] * 2, mode="area")])
    x = torch.stack([torch.as_tensor(load({"image": str(p)})["image"]) for p in images])
    return reference_ten_crop_probabilities(net, x, crop_size).numpy()


def deploy_on_a_radiograph(model: Path, tmp_path: Path) -> dict:
    """Run the deploy app with ``model`` on a generated chest radiograph (a DX DICOM: two dark lungs on a brighter
    body) in ``tmp_path/study`` and return its ``result.json``; the test fails with the app's output if it fails."""
    import json

    import numpy as np

    yy, xx = np.mgrid[:64, :64] / 63.0
    lungs = np.exp(-(((xx - 0.3) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2)) + np.exp(
        -(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2))
    (tmp_path / "study").mkdir()
    radiograph_dicom(np.clip(200 - 120 * lungs + 30 * yy, 0, 255), "DX").save_as(tmp_path / "study" / "image.dcm")
    done = subprocess.run([sys.executable, "-m", "monai_cxr_ssl.deploy", "-i", str(tmp_path / "study"), "-o",
                           str(tmp_path / "result"), "-m", str(model)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp_path / "result" / "result.json").read_text())
