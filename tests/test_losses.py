"""MaskedBCEWithLogitsLoss: plain BCE without NaN targets, NaN entries ignored (value and gradient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monai_cxr_ssl.losses import MaskedBCEWithLogitsLoss


def test_equals_bce_without_nan():
    logits, target = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    expected = F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(MaskedBCEWithLogitsLoss()(logits, target), expected)


def test_ignores_nan_targets_in_value_and_gradient():
    logits = torch.randn(3, 2, requires_grad=True)
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    loss = MaskedBCEWithLogitsLoss()(logits, target)
    kept = ~torch.isnan(target)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[kept], target[kept]))
    loss.backward()
    assert (logits.grad[~kept] == 0).all() and (logits.grad[kept] != 0).all()


def test_all_nan_gives_zero_loss_with_a_graph():
    logits = torch.randn(2, 2, requires_grad=True)
    loss = MaskedBCEWithLogitsLoss()(logits, torch.full((2, 2), float("nan")))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()
