"""S²MTS² pre-training (``pretrain=s2mts2_pretrain``): the queue and the λ ramp by hand, the settings' checks, the
queue on 2 gloo processes (the same on both ranks after every step, filled with every rank's key means in rank
order), the stage resumed after SIGKILL equal to a straight run (query and key encoders, queue and pointer), and
the method s2mts2 on multi-label data killed during its fine-tuning. The joint contrastive loss's known answers are
in test_losses.py; the MSE consistency's in test_mean_teacher.py."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAUSE_AFTER_EPOCH_1, bundle_error, kill_after_epoch_1, run_processes

from monai_cxr_ssl.methods.s2mts2.engine import JointLambda, KeyQueue, check_queue, full_batches

TESTS = Path(__file__).resolve().parent
TINY = {"image_size": 40, "crop_size": 32, "batch_size": 4, "labeled_fraction": 0.5, "num_workers": 0,
        "num_epochs": 2, "queue_size": 32, "learning_rate": 0.01}


def test_the_queue_writes_in_turn_and_counts_what_it_holds():
    queue = KeyQueue(size=6, dim=2)
    assert queue.entries.shape == (0, 2)
    queue.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    queue.enqueue(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert int(queue.pointer) == 4 and int(queue.filled) == 4 and int(queue.steps) == 2
    assert queue.entries.tolist() == [[1, 0], [0, 1], [2, 0], [0, 2]]
    queue.enqueue(torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
    queue.enqueue(torch.tensor([[4.0, 0.0], [0.0, 4.0]]))  # overwrites the oldest two
    assert int(queue.pointer) == 2 and int(queue.filled) == 6
    assert queue.keys.tolist() == [[4, 0], [0, 4], [2, 0], [0, 2], [3, 0], [0, 3]]
    restored = KeyQueue(size=6, dim=2)
    restored.load_state_dict(queue.state_dict())  # a checkpoint holds the rows, the pointer and the count
    assert torch.equal(restored.keys, queue.keys) and int(restored.pointer) == 2 and int(restored.steps) == 4
    with pytest.raises(ValueError, match="4 keys do not divide the queue's 6 rows"):
        queue.enqueue(torch.zeros(4, 2))


def test_lambda_ramps_as_the_released_code_and_the_sizes_are_checked():
    from monai_cxr_ssl.losses import JointContrastiveLoss

    ramp = JointLambda(JointContrastiveLoss(), lam=2.0, epochs=4)
    assert [ramp.value(e) for e in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 2.0]  # 2·(e + 1)/E with e from 0
    assert JointLambda(JointContrastiveLoss(), lam=2.0, epochs=4, ramp=False).value(1) == 2.0
    check_queue(64, 8, world_size=2)
    with pytest.raises(ValueError, match=r"queue_size=60 must be a multiple of .* 2 x 8 = 16"):
        check_queue(60, 8, world_size=2)
    assert full_batches(37, 4, world_size=2) == 32
    with pytest.raises(ValueError, match="7 images to learn from, fewer than one batch on every process"):
        full_batches(7, 4, world_size=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("s2mts2")
    return make_synthetic_dataset(root / "data", n_train=40, n_test=16, image_size=40, prevalence=0.4, seed=6)


def _settings(data: Path, out: Path, **more) -> dict:
    return {**TINY, "dataset_dir": str(data), "output_dir": str(out), "experiment_name": "s2mts2",
            "tracking_uri": f"sqlite:///{out.parent / (out.name + '.db')}", **more}


def _cli(*args: str, settings: dict) -> list[str]:
    return [sys.executable, "-m", "monai_cxr_ssl.cli", *args, "--set", *(f"{k}={v}" for k, v in settings.items())]


@pytest.mark.parametrize(("setting", "message"), [
    ({"queue_size": 30}, "queue_size=30 must be a multiple of the keys one step adds"),
    ({"key_views": 0}, "key_views=0 must be a whole number >= 1"),
    ({"temperature": 0}, "temperature=0 must be a number > 0"),
    ({"joint_lambda": -1}, "joint_lambda=-1 must be a number >= 0"),
    ({"batch_size": 64}, "fewer than one batch"),
])
def test_bad_settings_stop_before_any_work(data, tmp_path, setting, message):
    out = tmp_path / "out"
    error = bundle_error(["s2mts2_pretrain", "demo"], _settings(data, out, **setting))
    assert isinstance(error, ValueError) and re.search(message, str(error)), error
    assert not (out / "s2mts2_pretrain" / "models").exists()


@pytest.mark.slow
def test_the_queue_is_every_rank_s_key_means_in_rank_order_on_both_ranks(data, tmp_path):
    settings = _settings(data, tmp_path / "two", num_epochs=1, probe_file=str(tmp_path / "queue"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = _cli("run", "s2mts2_pretrain", "demo", str(TESTS / "data" / "queue_probe.json"), "--nproc-per-node", "2",
               settings=settings)
    done = run_processes(cmd, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"queue.rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= 3  # steps of 2 x 4 keys: the 32-row queue wraps after 4
    pointer = 0
    for step, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert torch.equal(a["keys"], b["keys"]) and a["pointer"] == b["pointer"], step  # the same queue
        added = a["keys"][pointer:pointer + 8]
        assert torch.equal(added, torch.cat([a["means"], b["means"]])), step  # rank 0's means, then rank 1's
        assert not torch.equal(a["means"], b["means"])  # each rank encodes its own images
        pointer = (pointer + 8) % 32
        assert a["pointer"] == pointer and a["filled"] == min(8 * (step + 1), 32)


@pytest.mark.slow
def test_killed_stage_resumes_to_the_straight_run(data, tmp_path):
    """SIGKILL after epoch 1 and the same command again: the query network, the key encoder, the queue and its
    pointer end as a straight run's, bit for bit."""
    import mlflow

    from monai_cxr_ssl.launch import run_bundle

    straight = _settings(data, tmp_path / "straight")
    run_bundle(["s2mts2_pretrain", "demo"], **straight)
    killed = _settings(data, tmp_path / "killed", pause_file=str(tmp_path / "pause"))
    cmd = _cli("run", "s2mts2_pretrain", "demo", str(PAUSE_AFTER_EPOCH_1), settings=killed)
    kill_after_epoch_1(cmd, tmp_path, tmp_path / "pause", timeout=300)
    done = run_processes(cmd, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "Resuming from" in done.stdout + done.stderr, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "s2mts2_pretrain" / "models" / "last.pt", weights_only=False)
            for d in ("straight", "killed"))
    for part in ("network", "key_network", "queue"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert int(a["queue"]["filled"]) == 32 and int(a["queue"]["steps"]) > 8  # two epochs went into it

    client = mlflow.MlflowClient(tracking_uri=straight["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("s2mts2").experiment_id])
    history = {m: [p.value for p in client.get_metric_history(run.info.run_id, m)] for m in (
        "train_loss", "contrastive_accuracy", "queue_fill", "joint_lambda", "embedding_std")}
    assert history["joint_lambda"] == [1.0, 2.0]  # 2 x epoch / epochs
    assert all(len(values) == 2 for values in history.values()), history


@pytest.mark.slow
def test_pretrain_s2mts2_then_the_mean_teacher(data, tmp_path):
    """``pretrain=s2mts2_pretrain method=mean_teacher`` end to end: the stage starts another method's teacher, its
    columns composed."""
    from monai_cxr_ssl.pipeline import Pipeline

    settings = _settings(data, tmp_path / "out", num_epochs=1)
    results = Pipeline(["demo"], settings, echo=lambda line: None, method="mean_teacher",
                       pretrain="s2mts2_pretrain").run()
    assert list(results["auroc"]) == ["s2mts2_pretrain + teacher", "s2mts2_pretrain + mean teacher"]
    assert results["pretrain"] == "s2mts2_pretrain" and (tmp_path / "out" / "results-s2mts2_pretrain-mean_teacher.json"
                                                         ).is_file()


def test_the_s2mts2_method_plans_its_own_pre_training():
    from monai_cxr_ssl import methods

    steps = methods.plan(method="s2mts2")
    assert [s.name for s in steps] == ["s2mts2_pretrain", "teacher", "teacher/evaluate", "s2mts2", "s2mts2/evaluate"]
    assert [s.column for s in steps if s.column] == ["s2mts2_pretrain + teacher", "s2mts2"]
    fine_tuning = steps[3].settings
    assert (fine_tuning["consistency"], fine_tuning["consistency_rampup"], fine_tuning["aals_a0"]) == (
        "mse", "linear", 1.0)
    with pytest.raises(ValueError, match="the s2mts2 method runs its own pre-training 's2mts2_pretrain'"):
        methods.plan(method="s2mts2", pretrain="simclr")


def _multi_label_csv(root: Path) -> Path:
    """60 generated images, three classes: the generator's opacity and two others drawn at random."""
    import numpy as np

    from monai_cxr_ssl.data import make_synthetic_dataset

    data = Path(make_synthetic_dataset(root / "images", n_train=60, n_test=2, image_size=40, prevalence=0.4, seed=8))
    rng = np.random.default_rng(0)
    rows = ["image,Opacity,Effusion,Nodule"]
    for path in sorted((data / "train").glob("*/*.png")):
        rows.append(f"{path.relative_to(data)},{int(path.parent.name == 'OPACITY')},{int(rng.random() < 0.4)},"
                    f"{int(rng.random() < 0.3)}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data / "labels.csv"


@pytest.mark.slow
def test_the_s2mts2_method_on_multi_label_data_killed_during_fine_tuning(tmp_path):
    """``method=s2mts2`` end to end on three classes, killed (SIGKILL) after the fine-tuning's first epoch and
    resumed; the test AUROC per class is scikit-learn's on the saved predictions, the mean over the defined ones. The
    teacher (learning rate 1e-12) shows where it started: the query network's encoder, tensor by tensor."""
    import json

    import numpy as np
    from sklearn.metrics import roc_auc_score

    source = {"_target_": "monai_cxr_ssl.data.CsvSource", "csv_path": str(_multi_label_csv(tmp_path)),
              "label_columns": ["Opacity", "Effusion", "Nodule"]}
    out = tmp_path / "out"
    settings = {**_settings(Path("unused"), out, num_epochs=1, mean_teacher_epochs=2, pause_file=tmp_path / "pause",
                            pause_stage="s2mts2", method="s2mts2", **{"teacher:learning_rate": 1e-12}),
                "datasource": json.dumps(source)}
    del settings["dataset_dir"]
    cmd = [*_cli("pipeline", "demo", str(PAUSE_AFTER_EPOCH_1), settings={}), *(f"{k}={v}" for k, v in
                                                                           settings.items())]
    kill_after_epoch_1(cmd, tmp_path, tmp_path / "pause")
    assert not (out / "s2mts2" / ".mean_teacher.done.json").exists()
    done = run_processes(cmd, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = {line.split("] ", 1)[1].split(": ", 1)[0]: line.split(": ", 1)[1]
            for line in done.stdout.splitlines() if line.startswith("[")}
    assert all(said[s].startswith("done earlier") for s in ("s2mts2_pretrain", "teacher", "teacher/evaluate"))
    assert said["s2mts2"].startswith("resuming an interrupted run") and said["s2mts2/evaluate"] == "running"

    results = json.loads((out / "results-s2mts2.json").read_text())
    assert list(results["auroc"]) == ["s2mts2_pretrain + teacher", "s2mts2"]
    report = json.loads((out / "s2mts2" / "test_metrics.json").read_text())
    saved = np.load(out / "s2mts2" / "test_predictions.npz")
    classes = json.loads((out / "split.json").read_text())["classes"]
    assert len(classes) == 3 and saved["probs"].shape[1] == 3
    defined = [k for k in range(3) if 0 < saved["labels"][:, k].sum() < len(saved["labels"])]
    for k, name in enumerate(classes):
        expected = roc_auc_score(saved["labels"][:, k], saved["probs"][:, k]) if k in defined else None
        assert report["auroc"][name] == pytest.approx(expected), name
    assert results["auroc"]["s2mts2"] == pytest.approx(np.mean([report["auroc"][classes[k]] for k in defined]))
    state = torch.load(out / "s2mts2" / "models" / "last.pt", weights_only=False)["trainer"]
    assert state["iteration"] == 2 * state["epoch_length"]
    query = torch.load(out / "s2mts2_pretrain" / "models" / "model.pt", weights_only=True)
    teacher = torch.load(out / "teacher" / "models" / "model.pt", weights_only=True)
    encoder = [k for k in query if k.startswith("features.") and k.endswith((".weight", ".bias"))]
    assert len(encoder) > 300
    for key in encoder:
        torch.testing.assert_close(teacher[key], query[key], atol=1e-8, rtol=0)
