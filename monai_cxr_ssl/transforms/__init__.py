"""Augmentations MONAI lacks: random perspective warp and ten-crop test-time augmentation."""

from .perspective import RandPerspective, RandPerspectived, perspective_grid, warp_perspective
from .tencrop import ten_crop

__all__ = ["RandPerspective", "RandPerspectived", "perspective_grid", "warp_perspective", "ten_crop"]
