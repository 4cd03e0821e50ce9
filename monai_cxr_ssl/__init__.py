"""Semi-supervised chest X-ray classification for MONAI."""

__version__ = "0.1.0"
