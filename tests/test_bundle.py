"""The classifier bundle end to end through ``python -m monai.bundle`` on tiny generated data:
train, checkpoint, resume after a kill, evaluate with ten-crop TTA, MLflow runs, inference and export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    PAUSE_AFTER_EPOCH_1,
    checkpoint_probabilities,
    reference_ten_crop_probabilities,
    shared_path,
    wait_for_pause,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cxr_classifier"
CONFIGS = BUNDLE / "configs"
SCHEMA = Path(__file__).resolve().parent / "data" / "mb_metadata_schema.json"
EVALUATE = [CONFIGS / "train.json", CONFIGS / "predict.json", CONFIGS / "evaluate.json", REPO / "configs" / "demo.json"]
TINY = {"image_size": 40, "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.5, "num_workers": 0}


def test_metadata_follows_the_bundle_schema():
    """``verify_metadata`` downloads the schema metadata.json names; validate against the vendored copy offline, and
    check that the schema would catch a missing key."""
    import jsonschema

    meta = json.loads((CONFIGS / "metadata.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(meta, schema)
    for drop in (("numpy_version",), ("network_data_format", "outputs", "pred", "channel_def")):
        broken = json.loads((CONFIGS / "metadata.json").read_text())
        parent = broken
        for key in drop[:-1]:
            parent = parent[key]
        del parent[drop[-1]]
        error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(broken))
        assert error is not None and error.message == f"'{drop[-1]}' is a required property", drop
    # What the schema cannot say: the changelog names this version, and the output is one probability per class.
    assert meta["version"] in meta["changelog"]
    (image,) = meta["network_data_format"]["inputs"].values()
    (pred,) = meta["network_data_format"]["outputs"].values()
    assert image["num_channels"] == 1 and pred["type"] == "probabilities" and pred["format"] == "classes"
    assert len(pred["channel_def"]) == pred["num_channels"]


def _bundle_cmd(verb: str, config_files: list[Path], **args) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", verb]
    if verb == "run":
        cmd += ["--config_file", repr([str(p) for p in config_files])]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    return cmd


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("bundle")
    data = make_synthetic_dataset(root / "data", n_train=80, n_test=40, image_size=48, prevalence=0.4, seed=1)
    common = dict(
        TINY, bundle_root=BUNDLE, dataset_dir=data, output_dir=root / "out",
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment_name="bundle_test",
    )
    return root, common


def _train_cmd(common: dict, num_epochs: int, *overlays: Path, **args) -> list[str]:
    return _bundle_cmd("run", [CONFIGS / "train.json", REPO / "configs" / "demo.json", *overlays], **common,
                       num_epochs=num_epochs, **args)


def _runs(common: dict):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=common["tracking_uri"])
    experiment = client.get_experiment_by_name(common["experiment_name"])
    return client, client.search_runs([experiment.experiment_id])


def _epoch(checkpoint: Path) -> int:
    trainer = torch.load(checkpoint, weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


NUM_EPOCHS = 2


@pytest.fixture(scope="module")
def resumed(workspace) -> dict:
    """A training run killed with SIGKILL right after epoch 1 (paused there: no race with a fast run), then the same
    command again, which resumes it; what the tests below check. A failure here errors every test using it."""
    root, common = workspace
    last = root / "out" / "teacher" / "models" / "last.pt"
    pause = root / "pause"
    cmd = _train_cmd(common, NUM_EPOCHS, PAUSE_AFTER_EPOCH_1, pause_file=pause)
    with open(root / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    wait_for_pause(proc, pause, root / "killed.log")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed = {"epoch": _epoch(last), "files": sorted(p.name for p in last.parent.iterdir())}
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)  # the same command again
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"killed": killed, "log": done.stdout + done.stderr, "last": last}


def test_train_is_killed_then_resumes(workspace, resumed):
    root, common = workspace
    out, last = root / "out", resumed["last"]
    assert resumed["killed"] == {"epoch": 1, "files": ["last.pt", "model.pt", "provenance.json"]}  # no temp files
    assert f"after epoch 1 of {NUM_EPOCHS}" in resumed["log"]  # resumed instead of starting over
    assert _epoch(last) == NUM_EPOCHS
    assert (out / "teacher" / "models" / "model.pt").exists()

    split = json.loads((out / "split.json").read_text())
    client, runs = _runs(common)
    train_runs = [r for r in runs if r.info.run_name == "teacher-lambda0.5-seed0"]
    assert len(train_runs) == 1, "the resumed run must continue the killed run, not start another"
    run = train_runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["dataset_fingerprint"] == split["fingerprint"]
    assert params["labeled_fraction"] == "0.5" and params["seed"] == "0"
    assert params["image_size"] == "40" and params["crop_size"] == "32"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_auroc")}
    assert steps == set(range(1, NUM_EPOCHS + 1))
    assert "train_loss" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "split.json" in artifacts

    # Every epoch is seeded from (seed, epoch): the resumed run ends with the weights of one never interrupted.
    straight = {**common, "output_dir": root / "straight", "experiment_name": "bundle_test_straight"}
    done = subprocess.run(_train_cmd(straight, NUM_EPOCHS), cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = torch.load(root / "straight" / "teacher" / "models" / "last.pt", weights_only=True)["network"]
    got = torch.load(last, weights_only=True)["network"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_evaluate_ten_crop_report(workspace, resumed):
    """The evaluation's AUROC is scikit-learn's on ten-crop probabilities computed here from the checkpoint."""
    from sklearn.metrics import roc_auc_score

    root, common = workspace
    out = root / "out"
    cmd = _bundle_cmd(
        "run", EVALUATE, **common
    )
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "teacher" / "test_metrics.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert report["num_images"] == len(split["test"]) and set(report["auroc"]) == {"OPACITY"}
    probs = checkpoint_probabilities(out / "teacher" / "models" / "model.pt", [it["image"] for it in split["test"]],
                                     TINY["image_size"], TINY["crop_size"])
    labels = [it["label"][0] for it in split["test"]]
    saved = np.load(out / "teacher" / "test_predictions.npz")
    np.testing.assert_allclose(saved["probs"], probs, atol=1e-5, rtol=0)
    assert saved["labels"].ravel().tolist() == labels
    assert 0 < sum(labels) < len(labels) and probs.std() > 0  # both classes, distinct probabilities: not vacuous
    assert report["mean_auroc"] == pytest.approx(roc_auc_score(labels, probs[:, 0]))
    assert report["auroc"]["OPACITY"] == report["mean_auroc"]
    assert (out / "teacher" / "test_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client, runs = _runs(common)
    (run,) = [r for r in runs if r.info.run_name == "teacher-lambda0.5-seed0-evaluate"]
    assert run.data.metrics["test_mean_auroc"] == pytest.approx(report["mean_auroc"])
    assert run.data.params["tta"] == "ten_crop"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test_metrics.json", "test_roc.png"} <= artifacts


def test_evaluate_without_checkpoint_fails_clearly(workspace, tmp_path):
    root, common = workspace
    cmd = _bundle_cmd(
        "run", EVALUATE,
        **dict(common, output_dir=tmp_path / "empty"),
    )
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "model.pt: no trained checkpoint" in done.stderr


def test_verify_export_and_inference(workspace, resumed, tmp_path):
    root, common = workspace
    ckpt = root / "out" / "teacher" / "models" / "model.pt"
    meta, inference = CONFIGS / "metadata.json", CONFIGS / "inference.json"
    verify = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
         "--meta_file", str(meta), "--config_file", str(inference)],
        capture_output=True, text=True, timeout=300,
    )
    assert verify.returncode == 0, verify.stderr[-3000:]
    exported = tmp_path / "model.ts"
    export = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
         "--ckpt_file", str(ckpt), "--meta_file", str(meta), "--config_file", str(inference),
         "--network_def#probabilities", "@probabilities"],  # the metadata promises probabilities
        capture_output=True, text=True, timeout=300,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    extra = {"metadata.json": ""}
    scripted = torch.jit.load(str(exported), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["network_data_format"]["outputs"]["pred"]["type"] == "probabilities"

    from monai_cxr_ssl.networks import CXRDenseNet121

    net = CXRDenseNet121(num_classes=1)
    net.load_state_dict(torch.load(ckpt, weights_only=True))
    net.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), torch.sigmoid(net(x)), atol=1e-5, rtol=1e-4)

    images = root / "data" / "test"
    run = subprocess.run(
        _bundle_cmd("run", [inference], bundle_root=BUNDLE, dataset_dir=images, ckpt_path=ckpt,
                    output_dir=tmp_path / "pred", image_size=40, crop_size=32, num_workers=0),
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    header, *rows = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    classes = json.loads((root / "out" / "split.json").read_text())["classes"]
    assert header == ",".join(["image", *classes])  # the checkpoint's classes; no thresholds known for it
    files = sorted(images.rglob("*.png"))
    names = [p.relative_to(images).as_posix() for p in files]
    assert sorted(r.split(",")[0] for r in rows) == names
    got = dict((name, float(p)) for name, p in (r.split(",")[:2] for r in rows))
    from monai.transforms import Compose, Resized

    from monai_cxr_ssl.data import LoadCXRImaged

    load = Compose([LoadCXRImaged("image"), Resized("image", [TINY["image_size"]] * 2, mode="area")])
    x = torch.stack([torch.as_tensor(load({"image": p})["image"]) for p in files])
    expected = reference_ten_crop_probabilities(net, x, TINY["crop_size"])[:, 0].numpy()
    assert expected.std() > 0
    np.testing.assert_allclose([got[n] for n in names], expected, atol=1e-5, rtol=0)


def _trained_stage(workspace) -> tuple[Path, list[str]]:
    """The stage trained by ``python -m monai.bundle run`` above (the ``resumed`` fixture), and the ``export``
    arguments naming its configs."""
    root, common = workspace
    stage = root / "out" / "teacher"
    settings = [f"{key}={common[key]}" for key in ("dataset_dir", "output_dir", "image_size", "crop_size")]
    return stage, ["--configs", "train", "demo", "--set", *settings]


@pytest.fixture(scope="module")
def exported(workspace, resumed, tmp_path_factory) -> tuple[Path, Path]:
    """``monai-cxr-ssl export`` of the trained stage: the stage folder and the TorchScript file."""
    from monai_cxr_ssl.cli import main

    stage, configs = _trained_stage(workspace)
    path = tmp_path_factory.mktemp("export") / "model.ts"
    main(["export", str(stage), "-o", str(path), *configs])
    return stage, path


def test_export_writes_the_specialised_metadata(workspace, exported, tmp_path, capsys):
    """``monai-cxr-ssl export``: TorchScript with the specialised metadata, which passes MONAI's own check."""
    from monai.bundle import verify_net_in_out
    from monai.data import load_net_with_metadata

    from monai_cxr_ssl.cli import main
    from monai_cxr_ssl.export import EXPORT_OVERRIDES

    stage, path = exported
    assert [p.name for p in path.parent.iterdir()] == ["model.ts"]  # no temporary files left
    refused = tmp_path / "export" / "model.ts"
    with pytest.raises(SystemExit):  # a plain monai.bundle run records no config: export asks for it
        main(["export", str(stage), "-o", str(refused)])
    assert "--configs train" in capsys.readouterr().err and not refused.parent.exists()

    _, meta, extra = load_net_with_metadata(str(path), more_extra_files=["inference.json"])
    split = json.loads((stage.parent / "split.json").read_text())
    info = meta["cxr_ssl"]
    assert info["classes"] == split["classes"] and info["stage"] == "teacher"
    assert (info["image_size"], info["crop_size"]) == (TINY["image_size"], TINY["crop_size"])
    assert info["thresholds"] == dict.fromkeys(split["classes"], 0.5) and info["thresholds_source"] == "fixed"
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {str(k): c for k, c in enumerate(split["classes"])}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [TINY["crop_size"]] * 2
    import jsonschema

    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    (tmp_path / "config.json").write_bytes(extra["inference.json"])
    verify_net_in_out(net_id="network_def", meta_file=str(tmp_path / "metadata.json"),
                      config_file=str(tmp_path / "config.json"), **EXPORT_OVERRIDES)


@pytest.mark.parametrize("source", ["generated", pytest.param("kermany", marks=pytest.mark.realdata)])
def test_exported_model_gives_the_checkpoint_probabilities(workspace, exported, source):
    """The exported model gives the checkpoint's ten-crop probabilities (tolerance 1e-5 absolute: the same float32
    kernels, scripted) on the generated test images, and on real chest X-rays when they are here."""
    from monai.data import load_net_with_metadata
    from monai.transforms import Compose, Resized

    from monai_cxr_ssl.data import LoadCXRImaged
    from monai_cxr_ssl.networks import CXRDenseNet121
    from monai_cxr_ssl.transforms.tencrop import ten_crop

    stage, path = exported
    if source == "kermany":
        test = shared_path("kermany_pneumonia", "test")
        images = sorted((test / "NORMAL").glob("*.jpeg"))[:3] + sorted((test / "PNEUMONIA").glob("*.jpeg"))[:3]
    else:
        images = sorted((workspace[0] / "data" / "test").rglob("*.png"))[:6]
    scripted, meta, _ = load_net_with_metadata(str(path))
    info = meta["cxr_ssl"]
    load = Compose([LoadCXRImaged("image"), Resized("image", [info["image_size"]] * 2, mode="area")])
    x = torch.stack([torch.as_tensor(load({"image": p})["image"]) for p in images])
    net = CXRDenseNet121(num_classes=len(info["classes"]))
    net.load_state_dict(torch.load(stage / "models" / "model.pt", weights_only=True))
    net.eval()
    expected = reference_ten_crop_probabilities(net, x, info["crop_size"])
    with torch.no_grad():
        crops = ten_crop(x, info["crop_size"])
        got = scripted(crops.reshape(-1, *crops.shape[2:])).reshape(10, len(images), -1).mean(dim=0)
    assert expected.std() > 0  # distinct images give distinct probabilities: the comparison is not vacuous
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_export_thresholds_final_stage_and_bad_input(workspace, resumed, tmp_path):
    import numpy as np
    from sklearn.metrics import roc_curve

    from monai_cxr_ssl.cli import parse_overrides
    from monai_cxr_ssl.export import export_model, final_stage_dir, stage_config

    stage, configs = _trained_stage(workspace)
    # Youden thresholds from the stage's validation predictions: no other threshold has a larger J.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, 200), 0, 1)
    copy = tmp_path / "teacher"
    (copy / "models").mkdir(parents=True)
    (copy / "models" / "model.pt").write_bytes((stage / "models" / "model.pt").read_bytes())
    (tmp_path / "split.json").write_bytes((stage.parent / "split.json").read_bytes())  # the experiment's split
    config = stage_config(stage, configs[1:3], parse_overrides(configs[4:]))
    (copy / "config_executed.json").write_text(json.dumps(config))  # as monai-cxr-ssl run records it
    np.savez(copy / "validation_predictions.npz", labels=labels[:, None], probs=probs[:, None])
    meta = export_model(copy, tmp_path / "youden.ts")
    (name,) = meta["cxr_ssl"]["classes"]
    chosen = meta["cxr_ssl"]["thresholds"][name]
    assert meta["cxr_ssl"]["thresholds_source"].startswith("youden")
    def youden_j(t: float) -> float:
        predicted = probs >= t
        return predicted[labels == 1].mean() - predicted[labels == 0].mean()

    assert youden_j(chosen) == pytest.approx(max(youden_j(t) for t in roc_curve(labels, probs)[2]))
    assert export_model(copy, tmp_path / "fixed.ts", threshold=0.3)["cxr_ssl"]["thresholds"] == {name: 0.3}

    # A pipeline folder exports its last trained stage.
    pipeline = tmp_path / "pipeline"
    runs = {"teacher": "a", "teacher/evaluate": "b", "student": "c", "finetune": "d", "finetune/evaluate": "e"}
    for step in ("teacher", "student", "finetune"):
        (pipeline / step / "models").mkdir(parents=True)
        (pipeline / step / "models" / "model.pt").touch()
    (pipeline / "results.json").write_text(json.dumps({"method": "teacher_student", "runs": runs}))
    assert final_stage_dir(pipeline) == (
        pipeline / "finetune", {"stage": "finetune", "method": "teacher_student", "source_run_id": "d"})

    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        export_model(copy, tmp_path / "bad.ts", threshold=1.5)
    (copy / "validation_predictions.npz").unlink()
    with pytest.raises(FileNotFoundError, match="eval_split=validation"):
        export_model(copy, tmp_path / "bad.ts", threshold="youden")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a pipeline output folder"):
        export_model(tmp_path / "empty", tmp_path / "bad.ts")
    assert not list(tmp_path.glob("bad.ts*")) and not list(tmp_path.glob(".bad.ts*"))
