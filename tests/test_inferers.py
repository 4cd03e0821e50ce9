"""Ten-crop test-time augmentation inferer."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from torch import nn

from monai_cxr_ssl.inferers import TenCropInferer, ten_crop_probabilities
from monai_cxr_ssl.transforms import ten_crop

K = 3


class CountingNet(nn.Module):
    """Tiny conv classifier that records the batch size of each forward."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, K))
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.body(x)


@pytest.fixture
def net() -> CountingNet:
    torch.manual_seed(0)
    return CountingNet().eval()


def test_matches_mean_of_separate_forwards(net):
    images = torch.randn(2, 1, 12, 10)
    with torch.no_grad():
        logits = TenCropInferer(crop_size=(8, 6))(images, net)
        assert net.batch_sizes == [20]  # one batched forward over all crops
        separate = torch.stack([1 / (1 + torch.exp(-net(crop))) for crop in _crops_by_hand(images)])
        assert all(torch.equal(a, b) for a, b in zip(ten_crop(images, (8, 6)), _crops_by_hand(images), strict=True))
    assert logits.shape == (2, K)
    torch.testing.assert_close(logits, torch.logit(separate.mean(0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.sigmoid(logits), ten_crop_probabilities(images, net, (8, 6)), atol=1e-6, rtol=0)


def test_logits_stay_finite_for_saturated_network():
    images = torch.ones(1, 1, 6, 6)
    logits = TenCropInferer(crop_size=4, eps=1e-4)(images, lambda x: torch.full((x.shape[0], 2), 1e4))
    torch.testing.assert_close(logits, torch.logit(torch.tensor([[1 - 1e-4, 1 - 1e-4]])))


def test_invalid_eps():
    with pytest.raises(ValueError, match="eps"):
        TenCropInferer(crop_size=4, eps=0.0)


def test_inside_supervised_evaluator(net):
    batches = [{"image": torch.randn(2, 1, 10, 10), "label": torch.zeros(2, K)} for _ in range(2)]
    outputs = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=batches,
        network=net,
        inferer=TenCropInferer(crop_size=8),
        decollate=False,
    )
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: outputs.append(engine.state.output["pred"]))
    evaluator.run()
    assert len(outputs) == 2
    assert net.batch_sizes == [20, 20]
    with torch.no_grad():
        expected = torch.logit(ten_crop_probabilities(batches[1]["image"], net, 8))
    pred = torch.as_tensor(outputs[1])
    assert pred.shape == (2, K)
    torch.testing.assert_close(pred, expected, atol=1e-5, rtol=0)


def _crops_by_hand(images: torch.Tensor) -> list[torch.Tensor]:
    """The ten (8, 6) crops of a (12, 10) batch, sliced by hand: corners, centre (offset 2, 2), then their flips."""
    five = [images[..., 0:8, 0:6], images[..., 0:8, 4:10], images[..., 4:12, 0:6], images[..., 4:12, 4:10],
            images[..., 2:10, 2:8]]
    return five + [c.flip(-1) for c in five]


def test_exclusive_classes_average_softmax_probabilities(net):
    images = torch.randn(2, 1, 12, 10)
    with torch.no_grad():
        logits = TenCropInferer(crop_size=(8, 6), probabilities="softmax")(images, net)
        probs = [net(c).exp() / net(c).exp().sum(dim=1, keepdim=True) for c in _crops_by_hand(images)]
    expected = torch.stack(probs).mean(0)
    # the post-processing's softmax of the returned logits gives back the ten-crop mean softmax probability
    torch.testing.assert_close(torch.softmax(logits, dim=1), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ten_crop_probabilities(images, net, (8, 6), probabilities="softmax"), expected,
                               atol=1e-6, rtol=0)
    sigmoid_mean = torch.stack([torch.sigmoid(net(c)) for c in _crops_by_hand(images)]).mean(0).detach()
    assert not torch.allclose(expected, sigmoid_mean, atol=1e-3)  # a different answer from the default


def test_k_plus_1_logits_average_the_real_classes_softmax(net):
    """The last logit is the generated class: each crop's probabilities are the softmax over the others."""
    images = torch.randn(2, 1, 12, 10)
    with torch.no_grad():
        logits = TenCropInferer(crop_size=(8, 6), probabilities="softmax_drop_last")(images, net)
        real = [net(c)[:, :-1] for c in _crops_by_hand(images)]
        expected = torch.stack([r.exp() / r.exp().sum(dim=1, keepdim=True) for r in real]).mean(0)
    assert logits.shape == (2, net(images[..., :8, :6]).shape[1])  # K + 1 again, for the post-processing
    torch.testing.assert_close(torch.softmax(logits[:, :-1], dim=1), expected, atol=1e-6, rtol=0)
