"""Ignite handlers used by the bundles."""

from monai_cxr_ssl.handlers.checkpoint import BestCheckpoint, ResumableCheckpoint
from monai_cxr_ssl.handlers.report import AUROCReport

__all__ = ["AUROCReport", "BestCheckpoint", "ResumableCheckpoint"]
