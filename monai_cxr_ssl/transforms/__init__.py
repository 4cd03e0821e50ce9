"""Augmentations MONAI lacks: random perspective warp, ten-crop test-time augmentation, two-view augmentation."""

from .perspective import RandPerspective, RandPerspectived, perspective_grid, warp_perspective
from .tencrop import ten_crop
from .views import TwoViewsd

__all__ = ["RandPerspective", "RandPerspectived", "TwoViewsd", "perspective_grid", "warp_perspective", "ten_crop"]
