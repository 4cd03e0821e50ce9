"""Ignite engines shared by the methods: a trainer that learns from a labeled and an unlabeled batch per iteration.
A method's own engine lives with it in ``monai_cxr_ssl.methods``."""

from monai_cxr_ssl.engines.semi_supervised import SemiSupervisedTrainer, UnlabeledBatches

__all__ = ["SemiSupervisedTrainer", "UnlabeledBatches"]
