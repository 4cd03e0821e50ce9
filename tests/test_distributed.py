"""Real DDP on CPU: torchrun's agent with 2 gloo processes (``--nproc-per-node 2``) against one process.

One pipeline on 2 processes (teacher → pseudo-labels → student → fine-tune, each evaluated) is killed with SIGKILL
in the student's training and resumed; its stages are compared with the same stages on one process. A mean-teacher
stage on 2 processes loses a rank to SIGKILL and resumes under plain ``torchrun -m monai.bundle run``, its EMA
teachers' checksums gathered from both ranks after every epoch. NT-Xent case C checks the gradient of the gather.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import PAUSE_AFTER_EPOCH_1, kill_tree, run_processes, wait_for_pause

from monai_cxr_ssl.distributed import gather_in_order, init_process_group
from monai_cxr_ssl.launch import run_bundle
from monai_cxr_ssl.losses import NTXentLoss
from monai_cxr_ssl.pseudo_labels import read_pseudo_labels
from monai_cxr_ssl.workflow import DEFAULT_BUNDLE

TESTS = Path(__file__).resolve().parent
PROBE = TESTS / "data" / "ddp_probe.json"
SUFFIX = "-lambda0.4-seed0"
PER_RANK_BATCH = 4


def _cli(*args: str, settings: dict) -> list[str]:
    return [sys.executable, "-m", "monai_cxr_ssl.cli", *args, "--set", *(f"{k}={v}" for k, v in settings.items())]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def _workers(output_dir: Path) -> list[int]:
    """pids of live torchrun workers of a stage in ``output_dir`` (their payload names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"monai_cxr_ssl.launch" in cmdline and any(str(output_dir).encode() in part for part in cmdline):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """A 2-process pipeline, killed in the student's epoch 2 and resumed, and the settings of its stages."""
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("ddp")
    # 32 labeled images (4 steps of 8 on one process, of 2 × 4 on two), and odd numbers of unlabeled (47),
    # validation (9) and test (31) images, so that the two ranks' shares differ
    data = make_synthetic_dataset(root / "data", n_train=88, n_test=31, image_size=40, prevalence=0.4, seed=2)
    # no random augmentation (each rank draws its own) and the crop the whole image, so that 2 processes can be
    # compared with one; see test_teacher_on_two_processes_matches_one_process for what still differs
    common = {
        "dataset_dir": data, "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment_name": "ddp",
        "image_size": 32, "crop_size": 32, "flip_prob": 0, "affine_prob": 0, "perspective_prob": 0,
        "batch_size": PER_RANK_BATCH, "labeled_fraction": 0.4, "num_workers": 0, "num_epochs": 2,
        "learning_rate": 0.001,
    }
    out = root / "two"
    settings = {**common, "output_dir": out, "student:num_epochs": 2, "finetune:num_epochs": 1,
                "pause_file": root / "pause", "pause_stage": "student"}
    log = root / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cli("pipeline", "demo", str(PAUSE_AFTER_EPOCH_1), "--nproc-per-node", "2",
                                     settings=settings), cwd=root, stdout=f, stderr=subprocess.STDOUT)
    wait_for_pause(proc, root / "pause", log)
    workers = _workers(out)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)  # the launcher: the pipeline and torchrun's agent in it
    assert proc.wait() == -signal.SIGKILL
    deadline = time.monotonic() + 20
    while _workers(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = _workers(out)
    resumed = run_processes(_cli("pipeline", "demo", str(PAUSE_AFTER_EPOCH_1), "--nproc-per-node", "2",
                                 settings=settings),  # no pause: epoch 1 is behind the resumed student
                            timeout=600, cwd=root)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    return {"root": root, "out": out, "common": common, "orphans": orphans, "stdout": resumed.stdout,
            "killed_log": log.read_text()}


def _said(stdout: str) -> dict[str, str]:
    return {line.split("] ", 1)[1].partition(": ")[0]: line.split("] ", 1)[1].partition(": ")[2]
            for line in stdout.splitlines() if line.startswith("[") and "] " in line}


def test_pipeline_on_two_processes_resumes_after_the_launcher_is_killed(ddp):
    out = ddp["out"]
    assert ddp["orphans"] == [], "workers outlived their killed launcher"
    said = _said(ddp["stdout"])
    for name in ("teacher", "teacher/evaluate", "pseudo_label"):
        assert said[name].startswith("done earlier"), (name, said[name])
    assert said["student"].startswith("resuming an interrupted run")
    assert said["finetune/evaluate"] == "running"
    assert "Resuming from" in ddp["stdout"] + ddp["killed_log"] or (out / "student" / "models" / "model.pt").exists()
    results = json.loads((out / "results.json").read_text())
    assert set(results["auroc"]) == {"teacher", "intermediate", "student"}
    # rank 0 alone wrote: one MLflow run per stage, the killed student's continued rather than duplicated
    client = mlflow.MlflowClient(tracking_uri=ddp["common"]["tracking_uri"])
    experiment = client.get_experiment_by_name("ddp").experiment_id
    runs = client.search_runs([experiment], filter_string=f"attributes.run_name LIKE '%{SUFFIX}%'")
    names = sorted(r.info.run_name for r in runs)
    assert len(names) == len(set(names)) == len(said) + 1, names  # + the pipeline's parent run
    student = next(r for r in runs if r.info.run_name == f"student{SUFFIX}")
    assert student.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(student.info.run_id, "train_loss")] == [1, 2]
    for stage in ("teacher", "student", "finetune"):  # the files of one process: no rank-suffixed or temporary files
        files = sorted(p.name for p in (out / stage / "models").iterdir())
        assert files == ["last.pt", "model.pt", "provenance.json"], (stage, files)
        state = torch.load(out / stage / "models" / "model.pt", weights_only=True)
        assert not any(k.startswith("module.") for k in state), stage
    assert not list(out.rglob("*.tmp"))


def _one_process(ddp, output_dir: Path, configs: list[str], **settings) -> None:
    run_bundle(configs, **{**ddp["common"], "batch_size": 2 * PER_RANK_BATCH, "output_dir": str(output_dir),
                           "experiment_name": "ddp-one", **settings})


def _torchrun(configs: list[str], settings: dict, cwd: Path) -> subprocess.CompletedProcess:
    """Plain ``torchrun --standalone --nproc_per_node=2 -m monai.bundle run`` of bundle config files, every output
    line prefixed with its rank (``--tee 3``)."""
    bundle = Path(DEFAULT_BUNDLE) / "configs"
    files = [p if p.endswith(".json") and "/" in p else str(bundle / f"{p}.json") for p in configs]
    args = [arg for k, v in {**settings, "bundle_root": bundle.parent}.items()
            for arg in (f"--{k}", json.dumps(v) if v is None or isinstance(v, (int, float, list)) else str(v))]
    files.append(str(bundle / "multi_gpu.json"))
    done = run_processes([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--tee", "3", "-m", "monai.bundle", "run", "--config_file", json.dumps(files),
                          "--meta_file", str(bundle / "metadata.json"), *args], timeout=300, cwd=cwd, env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "`broadcast_buffers` is deprecated" not in done.stderr  # data_parallel uses forward_sync_buffers
    return done


def test_teacher_on_two_processes_matches_one_process(ddp, tmp_path):
    """Plain torchrun on 2 processes with batch 4 each against one process with batch 8: the same images in every
    step (``EpochSampler``) and the same gradient average. With BatchNorm the runs differ by design (its batch
    statistics are each rank's 4 images; SyncBatchNorm needs NCCL), so this comparison normalises per image
    (GroupNorm, one group). What is left is float rounding (the ranks sum their halves of the batch, then DDP
    averages), which Adam turns into lr-sized steps for weights whose gradient is near zero: the weights end within
    5% of how far training moved them (1.1% measured) and the validation AUROC is the same."""
    common = {**ddp["common"], "network_def#norm": ["group", {"num_groups": 1}], "experiment_name": "ddp-norm"}
    two, one = tmp_path / "two", tmp_path / "one"
    for folder in (two, one):
        folder.mkdir()
        shutil.copy(ddp["out"] / "split.json", folder / "split.json")
    _torchrun(["train", str(TESTS.parent / "configs" / "demo.json")], {**common, "output_dir": two}, tmp_path)
    run_bundle(["train", "demo"], **{**common, "batch_size": 2 * PER_RANK_BATCH, "output_dir": str(one),
                                    "experiment_name": "ddp-norm-one"})
    two_state, one_state = (torch.load(d / "teacher" / "models" / "last.pt", weights_only=True) for d in (two, one))
    two_w, one_w = two_state["network"], one_state["network"]
    assert two_w.keys() == one_w.keys()
    from monai.utils import set_determinism

    from monai_cxr_ssl.networks import CXRDenseNet121

    set_determinism(seed=0)  # as both runs before they make the network
    init = CXRDenseNet121(num_classes=1, norm=("group", {"num_groups": 1})).state_dict()
    set_determinism(seed=None)
    moved = torch.cat([(one_w[k] - init[k]).reshape(-1) for k in one_w]).norm()
    apart = torch.cat([(two_w[k] - one_w[k]).reshape(-1) for k in one_w]).norm()
    assert 0 < apart < 0.05 * moved, (float(apart), float(moved))
    assert two_state["trainer"]["iteration"] == one_state["trainer"]["iteration"] == 8  # 2 epochs of 4 steps
    assert (two_state["best_checkpoint"]["_saved"][0][0]
            == pytest.approx(one_state["best_checkpoint"]["_saved"][0][0], abs=1e-6))
    # rank 0 alone wrote: one MLflow run, one set of files
    client = mlflow.MlflowClient(tracking_uri=common["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("ddp-norm").experiment_id])
    assert [r.info.run_name for r in runs] == [f"teacher{SUFFIX}"]
    assert sorted(p.name for p in (two / "teacher" / "models").iterdir()) == ["last.pt", "model.pt",
                                                                             "provenance.json"]


def test_evaluation_and_pseudo_labels_on_two_processes_match_one_process(ddp, tmp_path):
    """Ten-crop evaluation and pseudo-labelling of the 2-process teacher, again on one process: the same report and
    rows, with odd numbers of images (the shares of the ranks differ; none lost or duplicated)."""
    out, one = ddp["out"], tmp_path / "one"
    (one / "teacher").mkdir(parents=True)
    shutil.copy(out / "split.json", one / "split.json")
    shutil.copytree(out / "teacher" / "models", one / "teacher" / "models")
    _one_process(ddp, one, ["evaluate", "demo"], stage="teacher")
    _one_process(ddp, one, ["pseudo_label", "demo"])
    two_report = json.loads((out / "teacher" / "test_metrics.json").read_text())
    one_report = json.loads((one / "teacher" / "test_metrics.json").read_text())
    assert two_report["num_images"] == one_report["num_images"] == 31
    assert two_report["positives"] == one_report["positives"]
    assert two_report["mean_auroc"] == pytest.approx(one_report["mean_auroc"], abs=1e-6)
    two_npz, one_npz = (np.load(d / "teacher" / "test_predictions.npz") for d in (out, one))
    np.testing.assert_allclose(two_npz["probs"], one_npz["probs"], atol=1e-6)
    np.testing.assert_array_equal(two_npz["labels"], one_npz["labels"])
    _, two_ids, two_probs, _ = read_pseudo_labels(out / "pseudo_label" / "pseudo_labels.jsonl")
    _, one_ids, one_probs, _ = read_pseudo_labels(one / "pseudo_label" / "pseudo_labels.jsonl")
    split = json.loads((out / "split.json").read_text())
    assert len(two_ids) == split["counts"]["unlabeled"] and len(two_ids) % 2 == 1
    assert two_ids == one_ids == [it["id"] for it in split["unlabeled"]]  # the dataset's order, each once
    np.testing.assert_allclose(two_probs, one_probs, atol=1e-6)
    two_kept, one_kept = (json.loads((d / "pseudo_label" / "filtered.json").read_text()) for d in (out, one))
    assert [(i["id"], i["label"]) for i in two_kept["items"]] == [(i["id"], i["label"]) for i in one_kept["items"]]


def test_mean_teacher_loses_a_rank_then_resumes_under_plain_torchrun(ddp, tmp_path):
    """The EMA teacher is the same on both ranks after every epoch (gathered checksums); SIGKILL of rank 1 stops
    rank 0 within seconds and the launch names rank 1; plain torchrun + monai.bundle resumes the stage."""
    out = ddp["out"]
    probe, pause = tmp_path / "probe", tmp_path / "pause"
    settings = {**ddp["common"], "output_dir": out, "mean_teacher_epochs": 3, "probe_file": probe,
                "pause_file": pause}
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cli("run", "mean_teacher", "demo", str(PROBE), str(PAUSE_AFTER_EPOCH_1),
                                     "--nproc-per-node", "2", settings=settings),
                                cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, env=_env(), text=True)
    wait_for_pause(proc, pause, log, timeout=300)
    os.kill(int(Path(f"{probe}.rank1.pid").read_text()), signal.SIGKILL)
    start = time.monotonic()
    try:
        assert proc.wait(timeout=60) != 0
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail(f"rank 0 did not stop within 60 s of rank 1's death; what they printed:\n"
                    f"{log.read_text()[-6000:]}", pytrace=False)
    assert time.monotonic() - start < 15
    said = log.read_text()
    assert "monai-cxr-ssl: error: stage mean_teacher: rank 1" in said and "Signal 9 (SIGKILL)" in said, said[-3000:]
    assert not _workers(out)

    # the same overlays and settings (they are the stage's: a resume refuses others); epoch 1, the pause, is behind
    done = _torchrun(["train", str(TESTS.parent / "configs" / "demo.json"), str(PROBE), str(PAUSE_AFTER_EPOCH_1),
                      "mean_teacher"], settings, tmp_path)
    assert "Resuming from" in done.stdout + done.stderr
    epochs = [json.loads(line) for line in Path(f"{probe}.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]  # epoch 1 before the kill, 2 and 3 resumed
    for e in epochs:
        teacher0, teacher1 = (r["teacher"] for r in e["ranks"])
        assert teacher0 == teacher1, e  # bit-identical: averaged buffers, the same EMA update on every rank
        assert e["ranks"][0]["student"] == e["ranks"][1]["student"], e
    assert epochs[0]["ranks"][0]["teacher"] != epochs[-1]["ranks"][0]["teacher"]  # the teacher moved


def test_gathered_nt_xent_case_c_per_rank_and_its_gradient(tmp_path):
    out = tmp_path / "case_c"
    done = run_processes([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "--tee", "3", str(TESTS / "ddp_probe.py"), str(out)], timeout=90, env=_env())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for r in (0, 1):  # both ranks left the process group (a deadlock there once hung 1 run in 6)
        assert f"rank {r}: left the process group" in done.stdout, done.stdout
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["loss"] for r in ranks] == pytest.approx([0.078303, 0.255932], abs=1e-6)
    assert [r["without_gathering"] for r in ranks] == pytest.approx([0.001333, 0.179401], abs=1e-6)
    # one process on all four pairs: its loss is the ranks' mean, its weight gradient what DDP averaged
    from ddp_probe import CASE_C

    weight = torch.eye(3, requires_grad=True)
    z1, z2 = (torch.tensor(v) @ weight.T for v in CASE_C)
    loss = NTXentLoss(temperature=0.1)(z1, z2)
    loss.backward()
    assert loss.item() == pytest.approx(0.167118, abs=1e-6) == pytest.approx(np.mean([r["loss"] for r in ranks]))
    for r in ranks:
        np.testing.assert_allclose(r["weight_grad"], weight.grad.numpy(), atol=1e-6)


def test_launch_errors(tmp_path):
    common = {"dataset_dir": tmp_path, "output_dir": tmp_path / "out"}
    for args, expected in ((["--nproc-per-node", "0"], "--nproc-per-node must be a whole number >= 1"),
                           (["--nproc-per-node", "2", "--nnodes", "2"], "need --rdzv-endpoint"),
                           (["--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint",
                             "localhost:29500"], "--node-rank must be in 0..1"),
                           (["--nproc-per-node", "2", "distributed_backend=nccl"], "'nccl' needs CUDA"),
                           (["--nproc-per-node", "2", "distributed_backend=mpi"], "use one of")):
        options = [a for a in args if "=" not in a]
        settings = {**common, **dict(a.split("=") for a in args if "=" in a)}
        done = subprocess.run(_cli("run", "train", "demo", *options, settings=settings), capture_output=True,
                              text=True, timeout=120)
        assert done.returncode != 0 and expected in done.stderr, (args, done.stderr[-1000:])
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        init_process_group("nccl")
    with pytest.raises(ValueError, match="torchrun"):
        init_process_group("gloo")
    assert gather_in_order([3, 1]) == [3, 1]  # one process: as it is


def test_teacher_and_its_evaluation_on_two_machines(ddp, tmp_path):
    """Two "machines" on this one (``--nnodes 2``, one process each, a static rendezvous on loopback): machine 0
    runs the pipeline's first steps (the teacher, its evaluation), keeps the markers, the MLflow runs and the results,
    and orders each step; machine 1 follows and keeps nothing."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(ddp["out"] / "split.json", out / "split.json")
    script = ("import sys, json\nfrom monai_cxr_ssl.launch import Launch\nfrom monai_cxr_ssl.methods import plan\n"
              "from monai_cxr_ssl.pipeline import Pipeline\n"
              "settings = json.loads(sys.argv[2])\n"
              f"launch = Launch(1, 2, int(sys.argv[1]), '127.0.0.1:{port}', 'job-1')\n"
              "print(json.dumps(Pipeline(['demo'], settings, steps=plan()[:2], name='two_machines', "
              "launch=launch).run()))\n")
    settings = json.dumps({k: str(v) if isinstance(v, Path) else v
                           for k, v in {**ddp["common"], "output_dir": out, "num_epochs": 1}.items()})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two "machines" on two cores
    procs = [subprocess.Popen([sys.executable, "-c", script, str(rank), settings], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    deadline = time.monotonic() + 300
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p.pid)
        said = [f"--- machine {rank} ---\n{out[-3000:]}\n{err[-5000:]}"
                for rank, (out, err) in enumerate(p.communicate() for p in procs)]
        pytest.fail("the two machines did not end in 300 s and were killed; what they printed:\n" + "\n".join(said),
                    pytrace=False)
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    said0, said1 = (_said(o[0]) for o in outputs)
    assert said0 == {"teacher": "running", "teacher/evaluate": "running"}, said0
    assert said1 == {"teacher": "running with machine 0", "teacher/evaluate": "running with machine 0"}, said1
    results = json.loads(outputs[0][0].strip().splitlines()[-1])
    report = json.loads((out / "teacher" / "test_metrics.json").read_text())
    assert results["auroc"]["teacher"] == report["mean_auroc"] and report["num_images"] == 31
    assert json.loads(outputs[1][0].strip().splitlines()[-1]) == {}  # machine 1 keeps no results
    assert not (out / "teacher" / ".lock").exists() and sorted(p.name for p in (out / "teacher" / "models").iterdir()) \
        == ["last.pt", "model.pt", "provenance.json"]
