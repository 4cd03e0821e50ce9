"""DenseNet121 for chest X-rays and loading local torchvision ImageNet weights."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from monai_cxr_ssl.networks import CXRDenseNet121, load_imagenet_weights


@pytest.fixture(scope="module")
def features() -> dict[str, torch.Tensor]:
    """Feature tensors of a DenseNet121, MONAI-named, with values no fresh model has."""
    torch.manual_seed(0)
    state = CXRDenseNet121().state_dict()
    return {
        k: v * (1 + torch.rand_like(v)) + 0.1 if v.is_floating_point() else v
        for k, v in state.items()
        if k.startswith("features.")
    }


def torchvision_state_dict(
    features: dict[str, torch.Tensor], old_style: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``features`` named and shaped like torchvision's DenseNet121 (RGB conv0, 1000-class classifier), and the
    MONAI name of each feature tensor."""
    separator = "." if old_style else ""  # the original download uses "norm.1", current torchvision "norm1"
    monai_names = {re.sub(r"\.layers\.(norm|relu|conv)([12])\.", rf".\1{separator}\2.", k): k for k in features}
    state = {k: features[monai_key] for k, monai_key in monai_names.items()}
    state["features.conv0.weight"] = torch.randn(64, 3, 7, 7)
    state["classifier.weight"] = torch.randn(1000, 1024)
    state["classifier.bias"] = torch.randn(1000)
    return state, monai_names


def test_forward_shape():
    model = CXRDenseNet121(num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)


def test_refuses_download():
    with pytest.raises(ValueError, match="pretrained_weights"):
        CXRDenseNet121(pretrained=True)


@pytest.mark.parametrize("old_style", [False, True])
def test_load_imagenet_weights(tmp_path, caplog, features, old_style):
    state, monai_names = torchvision_state_dict(features, old_style)
    assert ("features.denseblock1.denselayer1.norm.1.weight" in state) == old_style
    path = tmp_path / "densenet121.pth"
    torch.save({"state_dict": state} if old_style else state, path)
    with caplog.at_level(logging.INFO, logger="monai_cxr_ssl"):
        model = CXRDenseNet121(num_classes=2, pretrained_weights=path)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["features.conv0.weight"], state["features.conv0.weight"].sum(1, keepdim=True))
    for key, monai_key in monai_names.items():
        if key != "features.conv0.weight":
            torch.testing.assert_close(loaded[monai_key], state[key])
    assert loaded["class_layers.out.weight"].shape == (2, 1024)
    assert f"Loaded {len(monai_names)} ImageNet tensors" in caplog.text


def test_grey_image_response_matches_rgb(tmp_path, features):
    """Summing conv0 over RGB makes a 1-channel model see a grey image as the RGB model sees it replicated."""
    path = tmp_path / "densenet121.pth"
    torch.save(torchvision_state_dict(features)[0], path)
    grey, rgb = CXRDenseNet121(pretrained_weights=path), CXRDenseNet121(in_channels=3)
    load_imagenet_weights(rgb, path)
    rgb.class_layers.load_state_dict(grey.class_layers.state_dict())
    image = torch.rand(2, 1, 64, 64)  # train mode: batch statistics keep the random-weight activations finite
    with torch.no_grad():
        torch.testing.assert_close(grey(image), rgb(image.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)


def test_first_conv_adapted_to_other_channel_counts(tmp_path, features):
    state, _ = torchvision_state_dict(features)
    path = tmp_path / "densenet121.pth"
    torch.save(state, path)
    rgb_weight = state["features.conv0.weight"]
    for in_channels, expected in (
        (3, rgb_weight),
        (2, rgb_weight[:, :2] * 1.5),
        (4, rgb_weight[:, [0, 1, 2, 0]] * 0.75),
    ):
        model = CXRDenseNet121(in_channels=in_channels, pretrained_weights=path)
        torch.testing.assert_close(model.state_dict()["features.conv0.weight"], expected)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        CXRDenseNet121(pretrained_weights=tmp_path / "nowhere.pth")


def test_garbage_and_non_state_dict_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.*not a readable"):
        load_imagenet_weights(CXRDenseNet121(), garbage)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ValueError, match="list.pth.*does not hold a state dict"):
        load_imagenet_weights(CXRDenseNet121(), not_a_state_dict)


def test_mismatched_keys_and_shapes(tmp_path, features):
    state, _ = torchvision_state_dict(features)
    del state["features.norm5.weight"]
    state["features.extra.weight"] = torch.zeros(3)
    state["features.transition1.conv.weight"] = torch.zeros(7, 7, 1, 1)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    model = CXRDenseNet121()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="other.pth") as err:
        load_imagenet_weights(model, path)
    message = str(err.value)
    assert "missing (1): features.norm5.weight" in message
    assert "unexpected (1): features.extra.weight" in message
    assert "features.transition1.conv.weight (7, 7, 1, 1) vs (128, 256, 1, 1)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_torchscript_round_trip(tmp_path):
    model = CXRDenseNet121(num_classes=2).eval()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), path)
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(path)(image), model(image))
