"""Classification networks for chest X-rays."""

from .densenet import CXRDenseNet121, encoder_state_dict, load_encoder, load_imagenet_weights
from .simclr import SimCLRNetwork

__all__ = ["CXRDenseNet121", "SimCLRNetwork", "encoder_state_dict", "load_encoder", "load_imagenet_weights"]
