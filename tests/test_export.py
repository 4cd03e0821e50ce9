"""``monai-cxr-ssl export`` on a small experiment folder made here (split, untrained checkpoint, recorded config):
values are read and never evaluated, teacher-only folders, checkpoint checks, the out-of-distribution statistics and
the bundle's ``inference.json`` (datalist by content, predictions.csv with a header)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE, CROP_SIZE = 40, 32


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """``<exp>/split.json`` and ``<exp>/teacher/{models/model.pt, config_executed.json}`` as ``monai-cxr-ssl run``
    leaves them (the weights are random: export does not care how well they were trained)."""
    from monai_cxr_ssl.data import make_synthetic_dataset
    from monai_cxr_ssl.networks import CXRDenseNet121
    from monai_cxr_ssl.workflow import make_workflow

    root = tmp_path_factory.mktemp("export")
    data = make_synthetic_dataset(root / "data", n_train=40, n_test=8, image_size=48, prevalence=0.4, seed=2)
    exp = root / "exp"
    workflow = make_workflow(["train", "demo"], dataset_dir=str(data), output_dir=str(exp), image_size=IMAGE_SIZE,
                             crop_size=CROP_SIZE, labeled_fraction=0.5, num_workers=0)
    workflow.parser.get_parsed_content("split")  # writes split.json, as training does first
    (exp / "teacher" / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(CXRDenseNet121(num_classes=1).state_dict(), exp / "teacher" / "models" / "model.pt")
    (exp / "teacher" / "config_executed.json").write_text(json.dumps(workflow.parser.get()))
    return exp


def _copy(experiment: Path, target: Path) -> Path:
    shutil.copytree(experiment, target)
    return target


def test_teacher_only_folder_exports_with_ood_statistics(experiment, tmp_path):
    """The README's ``monai-cxr-ssl export <experiment folder>`` for a folder with only a teacher; the file keeps
    the checkpoint's probabilities and carries statistics that match scikit-learn's Ledoit-Wolf fit."""
    from monai.data import load_net_with_metadata
    from monai.transforms import CenterSpatialCrop, Resized
    from sklearn.covariance import LedoitWolf

    from monai_cxr_ssl.cli import main
    from monai_cxr_ssl.data import LoadCXRImaged, load_split
    from monai_cxr_ssl.deploy.ood import OOD_STATS_FILE, OODStats
    from monai_cxr_ssl.networks import CXRDenseNet121

    out = tmp_path / "model.ts"
    main(["export", str(experiment), "-o", str(out), "--ood-images", "12"])
    scripted, meta, extra = load_net_with_metadata(str(out), more_extra_files=[OOD_STATS_FILE, "inference.json"])
    info = meta["cxr_ssl"]
    split = load_split(experiment / "split.json")
    assert info["stage"] == "teacher" and info["classes"] == split["classes"]
    assert (info["image_size"], info["crop_size"]) == (IMAGE_SIZE, CROP_SIZE)
    embedded = json.loads(extra["inference.json"])
    assert (embedded["num_classes"], embedded["image_size"], embedded["class_names"]) == (1, IMAGE_SIZE,
                                                                                          split["classes"])

    net = CXRDenseNet121(num_classes=1)
    net.load_state_dict(torch.load(experiment / "teacher" / "models" / "model.pt", weights_only=True))
    net.eval()
    x = torch.rand(3, 1, CROP_SIZE, CROP_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), torch.sigmoid(net(x)), atol=1e-5, rtol=1e-4)

    # Statistics: the first 12 labeled images (subsample keeps order, all of them when fewer), centre crops.
    load = [LoadCXRImaged("image"), Resized("image", [IMAGE_SIZE] * 2, mode="area"),
            CenterSpatialCrop([CROP_SIZE] * 2)]

    def features(items: list[dict]) -> np.ndarray:
        batch = []
        for it in items:
            d = load[1](load[0]({"image": it["image"]}))
            batch.append(torch.as_tensor(load[2](d["image"])))
        with torch.no_grad():
            return scripted.pooled_features(torch.stack(batch)).double().numpy()

    from monai_cxr_ssl.data import subsample

    train, validation = (subsample(split[p], 12) for p in ("labeled", "validation"))
    assert info["ood"]["num_train"] == len(train) and info["ood"]["num_validation"] == len(validation)
    fitted = LedoitWolf().fit(features(train))
    stats = OODStats.from_bytes(extra[OOD_STATS_FILE])
    np.testing.assert_allclose(stats.mean, fitted.location_, atol=1e-6)
    distances = np.sqrt(fitted.mahalanobis(features(validation)))
    np.testing.assert_allclose(stats.distance(features(validation)), distances, rtol=1e-3)
    assert stats.threshold == pytest.approx(info["ood"]["threshold"])
    assert np.mean(distances <= stats.threshold * (1 + 1e-6)) >= 0.99  # 99% of validation images pass


def test_several_stages_without_results_ask_for_one(experiment, tmp_path):
    from monai_cxr_ssl.export import final_stage_dir

    exp = _copy(experiment, tmp_path / "exp")
    shutil.copytree(exp / "teacher", exp / "student")
    with pytest.raises(ValueError, match=r"2 trained stages \(student, teacher\) but no results.json.*pass one"):
        final_stage_dir(exp)
    assert final_stage_dir(exp / "student") == (exp / "student", {"stage": "student"})


@pytest.mark.parametrize("key", ["num_classes", "image_size"])
def test_recorded_expressions_are_never_evaluated(experiment, tmp_path, key):
    """An injected ``$`` expression in the recorded config used to run during export (and the export exited 0)."""
    from monai_cxr_ssl.export import export_model

    exp = _copy(experiment, tmp_path / "exp")
    marker = tmp_path / "pwned"
    recorded = exp / "teacher" / "config_executed.json"
    config = json.loads(recorded.read_text())
    value = config[key]
    payload = f"$(__import__('pathlib').Path({str(marker)!r}).touch(), {value})[1]"
    config["injected"] = payload
    config[key] = "@injected"  # reached through a reference: refused
    config["device"] = payload  # never needed: ignored
    recorded.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config_executed.json: {key} -> injected is .*not a plain value; export "
                                         "reads values and never evaluates"):
        export_model(exp, tmp_path / "bad.ts", ood_images=0)
    assert not marker.exists() and not (tmp_path / "bad.ts").exists()

    config[key] = value  # the needed value plain again: the export succeeds and ignores the rest
    recorded.write_text(json.dumps(config))
    export_model(exp, tmp_path / "ok.ts", ood_images=0)
    assert (tmp_path / "ok.ts").is_file() and not marker.exists()


def test_the_method_s_probabilities_end_the_exported_network(experiment, tmp_path):
    """A stage whose method declares K + 1 logits (``probabilities: softmax_drop_last``) exports a network that
    returns the K class probabilities: the softmax over the checkpoint's logits without the generated class."""
    from monai.data import load_net_with_metadata

    from monai_cxr_ssl.export import export_model
    from monai_cxr_ssl.networks import CXRDenseNet121

    exp = _copy(experiment, tmp_path / "exp")
    recorded = exp / "teacher" / "config_executed.json"
    config = json.loads(recorded.read_text())
    config["probabilities"] = "softmx"
    recorded.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config_executed.json: probabilities is 'softmx', expected one of sigmoid, "
                                         "softmax, softmax_drop_last"):
        export_model(exp, tmp_path / "bad.ts", ood_images=0)

    config["probabilities"] = "softmax_drop_last"
    recorded.write_text(json.dumps(config))
    torch.manual_seed(1)
    net = CXRDenseNet121(num_classes=2).eval()  # the split's one class and the generated one
    torch.save(net.state_dict(), exp / "teacher" / "models" / "model.pt")
    meta = export_model(exp, tmp_path / "model.ts", ood_images=0)
    assert meta["cxr_ssl"]["probabilities"] == "softmax_drop_last"
    assert meta["label_classes"].startswith("softmax probabilities of mutually exclusive classes, the generated")
    exported, _, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    x = torch.rand(3, 1, CROP_SIZE, CROP_SIZE)
    with torch.no_grad():
        logits = net(x)
        got = exported(x)
    assert got.shape == (3, 1)  # one probability per class, none for the generated class
    torch.testing.assert_close(got, torch.softmax(logits[:, :1], dim=1))
    assert not torch.allclose(got, torch.sigmoid(logits[:, :1]))


def test_not_a_checkpoint_gives_one_clear_line(experiment, tmp_path, capsys):
    from monai_cxr_ssl.cli import main

    exp = _copy(experiment, tmp_path / "exp")
    ckpt = exp / "teacher" / "models" / "model.pt"
    for content, message in (
        (b"this is not a checkpoint", "not a readable PyTorch checkpoint ("),
        (None, "holds a list that is not a state dict of tensors"),
    ):
        if content is None:
            torch.save([1, 2, 3], ckpt)
        else:
            ckpt.write_bytes(content)
        with pytest.raises(SystemExit):
            main(["export", str(exp), "-o", str(tmp_path / "bad.ts"), "--ood-images", "0"])
        err = capsys.readouterr().err
        assert err.startswith(f"monai-cxr-ssl: error: {ckpt}: ") and message in err, err
        assert "expected a model checkpoint" in err and "weights_only" not in err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.ts").exists()


def test_inference_bundle_names_skipped_files_and_writes_a_header(experiment, tmp_path, capsys):
    """``python -m monai.bundle run`` of inference.json: DICOM without suffix or header is read, other files are
    named in the log, predictions.csv has a header with the split's class names and the known thresholds; a file
    that is not a checkpoint fails with one clear line."""
    import pydicom

    from monai_cxr_ssl.data import read_cxr
    from monai_cxr_ssl.evaluation import youden_threshold

    exp = _copy(experiment, tmp_path / "exp")
    stage = exp / "teacher"
    rng = np.random.default_rng(0)
    labels, probs = rng.integers(0, 2, 50), rng.uniform(0, 1, 50)
    np.savez(stage / "validation_predictions.npz", labels=labels[:, None], probs=probs[:, None])
    images = tmp_path / "images"
    images.mkdir()
    png = sorted((experiment.parent / "data" / "test").rglob("*.png"))[0]
    shutil.copy(png, images / "a.png")
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = pydicom.uid.SecondaryCaptureImageStorage, "1.2.3", "OT"
    ds.set_pixel_data((read_cxr(png) * 255).round().astype(np.uint8), "MONOCHROME2", 8)
    del ds.file_meta
    ds.save_as(images / "IM0001", enforce_file_format=False, implicit_vr=True, little_endian=True)  # no header
    (images / "readme.txt").write_text("not an image")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(REPO / "bundles" / "cxr_classifier" /
           "configs" / "inference.json"), "--bundle_root", str(REPO / "bundles" / "cxr_classifier"),
           "--dataset_dir", str(images), "--ckpt_path", str(stage / "models" / "model.pt"), "--output_dir",
           str(tmp_path / "pred"), "--image_size", str(IMAGE_SIZE), "--crop_size", str(CROP_SIZE),
           "--num_workers", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "inference skips 1 file(s)" in run.stderr + run.stdout and "readme.txt (no image suffix" in (
        run.stderr + run.stdout)
    rows = (tmp_path / "pred" / "predictions.csv").read_text().strip().splitlines()
    (name,) = json.loads((exp / "split.json").read_text())["classes"]
    threshold = youden_threshold(labels, probs)
    assert rows[0] == f"image,{name},{name}>={threshold:.4f}"
    assert [r.split(",")[0] for r in rows[1:]] == ["IM0001", "a.png"]
    p = [float(r.split(",")[1]) for r in rows[1:]]
    assert abs(p[0] - p[1]) < 0.02  # the same picture, as DICOM and as PNG
    assert [int(r.split(",")[2]) for r in rows[1:]] == [int(v >= threshold) for v in p]

    from monai_cxr_ssl.cli import main

    (stage / "models" / "model.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        main(["run", "inference", "--set", f"dataset_dir={images}", f"ckpt_path={stage / 'models' / 'model.pt'}",
              f"output_dir={tmp_path / 'bad'}", "num_workers=0"])
    err = capsys.readouterr().err
    assert err.startswith(f"monai-cxr-ssl: error: {stage / 'models' / 'model.pt'}: not a readable PyTorch checkpoint")
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err
    assert not (tmp_path / "bad" / "predictions.csv").exists()


def test_an_existing_folder_as_output_gets_model_ts(experiment, tmp_path, capsys):
    from monai_cxr_ssl.cli import main

    exp = _copy(experiment, tmp_path / "exp")
    (tmp_path / "models").mkdir()
    main(["export", str(exp), "-o", str(tmp_path / "models"), "--ood-images", "0"])
    assert (tmp_path / "models" / "model.ts").is_file()
    assert f"to {tmp_path / 'models' / 'model.ts'}" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(exp), "-o", str(tmp_path / "a_file" / "model.ts"), "--ood-images", "0"])
    assert exit_.value.code == 2
    assert f"{tmp_path / 'a_file'} is a file, not a folder" in capsys.readouterr().err
