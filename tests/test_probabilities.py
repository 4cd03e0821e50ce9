"""Probabilities from logits in one place: the function, its inverse, the network's layer and the bundle's
post-processing, for every kind (``KINDS``), against values computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_cxr_ssl.networks import CXRDenseNet121
from monai_cxr_ssl.probabilities import KINDS, num_logits, probabilities, probability_layer, probability_logits
from monai_cxr_ssl.settings import check_values

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
    torch.testing.assert_close(probabilities(LOGITS, "sigmoid"), torch.sigmoid(LOGITS))
    assert probabilities(torch.tensor([0.0])).item() == 0.5  # binary: one logit, sigmoid(0) = 1/2


def test_exclusive_classes_get_a_softmax_over_the_classes():
    expected = torch.tensor([_softmax_by_hand(row) for row in LOGITS.tolist()], dtype=torch.float64)
    got = probabilities(LOGITS, "softmax")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, torch.softmax(LOGITS, dim=1))
    # a decollated item (K,) is normalised over its classes too
    torch.testing.assert_close(probabilities(LOGITS[1], "softmax"), expected[1])


def test_the_generated_class_is_dropped_from_k_plus_1_logits():
    # 3 logits: 2 real classes and the generated one; a real image's class probabilities: softmax over the 2
    expected = torch.tensor([_softmax_by_hand(row[:2]) for row in LOGITS.tolist()], dtype=torch.float64)
    got = probabilities(LOGITS, "softmax_drop_last")
    torch.testing.assert_close(got, expected)
    assert got.shape == (2, 2) and num_logits(2, "softmax_drop_last") == 3 and num_logits(2, "softmax") == 2
    torch.testing.assert_close(probabilities(LOGITS[0], "softmax_drop_last"), expected[0])


def test_unknown_kinds_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="probabilities must be one of sigmoid, softmax, softmax_drop_last; got "
                                         "'softmx'"):
        probabilities(LOGITS, "softmx")
    with pytest.raises(ValueError, match="probabilities"):
        check_values({"probabilities": "softmx"})
    check_values({"probabilities": "softmax_drop_last"})


@pytest.mark.parametrize("kind", list(KINDS))
def test_probability_logits_invert_probabilities(kind):
    probs = probabilities(LOGITS, kind)
    torch.testing.assert_close(probabilities(probability_logits(probs, kind), kind), probs)
    # saturated probabilities give finite logits of the clamped value
    edge = probability_logits(torch.tensor([0.0, 1.0], dtype=torch.float64), kind, eps=1e-4)
    by_hand = {"sigmoid": [math.log(1e-4 / (1 - 1e-4)), math.log((1 - 1e-4) / 1e-4)],
               "softmax": [math.log(1e-4), math.log(1 - 1e-4)],
               "softmax_drop_last": [math.log(1e-4), math.log(1 - 1e-4), math.log(1e-4)]}[kind]
    torch.testing.assert_close(edge, torch.tensor(by_hand, dtype=torch.float64))


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_network_probability_layer_follows_the_function(kind):
    torch.testing.assert_close(probability_layer(kind)(LOGITS), probabilities(LOGITS, kind))
    torch.manual_seed(0)
    logits_net = CXRDenseNet121(num_classes=3).eval()
    probs_net = CXRDenseNet121(num_classes=3, probabilities=kind).eval()
    probs_net.load_state_dict(logits_net.state_dict())  # the layer has no parameters
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = probabilities(logits_net(x), kind)
        torch.testing.assert_close(probs_net(x), expected)
        torch.testing.assert_close(torch.jit.script(probs_net)(x), expected)  # what export writes


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_bundle_postprocessing_follows_the_setting(kind):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["probabilities"] = kind
    post = parser.get_parsed_content("postprocessing")
    item = post({"pred": LOGITS[0].float()})  # a decollated item, as the evaluator hands it over
    torch.testing.assert_close(item["pred"], probabilities(LOGITS[0].float(), kind))
    inference = ConfigParser()
    inference.read_config(str(CONFIGS / "inference.json"))
    inference["probabilities"] = kind
    item = inference.get_parsed_content("postprocessing")({"pred": LOGITS[1].float()})
    torch.testing.assert_close(item["pred"], probabilities(LOGITS[1].float(), kind))
    inference["num_classes"] = 2
    assert inference.get_parsed_content("network_def").class_layers.out.out_features == num_logits(2, kind)
