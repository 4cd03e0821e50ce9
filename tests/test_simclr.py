"""SimCLR pre-training (``pretrain=simclr``): the contrastive metrics and the network against values by hand, the
two-view augmentation, the settings' checks, the stage resumed after SIGKILL equal to a straight run, 2 gloo
processes against one with the same global batch, and a teacher-student pipeline whose teacher starts from the
SimCLR encoder."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PAUSE_AFTER_EPOCH_1, bundle_error, run_processes, wait_for_pause

from monai_cxr_ssl.methods.simclr.engine import ViewPairLoss, contrastive_accuracy, embedding_std

TESTS = Path(__file__).resolve().parent
TINY = {"image_size": 40, "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.5, "num_workers": 0,
        "num_epochs": 2}
# views without randomness: the same images on 1 and 2 processes (each rank draws its own augmentations)
FIXED_VIEWS = {"view_crop_scale": [1.0, 1.0], "flip_prob": 0.0, "view_jitter_prob": 0.0, "view_blur_prob": 0.0,
               "network_def#norm": ["group", {"num_groups": 1}], "learning_rate": 1e-5}


def test_contrastive_accuracy_and_embedding_spread_by_hand():
    # views a0 = (1, 0), a1 = (0, 1); b0 ∝ (1, 0.1), b1 ∝ (1, 0.2). Cosines: a0·b0 = 0.99504, a0·b1 = 0.98058,
    # a1·b0 = 0.09950, a1·b1 = 0.19612, b0·b1 = 0.99523. Nearest: a0 → b0 (its positive), a1 → b1 (its positive),
    # b0 → b1 (not a0), b1 → b0 (not a1): 2 of 4.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [1.0, 0.2]])
    assert contrastive_accuracy(z).item() == 0.5
    assert contrastive_accuracy(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]])).item() == 1.0
    # dimension 0 holds 1, 0, -1, 0: unbiased standard deviation sqrt(2/3); so does dimension 1
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert embedding_std(spread).item() == pytest.approx(math.sqrt(2 / 3), abs=1e-6)
    assert embedding_std(torch.ones(6, 3) * torch.tensor([1.0, 2.0, 3.0])).item() == 0.0  # collapsed
    with pytest.raises(ValueError, match="two views of N images"):
        contrastive_accuracy(torch.zeros(3, 2))


def test_the_loss_of_the_trainer_s_batch_is_nt_xent_of_its_two_halves():
    from monai_cxr_ssl.losses import NTXentLoss

    z1, z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    loss = ViewPairLoss(NTXentLoss(temperature=0.1, gather=False))(torch.cat([z1, z2]))
    assert loss.item() == pytest.approx(0.347211, abs=1e-5)  # methods.md, case A at τ = 0.1


def test_the_network_s_encoder_is_the_classifier_s(tmp_path):
    from monai_cxr_ssl.networks import CXRDenseNet121, SimCLRNetwork, load_encoder

    torch.manual_seed(0)
    net = SimCLRNetwork().eval()
    classifier = CXRDenseNet121(num_classes=2)
    features = {k for k in classifier.state_dict() if k.startswith("features.")}
    assert {k for k in net.state_dict() if k.startswith("features.")} == features
    assert {k for k in net.state_dict() if not k.startswith("features.")} == {
        "projection.0.weight", "projection.0.bias", "projection.2.weight", "projection.2.bias"}
    assert net.projection[0].weight.shape == (1024, 1024) and net.projection[2].weight.shape == (128, 1024)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.projection(net.pooled_features(x)))
    assert net(x).shape == (2, 128)
    torch.save(net.state_dict(), tmp_path / "simclr.pt")
    load_encoder(classifier, tmp_path / "simclr.pt")
    for key in features:
        torch.testing.assert_close(classifier.state_dict()[key], net.state_dict()[key], rtol=0, atol=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("simclr")
    return make_synthetic_dataset(root / "data", n_train=40, n_test=16, image_size=40, prevalence=0.4, seed=5)


def _settings(data: Path, out: Path, **more) -> dict:
    return {**TINY, "dataset_dir": str(data), "output_dir": str(out), "experiment_name": "simclr",
            "tracking_uri": f"sqlite:///{out.parent / (out.name + '.db')}", **more}


def test_two_views_differ_and_follow_the_seed(data, tmp_path):
    from monai.data.utils import set_rnd

    from monai_cxr_ssl.workflow import make_workflow

    workflow = make_workflow(["simclr", "demo"], **_settings(data, tmp_path / "out"))
    parser = workflow.parser
    items = parser.get_parsed_content("train#dataset#data")
    split = parser.get_parsed_content("split")
    assert len(items) == len(split["labeled"]) + len(split["unlabeled"])  # use_labeled_images: true
    item = items[0]
    transform = parser.get_parsed_content("train#preprocessing")

    def draw(seed: int) -> dict:
        set_rnd(transform, seed)
        return transform(dict(item))

    first, again, other = draw(7), draw(7), draw(8)
    assert first["image"].shape == first["image_2"].shape == (1, TINY["crop_size"], TINY["crop_size"])
    assert not torch.equal(first["image"], first["image_2"])  # the two views are drawn independently
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["image_2"], again["image_2"])
    assert not torch.equal(first["image"], other["image"])
    assert "label" not in first  # no labels in a stage without them


@pytest.mark.parametrize(("setting", "message"), [
    ({"temperature": 0}, "temperature=0 must be a number > 0"),
    ({"view_crop_scale": [0.5, 1.5]}, r"view_crop_scale=\[0.5, 1.5\] must be a range \[a, b\] with 0 < a <= b <= 1"),
    ({"batch_size": 1}, "batch_size=1: training needs at least 2 images per batch"),
    ({"batch_size": 64}, "the stage has 36 images to learn from without labels, fewer than one batch"),
])
def test_bad_settings_stop_before_any_work(data, tmp_path, setting, message):
    out = tmp_path / "out"
    error = bundle_error(["simclr", "demo"], _settings(data, out, **setting))
    assert isinstance(error, ValueError) and re.search(message, str(error)), error
    assert not (out / "simclr" / "models").exists()


def _cli(*args: str, settings: dict) -> list[str]:
    pairs = [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]
    return [sys.executable, "-m", "monai_cxr_ssl.cli", *args, "--set", *pairs]


@pytest.mark.slow
def test_killed_stage_resumes_to_the_straight_run_and_two_processes_match_one(data, tmp_path):
    """SIGKILL after epoch 1 and the same command again end where a straight run ends (bit for bit); on 2 gloo
    processes with batch 4 each the first epoch's loss is one process's with batch 8 (negatives from both ranks)
    within 1e-4 (relative). Both runs must see the same images and statistics: fixed views (each rank draws its own
    augmentations) and GroupNorm (BatchNorm normalises each rank's batch). What is left is float rounding in the
    ranks' gradient average, which Adam turns into lr-sized steps for near-zero gradients: at lr 3e-4 the epoch's
    loss differed by 1.9%, at lr 1e-5 (used here) they agree to 4 decimals."""
    import mlflow

    from monai_cxr_ssl.launch import run_bundle

    straight = _settings(data, tmp_path / "straight")
    run_bundle(["simclr", "demo"], **straight)

    killed = _settings(data, tmp_path / "killed", pause_file=str(tmp_path / "pause"))
    cmd = _cli("run", "simclr", "demo", str(PAUSE_AFTER_EPOCH_1), settings=killed)
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
    wait_for_pause(proc, tmp_path / "pause", log, timeout=300)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = run_processes(cmd, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "Resuming from" in done.stdout + done.stderr, done.stderr[-3000:]
    for name in ("model.pt", "last.pt"):
        a, b = (torch.load(tmp_path / d / "simclr" / "models" / name, weights_only=True) for d in ("straight",
                                                                                                  "killed"))
        a, b = (x["network"] if name == "last.pt" else x for x in (a, b))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    client = mlflow.MlflowClient(tracking_uri=straight["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
    history = {m: [p.value for p in client.get_metric_history(run.info.run_id, m)] for m in (
        "train_loss", "contrastive_accuracy", "embedding_std", "learning_rate")}
    assert all(len(values) == 2 for values in history.values()), history  # per epoch
    learning_rate = json.loads((tmp_path / "straight" / "simclr" / "config_executed.json").read_text())["learning_rate"]
    assert history["learning_rate"] == pytest.approx([learning_rate] * 2)  # constant: lr_decay 1
    assert run.data.params["temperature"] == "0.1" and int(run.data.params["num_train"]) == 36

    one = _settings(data, tmp_path / "one", **FIXED_VIEWS, num_epochs=1)
    run_bundle(["simclr", "demo"], **one)
    two = _settings(data, tmp_path / "two", **FIXED_VIEWS, num_epochs=1, batch_size=TINY["batch_size"] // 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = run_processes(_cli("run", "simclr", "demo", "--nproc-per-node", "2", settings=two), timeout=300,
                         cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    losses = []
    for settings in (one, two):
        client = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"])
        (run,) = client.search_runs([client.get_experiment_by_name("simclr").experiment_id])
        losses.append(run.data.metrics["train_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4), losses


@pytest.mark.slow
def test_pretrain_simclr_then_the_teacher_student_method(data, tmp_path):
    """``pretrain=simclr method=teacher_student`` end to end; the teacher barely moves (learning rate 1e-12), so its
    weights show where it started: every encoder weight and bias is the SimCLR checkpoint's, tensor by tensor."""
    from monai_cxr_ssl.pipeline import Pipeline

    settings = _settings(data, tmp_path / "out", num_epochs=1, **{"teacher:learning_rate": 1e-12})
    lines = []
    results = Pipeline(["demo"], settings, echo=lines.append, method="teacher_student", pretrain="simclr").run()
    assert [line.split("] ", 1)[1].split(":")[0] for line in lines if line.startswith("[")] == [
        "simclr", "teacher", "teacher/evaluate", "pseudo_label", "student", "student/evaluate", "finetune",
        "finetune/evaluate"]
    columns = ["simclr + teacher", "simclr + intermediate", "simclr + student"]  # Table I's composed columns
    assert list(results["auroc"]) == columns
    out = tmp_path / "out"
    assert (out / "table1.md").read_text().splitlines()[0] == f"| labeled | seeds | {' | '.join(columns)} |"
    from monai_cxr_ssl.compare import evaluation_runs

    runs = evaluation_runs(["simclr"], tracking_uri=settings["tracking_uri"])
    assert dict(zip(runs["stage"], runs["column"], strict=True)) == {
        "teacher": "simclr + teacher", "student": "simclr + intermediate", "finetune": "simclr + student"}
    simclr = torch.load(out / "simclr" / "models" / "model.pt", weights_only=True)
    teacher = torch.load(out / "teacher" / "models" / "model.pt", weights_only=True)
    encoder = [k for k in simclr if k.startswith("features.") and k.endswith((".weight", ".bias"))]
    assert len(encoder) > 300 and not any(k.startswith("class_layers.") for k in simclr)
    for key in encoder:
        torch.testing.assert_close(teacher[key], simclr[key], atol=1e-8, rtol=0)
    assert teacher["class_layers.out.weight"].shape == (1, 1024)  # the classifier's own head


def test_a_pre_trained_pipeline_s_columns_are_composed_and_follow_their_models():
    from monai_cxr_ssl import methods

    steps = methods.plan(method="teacher_student", pretrain="simclr")
    assert steps[0].name == "simclr" and steps[1].settings["encoder_init"].endswith("'simclr', 'models/model.pt')")
    assert [s.column for s in steps if s.column] == ["simclr + teacher", "simclr + intermediate", "simclr + student"]
    mixed = ["simclr + student", "student", "simclr + teacher", "intermediate", "teacher", "simclr + intermediate"]
    assert sorted(mixed, key=methods.column_order) == [
        "teacher", "simclr + teacher", "intermediate", "simclr + intermediate", "student", "simclr + student"]


@pytest.mark.slow
def test_plain_monai_bundle_runs_the_stage_and_the_help_lists_it(data, tmp_path, capsys):
    from monai_cxr_ssl.cli import main
    from monai_cxr_ssl.workflow import DEFAULT_BUNDLE, OVERLAYS_DIR

    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert "simclr: SimCLR: contrastive pre-training" in " ".join(capsys.readouterr().out.split())

    configs = Path(DEFAULT_BUNDLE) / "configs"
    files = [str(configs / f) for f in ("train.json", "label_free.json", "simclr.json")] + [str(OVERLAYS_DIR /
                                                                                           "demo.json")]
    settings = {**_settings(data, tmp_path / "out"), "num_epochs": 1, "simclr_epochs": 1, "bundle_root":
                str(DEFAULT_BUNDLE)}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files),
           *(arg for k, v in settings.items() for arg in (f"--{k}", str(v)))]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model = torch.load(tmp_path / "out" / "simclr" / "models" / "model.pt", weights_only=True)
    assert "projection.2.weight" in model and "features.conv0.weight" in model
