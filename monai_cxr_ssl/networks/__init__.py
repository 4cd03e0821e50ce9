"""Classification networks for chest X-rays."""

from .densenet import CXRDenseNet121, load_imagenet_weights

__all__ = ["CXRDenseNet121", "load_imagenet_weights"]
