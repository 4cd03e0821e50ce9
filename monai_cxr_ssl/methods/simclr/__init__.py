"""SimCLR self-supervised pre-training (seed 003, Table I's ``simclr + ...`` columns): two random views of every
image, DenseNet121's encoder and a projection head, the NT-Xent loss with its negatives from every rank; any method's
teacher then starts from the encoder (``pretrain=simclr``).

Here: the stage kind (without labels: the bundle's shared ``label_free.json``) and its settings' checks; defaults in
the bundle's ``configs/simclr.json``; the step on MONAI's ``SupervisedTrainer`` and the contrastive metrics in
``engine``; the network in ``monai_cxr_ssl.networks.SimCLRNetwork``; the loss ``monai_cxr_ssl.losses.NTXentLoss``
(with the other losses: the tests check it against methods.md's known answers)."""

from __future__ import annotations

from monai_cxr_ssl.methods import Pretraining, StageKind, register
from monai_cxr_ssl.rules import NON_NEGATIVE, POSITIVE, PROBABILITY, interval, pair

SIMCLR = StageKind("simclr", ("train.json", "simclr.json"), epochs="simclr_epochs", labels=False, rules={
    "temperature": POSITIVE,
    "view_crop_scale": pair(0, 1),
    "view_rotation_degrees": interval(0, 180, True, True),
    "view_brightness": interval(0, 1, True, False),
    "view_contrast": interval(0, 1, True, False),
    "view_jitter_prob": PROBABILITY,
    "view_blur_prob": PROBABILITY,
    "view_blur_sigma": pair(0, 100),
    "collapse_std": NON_NEGATIVE,
})

PRETRAINING = register(Pretraining(SIMCLR, "SimCLR: contrastive pre-training on the unlabeled and labeled images "
                                            "(two views, NT-Xent, τ = temperature)"))
