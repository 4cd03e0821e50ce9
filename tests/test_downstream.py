"""The downstream protocols of a pre-trained encoder, settings of the teacher stage: the linear probe (a new head on
the frozen encoder: weights and BatchNorm statistics unchanged by training) and seed 003's MLP head (through
export and the deploy app), and the linear probe's Table I column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["image_size=40", "crop_size=32", "batch_size=8", "num_workers=0", "num_epochs=2", "labeled_fraction=0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from monai_cxr_ssl.data import make_synthetic_dataset

    return Path(make_synthetic_dataset(tmp_path_factory.mktemp("downstream") / "data", n_train=48, n_test=16,
                                       image_size=40, prevalence=0.4, seed=3))


def _run(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "monai_cxr_ssl.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_the_mlp_head_is_two_layers_with_dropout():
    from monai_cxr_ssl.networks import CXRDenseNet121

    torch.manual_seed(0)
    net = CXRDenseNet121(num_classes=3, head="mlp", head_hidden=16, head_dropout=0.5)
    layers = list(net.class_layers.out)
    assert [type(m).__name__ for m in layers] == ["Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert (layers[1].in_features, layers[1].out_features, layers[4].out_features) == (1024, 16, 3)
    assert layers[0].p == layers[3].p == 0.5
    x = torch.rand(2, 1, 32, 32)
    net.eval()
    with torch.no_grad():  # in eval mode the head is its two linear layers on the pooled features
        expected = layers[4](torch.relu(layers[1](net.pooled_features(x))))
        torch.testing.assert_close(net(x), expected)
    with pytest.raises(ValueError, match="head must be one of linear, mlp"):
        CXRDenseNet121(head="transformer")


@pytest.mark.slow
def test_linear_probe_trains_the_head_only(data, tmp_path):
    """Encoder weights and BatchNorm buffers after training equal the pre-trained encoder's, the head moved."""
    from monai_cxr_ssl.networks import CXRDenseNet121

    torch.manual_seed(1)
    pretrained = CXRDenseNet121(num_classes=1)
    # BatchNorm statistics a pre-training would have left, unlike the initial ones (mean 0, variance 1)
    with torch.no_grad():
        for name, buffer in pretrained.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    encoder = tmp_path / "encoder.pt"
    torch.save(pretrained.state_dict(), encoder)
    out = tmp_path / "out"
    _run("run", "train", "demo", "--set", f"dataset_dir={data}", f"output_dir={out}", *TINY, f"encoder_init={encoder}",
         "linear_probe=true", "learning_rate=0.01", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    trained = torch.load(out / "teacher" / "models" / "last.pt", weights_only=False)["network"]
    before = pretrained.state_dict()
    features = [k for k in before if k.startswith("features.")]
    assert len(features) > 600  # weights, biases, running statistics and their counters
    for key in features:
        assert torch.equal(trained[key], before[key]), key
    assert not torch.equal(trained["class_layers.out.weight"], before["class_layers.out.weight"])


def test_linear_probe_is_the_teacher_s_setting_with_its_own_column(data, tmp_path):
    """In a pipeline linear_probe=true reaches the teacher (and its evaluation) only; its Table I column says what
    it is: ``simclr linear probe`` after SimCLR, ``linear probe`` without pre-training."""
    from monai_cxr_ssl.pipeline import Pipeline

    settings = {"dataset_dir": str(data), "output_dir": str(tmp_path / "out"), "linear_probe": True,
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    pipeline = Pipeline(["demo"], settings, pretrain="simclr")
    columns = [s.column for s in pipeline.steps if s.column]
    assert columns == ["simclr linear probe", "simclr + intermediate", "simclr + student"]
    probes = {s.name for s in pipeline.steps if pipeline._overrides(s).get("linear_probe")}
    assert probes == {"teacher", "teacher/evaluate"}
    plain = Pipeline(["demo"], settings, method="mean_teacher")
    assert [s.column for s in plain.steps if s.column] == ["linear probe", "mean teacher"]


@pytest.mark.slow
def test_an_mlp_head_model_exports_and_deploys(data, tmp_path):
    """A teacher with head=mlp: the TorchScript export gives the trained network's sigmoid probabilities, and the
    deploy app classifies a DICOM radiograph with it."""
    pytest.importorskip("monai.deploy.core", reason="the MONAI Deploy App SDK (the deploy extra) is not installed")
    from conftest import deploy_on_a_radiograph
    from monai.data import load_net_with_metadata

    from monai_cxr_ssl.networks import CXRDenseNet121

    out = tmp_path / "out"
    _run("run", "train", "demo", "--set", f"dataset_dir={data}", f"output_dir={out}", *TINY, "head=mlp",
         "head_hidden=32", f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    _run("export", str(out / "teacher"), "-o", str(tmp_path / "model.ts"), "--ood-images", "0", cwd=tmp_path)
    scripted, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    assert meta["cxr_ssl"]["head"] == {"kind": "mlp", "hidden": 32}
    net = CXRDenseNet121(num_classes=1, head="mlp", head_hidden=32).eval()
    net.load_state_dict(torch.load(out / "teacher" / "models" / "model.pt", weights_only=True))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), torch.sigmoid(net(x)))

    result = deploy_on_a_radiograph(tmp_path / "model.ts", tmp_path)
    assert set(result["probabilities"]) == {"OPACITY"} and result["findings_withheld"] is None
