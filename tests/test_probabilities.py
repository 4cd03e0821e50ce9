"""Probabilities from logits in one place: the function, its inverse, the network's layer and the bundle's
post-processing, against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_cxr_ssl.networks import CXRDenseNet121
from monai_cxr_ssl.probabilities import probabilities, probability_layer, probability_logits

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cxr_classifier" / "configs"
LOGITS = torch.tensor([[0.0, 2.0, -1.0], [3.0, -4.0, 0.5]], dtype=torch.float64)


def _sigmoid_by_hand(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _softmax_by_hand(row: list[float]) -> list[float]:
    exps = [math.exp(z) for z in row]
    return [e / sum(exps) for e in exps]


def test_independent_classes_get_one_sigmoid_each():
    expected = torch.tensor([[_sigmoid_by_hand(z) for z in row] for row in LOGITS.tolist()], dtype=torch.float64)
    torch.testing.assert_close(probabilities(LOGITS), expected)
    torch.testing.assert_close(probabilities(LOGITS), torch.sigmoid(LOGITS))
    assert probabilities(torch.tensor([0.0])).item() == 0.5  # binary: one logit, sigmoid(0) = 1/2


def test_exclusive_classes_get_a_softmax_over_the_classes():
    expected = torch.tensor([_softmax_by_hand(row) for row in LOGITS.tolist()], dtype=torch.float64)
    got = probabilities(LOGITS, exclusive_classes=True)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, torch.softmax(LOGITS, dim=1))
    # a decollated item (K,) is normalised over its classes too
    torch.testing.assert_close(probabilities(LOGITS[1], exclusive_classes=True), expected[1])


@pytest.mark.parametrize("exclusive", [False, True])
def test_probability_logits_invert_probabilities(exclusive):
    probs = probabilities(LOGITS, exclusive)
    torch.testing.assert_close(probabilities(probability_logits(probs, exclusive), exclusive), probs)
    # saturated probabilities give finite logits of the clamped value
    edge = probability_logits(torch.tensor([0.0, 1.0], dtype=torch.float64), exclusive, eps=1e-4)
    by_hand = [math.log(1e-4), math.log(1 - 1e-4)] if exclusive else [math.log(1e-4 / (1 - 1e-4)),
                                                                        math.log((1 - 1e-4) / 1e-4)]
    torch.testing.assert_close(edge, torch.tensor(by_hand, dtype=torch.float64))


@pytest.mark.parametrize("exclusive", [False, True])
def test_the_network_probability_layer_follows_the_function(exclusive):
    torch.testing.assert_close(probability_layer(exclusive)(LOGITS), probabilities(LOGITS, exclusive))
    torch.manual_seed(0)
    logits_net = CXRDenseNet121(num_classes=3).eval()
    probs_net = CXRDenseNet121(num_classes=3, probabilities=True, exclusive_classes=exclusive).eval()
    probs_net.load_state_dict(logits_net.state_dict())  # the layer has no parameters
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(probs_net(x), probabilities(logits_net(x), exclusive))


@pytest.mark.parametrize("exclusive", [False, True])
def test_the_bundle_postprocessing_follows_the_setting(exclusive):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["exclusive_classes"] = exclusive
    post = parser.get_parsed_content("postprocessing")
    item = post({"pred": LOGITS[0].float()})  # a decollated item, as the evaluator hands it over
    torch.testing.assert_close(item["pred"], probabilities(LOGITS[0].float(), exclusive))
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.json"))
    inference["exclusive_classes"] = exclusive
    item = inference.get_parsed_content("postprocessing")({"pred": LOGITS[1].float()})
    torch.testing.assert_close(item["pred"], probabilities(LOGITS[1].float(), exclusive))
