"""Losses for training on partial labels and for distillation from a teacher's soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SupervisedLoss(torch.nn.Module):
    """The supervised loss that matches how ``probabilities`` (``monai_cxr_ssl.probabilities``) reads the logits:
    binary cross-entropy per class for ``sigmoid``; cross-entropy over the classes for ``softmax``; for
    ``softmax_drop_last`` the cross-entropy over the K class logits, the generated class's left out (−log p(y | x,
    real): the labeled term of ``SemiSupervisedGANLoss``, so a discriminator can also be trained on labels alone).
    ``target`` holds one value per class (one-hot, or soft) in every case."""

    def __init__(self, probabilities: str = "sigmoid") -> None:
        super().__init__()
        from monai_cxr_ssl.probabilities import check_kind

        self.probabilities = check_kind(probabilities)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        if self.probabilities == "sigmoid":
            return F.binary_cross_entropy_with_logits(logits, target)
        if self.probabilities == "softmax_drop_last":
            logits = logits[..., :-1]
        return F.cross_entropy(logits, target)


class MaskedBCEWithLogitsLoss(torch.nn.Module):
    """Binary cross-entropy with logits that ignores targets set to NaN.

    Multi-label pseudo-labels are kept per (image, class): a student sees some classes of an image and
    not others. Encoding the dropped entries as NaN keeps the usual ``(pred, label)`` loss signature of
    MONAI's trainers. The mean is over the kept entries; with no NaN it equals ``BCEWithLogitsLoss``.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        kept = ~torch.isnan(target)
        if kept.all():
            return F.binary_cross_entropy_with_logits(logits, target)
        if not kept.any():
            return logits.sum() * 0.0  # keeps the graph; nothing to learn from this batch
        return F.binary_cross_entropy_with_logits(logits[kept], target[kept])


class BernoulliKLDivLoss(torch.nn.Module):
    """KL(target ‖ student) between independent Bernoulli distributions, one per sigmoid output.

    The mean-teacher consistency term with AALS: ``target`` holds the teacher's (sharpened) probabilities,
    ``logits`` the student's. Summed over classes, averaged over the batch; computed from log-sigmoids so
    that confident students do not overflow, with ``0·log 0 = 0`` for targets at exactly 0 or 1.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        log_q, log_not_q = F.logsigmoid(logits), F.logsigmoid(-logits)
        entropy_terms = torch.xlogy(target, target) + torch.xlogy(1 - target, 1 - target)
        kl = entropy_terms - target * log_q - (1 - target) * log_not_q
        return kl.reshape(len(kl), -1).sum(dim=1).mean()


class ProbabilityMSELoss(torch.nn.Module):
    """The mean squared difference between the student's sigmoid probabilities and ``target`` (the EMA teacher's),
    over every image and class: S²MTS²'s consistency (Tarvainen & Valpola's mean-teacher MSE)."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(logits) - target.to(logits.dtype)).pow(2).mean()


class NTXentLoss(torch.nn.Module):
    """SimCLR's NT-Xent loss of two views ``z1``, ``z2`` (N, D) of N images: the mean over the 2N anchors of the
    cross-entropy of the anchor's positive (the other view of its image) among the 2N − 1 other embeddings, on cosine
    similarities over ``temperature``.

    The self-similarity is masked out of a log-sum-exp (``cross_entropy``), so small temperatures (τ = 0.005) stay
    finite, and the (2N, 2N) similarity matrix is the largest tensor (MONAI's ``ContrastiveLoss`` builds a
    (2N, 2N, D) one). Under torchrun with ``gather`` the negatives are every rank's
    (``distributed.all_gather_with_grad``): each rank's loss is the mean over its own anchors, and with DDP's gradient
    averaging a step equals the one-process step on the whole batch.
    """

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature (τ) must be > 0, got {temperature}.")
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        from monai_cxr_ssl import distributed

        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(f"NTXentLoss needs two (N, D) views of the same shape, got {tuple(z1.shape)} and "
                             f"{tuple(z2.shape)}.")
        if len(z1) < 1:
            raise ValueError("NTXentLoss needs at least one pair.")
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        n = len(z1)
        if self.gather and distributed.is_distributed():
            keys1, keys2 = distributed.all_gather_with_grad(z1), distributed.all_gather_with_grad(z2)
            offset = distributed.rank() * n
        else:
            keys1, keys2, offset = z1, z2, 0
        total = len(keys1)
        if total < 2:
            raise ValueError("NTXentLoss needs at least two pairs over all ranks: one pair has no negatives.")
        anchors, keys = torch.cat([z1, z2]), torch.cat([keys1, keys2])
        logits = anchors @ keys.T / self.temperature
        local = torch.arange(n, device=z1.device) + offset
        own = torch.cat([local, local + total])  # each anchor's own column, masked out
        positive = torch.cat([local + total, local])  # the other view of the same image
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[torch.arange(2 * n, device=z1.device), own] = True
        return F.cross_entropy(logits.masked_fill(mask, float("-inf")), positive)


class JointContrastiveLoss(torch.nn.Module):
    """S²MTS²'s joint contrastive loss (seed 001; Cai et al.'s JCL): a query against the infinite set of its image's
    positive keys, summarised by the mean μ and the biased covariance Σ of M key views, and a queue of negatives:

        L = −q·μ/τ + log[exp(q·μ/τ + λ/(2τ²)·qᵀΣq) + Σ_j exp(q·n_j/τ)]

    with the released S²MTS² code's convention λ/(2τ²) (JCL's own writes λ/(2τ)). ``q`` (B, D), ``keys`` (B, M, D)
    and ``queue`` (K, D) are normalised by the caller (μ, a mean of unit keys, is not); the mean over the batch is
    returned. Computed with a log-sum-exp: τ = 0.07 does not overflow. With M = 1 (Σ = 0) or λ = 0 the positive term
    is MoCo's, and then with M = 1 the loss is InfoNCE. ``lam`` is an attribute: the stage ramps it over epochs.
    """

    def __init__(self, temperature: float = 0.07, lam: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature (τ) must be > 0, got {temperature}.")
        if not lam >= 0:
            raise ValueError(f"lam (λ) must be >= 0, got {lam}.")
        self.temperature = temperature
        self.lam = lam

    def forward(self, q: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        if q.ndim != 2 or keys.ndim != 3 or queue.ndim != 2 or keys.shape[0] != q.shape[0] \
                or keys.shape[2] != q.shape[1] or queue.shape[1] != q.shape[1] or keys.shape[1] < 1:
            raise ValueError(f"JointContrastiveLoss needs q (B, D), keys (B, M, D) with M >= 1 and queue (K, D), got "
                             f"{tuple(q.shape)}, {tuple(keys.shape)} and {tuple(queue.shape)}.")
        tau = self.temperature
        mu = keys.mean(dim=1)
        spread = ((keys - mu[:, None]) * q[:, None]).sum(dim=2).pow(2).mean(dim=1)  # qᵀΣq, Σ biased (1/M)
        aligned = (q * mu).sum(dim=1) / tau
        positive = aligned + self.lam / (2 * tau**2) * spread
        logits = torch.cat([positive[:, None], q @ queue.T / tau], dim=1)
        return (torch.logsumexp(logits, dim=1) - aligned).mean()


GAN_WEIGHTINGS = ("sum", "openai")
FEATURE_MATCHING = ("squared_norm", "mean_square", "mean_abs")


class SemiSupervisedGANLoss(torch.nn.Module):
    """The discriminator's loss of a semi-supervised GAN (Salimans et al. 2016; seed 002): K real classes plus a
    generated class whose logit is fixed at 0, so that p(generated | x) = 1 / (1 + Z) with Z = Σ_k exp(l_k) over the
    K real logits ``l`` the network gives:

    - ``labeled``: the cross-entropy over the K classes of the labeled images (``labels`` are class indices);
    - ``unlabeled``: −log(1 − p(generated)) = softplus(−LSE(l)) on unlabeled real images;
    - ``generated``: −log p(generated) = softplus(LSE(l)) on the generator's images.

    ``weighting="sum"`` adds the three (seed 002); ``"openai"`` is openai/improved-gan's L_lab + 0.5·(L_unl + L_gen).
    Returns a dict of float tensors ``labeled``, ``unlabeled``, ``generated`` and ``total`` (each a mean over its
    images).
    """

    def __init__(self, weighting: str = "sum") -> None:
        super().__init__()
        if weighting not in GAN_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(GAN_WEIGHTINGS)}, got {weighting!r}.")
        self.weighting = weighting

    def forward(self, labeled_logits: torch.Tensor, labels: torch.Tensor, unlabeled_logits: torch.Tensor,
                generated_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        labeled = F.cross_entropy(labeled_logits.float(), labels.long())
        unlabeled = F.softplus(-torch.logsumexp(unlabeled_logits.float(), dim=1)).mean()
        generated = F.softplus(torch.logsumexp(generated_logits.float(), dim=1)).mean()
        half = 1.0 if self.weighting == "sum" else 0.5
        return {"labeled": labeled, "unlabeled": unlabeled, "generated": generated,
                "total": labeled + half * (unlabeled + generated)}


class FeatureMatchingLoss(torch.nn.Module):
    """The generator's feature-matching loss: the distance between the mean discriminator features of real and of
    generated images, ``squared_norm`` ‖mean f(real) − mean f(fake)‖² (Salimans et al., the paper's),
    ``mean_square`` (its mean over the features) or ``mean_abs`` (the mean |Δ| of openai/improved-gan's code). The
    real features are a target: no gradient flows into them."""

    def __init__(self, norm: str = "squared_norm") -> None:
        super().__init__()
        if norm not in FEATURE_MATCHING:
            raise ValueError(f"feature matching norm must be one of {', '.join(FEATURE_MATCHING)}, got {norm!r}.")
        self.norm = norm

    def forward(self, real_features: torch.Tensor, fake_features: torch.Tensor) -> torch.Tensor:
        delta = real_features.detach().float().mean(dim=0) - fake_features.float().mean(dim=0)
        if self.norm == "mean_abs":
            return delta.abs().mean()
        square = delta.pow(2)
        return square.sum() if self.norm == "squared_norm" else square.mean()


def non_saturating_generator_loss(generated_logits: torch.Tensor) -> torch.Tensor:
    """The generator's −log(1 − p(generated)) = softplus(−LSE(l)) on its images (the K real logits ``l``): it wants
    the discriminator to take them for real."""
    return F.softplus(-torch.logsumexp(generated_logits.float(), dim=1)).mean()
