"""S²MTS² (seed 001, Liu et al.): self-supervised mean-teacher pre-training with joint contrastive learning, then
mean-teacher fine-tuning: the method ``s2mts2`` (Table I's ``s2mts2``) runs the pre-training stage (skipped when
done), the teacher from its query network's encoder, then the mean teacher with the MSE consistency on every image
and a linear ramp (``consistency: mse``, ``consistency_rampup: linear``), AALS off. The pre-training stage also
starts any other method's teacher (``pretrain=s2mts2_pretrain``):
a query network (DenseNet121's encoder and a 128-d MLP head, ``networks.SimCLRNetwork``) and its EMA, the key
encoder, score each query view against the mean and covariance of M key views of its image and a queue of earlier
key means (``losses.JointContrastiveLoss``).

The stage kind (without labels: the bundle's shared ``label_free.json``) and its settings' checks; defaults in the
bundle's ``configs/s2mts2_pretrain.json``; the step's parts in ``engine``."""

from __future__ import annotations

from monai_cxr_ssl.methods import Method, Pretraining, StageKind, evaluation, register
from monai_cxr_ssl.methods.mean_teacher import MEAN_TEACHER, mean_teacher_step
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

COLUMN = "s2mts2"
# the fine-tuning: the mean-teacher stage with S²MTS²'s consistency; w = epoch / epochs over the stage's epochs
FINE_TUNING = {"consistency": "mse", "consistency_rampup": "linear", "rampup_epochs": "@mean_teacher_epochs",
               "aals_a0": 1.0}

METHOD = register(Method(
    name="s2mts2",
    help="S²MTS²: joint-contrastive momentum pre-training → teacher → mean teacher with MSE consistency",
    kinds=(MEAN_TEACHER,),
    steps=lambda rounds: [mean_teacher_step(COLUMN, **FINE_TUNING), evaluation(COLUMN, MEAN_TEACHER, COLUMN)],
    pretrain=S2MTS2_PRETRAIN.name,
))
