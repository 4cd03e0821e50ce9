"""S²MTS² (seed 001, Liu et al.): self-supervised mean-teacher pre-training with joint contrastive learning, then
mean-teacher fine-tuning. Here its pre-training stage (``pretrain=s2mts2_pretrain`` starts any method's teacher):
a query network (DenseNet121's encoder and a 128-d MLP head, ``networks.SimCLRNetwork``) and its EMA, the key
encoder, score each query view against the mean and covariance of M key views of its image and a queue of earlier
key means (``losses.JointContrastiveLoss``).

The stage kind (without labels: the bundle's shared ``label_free.json``) and its settings' checks; defaults in the
bundle's ``configs/s2mts2_pretrain.json``; the step's parts in ``engine``."""

from __future__ import annotations

from monai_cxr_ssl.methods import Pretraining, StageKind, register
from monai_cxr_ssl.rules import BOOL, NON_NEGATIVE, POSITIVE, interval, whole

S2MTS2_PRETRAIN = StageKind("s2mts2_pretrain", ("train.json", "simclr.json", "s2mts2_pretrain.json"),
                            epochs="s2mts2_epochs", labels=False, rules={
    "key_views": whole(1),
    "queue_size": whole(1),
    "key_momentum": interval(0, 1, False, False),
    "joint_lambda": NON_NEGATIVE,
    "joint_lambda_ramp": BOOL,
    "key_bn_splits": whole(1),
    "temperature": POSITIVE,
})

PRETRAINING = register(Pretraining(S2MTS2_PRETRAIN, "S²MTS²: momentum-contrast pre-training with the joint "
                                                    "contrastive loss (M key views, a queue of key means)"))
