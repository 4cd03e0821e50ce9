"""MaskedBCEWithLogitsLoss: plain BCE without NaN targets, NaN entries ignored (value and gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_cxr_ssl.losses import BernoulliKLDivLoss, MaskedBCEWithLogitsLoss, NTXentLoss


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
    # d/dz mean BCE over the 4 kept entries = (sigmoid(z) − y) / 4 there, 0 where the target is NaN
    expected = torch.where(kept, (torch.sigmoid(logits.detach()) - target.nan_to_num()) / 4, torch.zeros(()))
    torch.testing.assert_close(logits.grad, expected)


def test_all_nan_gives_zero_loss_with_a_graph():
    logits = torch.randn(2, 2, requires_grad=True)
    loss = MaskedBCEWithLogitsLoss()(logits, torch.full((2, 2), float("nan")))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


def test_bernoulli_kl_matches_torch_distributions():
    logits, target = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64)
    target[0, 0], target[1, 1] = 0.0, 1.0
    expected = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(probs=target), torch.distributions.Bernoulli(logits=logits)
    ).sum(dim=1).mean()
    torch.testing.assert_close(BernoulliKLDivLoss()(logits, target), expected)


def test_bernoulli_kl_is_zero_at_the_target_and_finite_for_confident_students():
    target = torch.tensor([[0.2, 0.9]], dtype=torch.float64)
    assert BernoulliKLDivLoss()(torch.logit(target), target).item() == pytest.approx(0.0, abs=1e-12)
    logits = torch.tensor([[80.0, -80.0]], requires_grad=True)
    loss = BernoulliKLDivLoss()(logits, torch.tensor([[0.0, 1.0]]))
    loss.backward()
    assert loss.item() == pytest.approx(160.0, rel=1e-6)  # log-sigmoid(−80) = −80 (to 1e-35) for each class
    # d KL / dz = sigmoid(z) − target: 1 − 0 and 0 − 1 (to float precision), finite
    torch.testing.assert_close(logits.grad, torch.tensor([[1.0, -1.0]]))


def test_nt_xent_known_answers_on_one_process():
    """Cases A and C (docs/distributed.md has C's per-rank answers, tests/test_distributed.py checks them)."""
    z1, z2 = torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([[1.0, 1], [-1, 1]])  # normalised by the loss
    for t, expected in ((0.5, 0.535969), (0.1, 0.347211), (1.0, 0.732602)):
        assert NTXentLoss(temperature=t)(z1, z2).item() == pytest.approx(expected, abs=1e-6)
    z1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    z2 = torch.tensor([[0.9, 0.1, 0], [0.2, 0.8, 0.1], [0, 0.3, 0.7], [1, 0.5, 1]])
    assert NTXentLoss(temperature=0.1)(z1, z2).item() == pytest.approx(0.167118, abs=1e-6)
    # each half alone: its pairs without the other half's negatives
    assert NTXentLoss(temperature=0.1)(z1[:2], z2[:2]).item() == pytest.approx(0.001333, abs=1e-6)
    assert NTXentLoss(temperature=0.1)(z1[2:], z2[2:]).item() == pytest.approx(0.179401, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="one pair has no negatives"):
        NTXentLoss()(z1[:1], z2[:1])


def test_joint_contrastive_loss_known_answers_and_infonce():
    from monai_cxr_ssl.losses import JointContrastiveLoss

    # methods.md: q = (1, 0); key views (1, 0), (0, 1); queue (0, 1), (-1, 0); τ = 0.5: qᵀΣq = 0.25
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    assert JointContrastiveLoss(temperature=0.5, lam=1.0)(q, keys, queue).item() == pytest.approx(0.725802, abs=1e-6)
    assert JointContrastiveLoss(temperature=0.5, lam=0.0)(q, keys, queue).item() == pytest.approx(0.349012, abs=1e-6)

    # one key view and λ = 0: MoCo's InfoNCE, the cross-entropy of the positive among [k, queue] (by hand here)
    torch.manual_seed(0)
    q, k, queue = (torch.nn.functional.normalize(torch.randn(*s), dim=-1) for s in ((6, 8), (6, 8), (20, 8)))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.07
    infonce = torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    loss = JointContrastiveLoss(temperature=0.07, lam=0.0)(q, k[:, None], queue)
    torch.testing.assert_close(loss, infonce)
    # with one key view Σ = 0: λ changes nothing
    torch.testing.assert_close(JointContrastiveLoss(temperature=0.07, lam=5.0)(q, k[:, None], queue), infonce)
    # τ = 0.01 on unit vectors: exp(100) would overflow float32, the log-sum-exp does not
    assert torch.isfinite(JointContrastiveLoss(temperature=0.01, lam=2.0)(q, torch.stack([k, q], 1), queue))

    for kwargs, message in (({"temperature": 0}, "temperature"), ({"lam": -1}, "lam")):
        with pytest.raises(ValueError, match=message):
            JointContrastiveLoss(**kwargs)
    with pytest.raises(ValueError, match=r"keys \(B, M, D\) with M >= 1"):
        JointContrastiveLoss()(q, k, queue)


def test_semi_supervised_gan_loss_known_answers():
    """methods.md's K = 2 case: each term, seed 002's sum and openai/improved-gan's weighting."""
    from monai_cxr_ssl.losses import SemiSupervisedGANLoss

    args = (torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), torch.tensor([[1.0, 1.0], [-1.0, 0.5]]),
            torch.tensor([[-2.0, -1.0], [0.0, 0.0]]))
    terms = SemiSupervisedGANLoss()(*args)
    expected = {"labeled": 0.220095, "unlabeled": 0.285782, "generated": 0.753109, "total": 1.258986}
    assert {k: round(v.item(), 6) for k, v in terms.items()} == expected
    assert SemiSupervisedGANLoss("openai")(*args)["total"].item() == pytest.approx(0.739541, abs=1e-6)
    with pytest.raises(ValueError, match="weighting must be one of sum, openai"):
        SemiSupervisedGANLoss("mean")


def test_generator_losses_known_answers():
    """Feature matching's three norms (methods.md: 2.25, 1.125, 0.75), no gradient into the real features; the
    non-saturating loss −log(1 − p(generated)) with p(generated) = 1 / (1 + Σ exp l) computed directly."""
    import math

    from monai_cxr_ssl.losses import FeatureMatchingLoss, non_saturating_generator_loss

    real = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    fake = torch.tensor([[0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    values = [FeatureMatchingLoss(norm)(real, fake) for norm in ("squared_norm", "mean_square", "mean_abs")]
    assert [v.item() for v in values] == [2.25, 1.125, 0.75]
    values[0].backward()
    assert real.grad is None and fake.grad is not None
    logits = [[-2.0, -1.0], [0.0, 0.0]]
    by_hand = sum(-math.log(1 - 1 / (1 + sum(math.exp(v) for v in row))) for row in logits) / 2
    assert non_saturating_generator_loss(torch.tensor(logits)).item() == pytest.approx(by_hand, rel=1e-6)


def test_supervised_loss_follows_the_probabilities_setting():
    """Known answers: BCE per class for sigmoid; −log softmax of the true class for softmax; the same over the K class
    logits for softmax_drop_last, whose generated class gets no gradient."""
    import math

    from monai_cxr_ssl.losses import SupervisedLoss

    sigmoid = SupervisedLoss("sigmoid")(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]]))
    assert sigmoid.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(2))) / 2)
    expected = math.log(1 + math.exp(-1) + math.exp(-2))  # the true class's logit is 3
    softmax = SupervisedLoss("softmax")(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 1.0]]))
    assert softmax.item() == pytest.approx(expected)
    logits = torch.tensor([[1.0, 2.0, 3.0, 10.0]], requires_grad=True)
    dropped = SupervisedLoss("softmax_drop_last")(logits, torch.tensor([[0.0, 0.0, 1.0]]))
    assert dropped.item() == pytest.approx(expected)
    dropped.backward()
    assert logits.grad[0, 3] == 0 and logits.grad[0, 2] < 0
    with pytest.raises(ValueError, match="probabilities must be one of"):
        SupervisedLoss("softmin")
