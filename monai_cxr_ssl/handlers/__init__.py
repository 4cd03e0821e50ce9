"""Ignite handlers used by the bundles."""

from monai_cxr_ssl.handlers.balanced_filter import BalancedFilter
from monai_cxr_ssl.handlers.checkpoint import BestCheckpoint, FinalModel, ResumableCheckpoint
from monai_cxr_ssl.handlers.errors import UserErrors
from monai_cxr_ssl.handlers.mlflow import MLFlowRunHandler
from monai_cxr_ssl.handlers.predictions import PredictionsCSV
from monai_cxr_ssl.handlers.pseudo_label import PseudoLabelWriter
from monai_cxr_ssl.handlers.report import AUROCReport
from monai_cxr_ssl.handlers.seed import EpochSeed

__all__ = [
    "AUROCReport",
    "BalancedFilter",
    "BestCheckpoint",
    "EpochSeed",
    "FinalModel",
    "MLFlowRunHandler",
    "PredictionsCSV",
    "PseudoLabelWriter",
    "ResumableCheckpoint",
    "UserErrors",
]
