"""AALS against hand-computed values and the properties the paper states."""

from __future__ import annotations

import math

import pytest
import torch

from monai_cxr_ssl.sharpening import aals, sharpening_strength


def _by_hand(y: float, t: float, a0: float) -> float:
    a = a0 - (a0 - 1) * y
    z = a * math.log(y / (1 - y)) + (1 - a) * math.log(t / (1 - t))
    return max(1 / (1 + math.exp(-z)), y)


def test_hand_computed_values():
    y = torch.tensor([0.2, 0.45, 0.6, 0.9], dtype=torch.float64)
    expected = [_by_hand(v, 0.4, 4.0) for v in y.tolist()]
    torch.testing.assert_close(aals(y), torch.tensor(expected, dtype=torch.float64))
    # y = 0.45: a = 2.65, z = 2.65·logit(0.45) − 1.65·logit(0.4) = 0.13724 → 0.53426, a hesitant positive raised
    assert aals(torch.tensor(0.45, dtype=torch.float64)).item() == pytest.approx(0.534256, abs=1e-6)


def test_properties_stated_by_the_paper():
    y = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(aals(y, a0=1.0), y)  # a0 = 1: identity
    near_one = torch.tensor([1 - 1e-9], dtype=torch.float64)
    torch.testing.assert_close(aals(near_one), near_one)  # y_max → 1: a → 1, identity
    for t in (0.2, 0.3, 0.4, 0.5):
        for a0 in (4.0, 16.0):
            assert aals(torch.tensor(t, dtype=torch.float64), t=t, a0=a0).item() == pytest.approx(t)  # fixed point
    out = aals(y)
    above, below = (y > 0.4) & (y < 1.0), y <= 0.4
    assert (out[above] > y[above]).all() and (out[below] == y[below]).all()  # raised, never lowered
    inner = slice(1, -1)  # the by-hand formula needs 0 < y < 1; aals keeps 0 and 1 exactly (next test)
    torch.testing.assert_close(out[inner], torch.tensor([_by_hand(v, 0.4, 4.0) for v in y[inner].tolist()],
                                                        dtype=torch.float64))


def test_numerically_safe_at_zero_and_one_and_any_shape():
    y = torch.tensor([[0.0, 1.0, 0.5], [0.3, 0.41, 0.99]])
    out = aals(y)
    assert out.shape == y.shape and out[0, 0] == 0.0 and out[0, 1] == 1.0
    expected = [_by_hand(v, 0.4, 4.0) for v in [0.5, 0.3, 0.41, 0.99]]
    torch.testing.assert_close(out[[0, 1, 1, 1], [2, 0, 1, 2]], torch.tensor(expected))
    assert aals(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_per_image_strength():
    y = torch.tensor([[0.45, 0.95]], dtype=torch.float64)
    per_class, per_image = aals(y), aals(y, per_image=True)
    # per image, y_max = 0.95 for both classes: a = 1.15, so 0.45 is raised much less than with its own a = 2.65
    assert per_image[0, 0] < per_class[0, 0]
    a = sharpening_strength(torch.tensor(0.95, dtype=torch.float64))
    z = a * torch.logit(torch.tensor(0.45, dtype=torch.float64)) + (1 - a) * torch.logit(torch.tensor(0.4))
    assert per_image[0, 0].item() == pytest.approx(max(torch.sigmoid(z).item(), 0.45))


@pytest.mark.parametrize(("kwargs", "message"), [({"t": 0.0}, "t must be in"), ({"t": 1.0}, "t must be in"),
                                                 ({"a0": 0.5}, "a0 must be >= 1")])
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        aals(torch.tensor([0.5]), **kwargs)
