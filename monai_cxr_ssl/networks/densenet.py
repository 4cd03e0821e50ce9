"""2D DenseNet121 for chest X-rays, initialised from a local torchvision ImageNet checkpoint (never downloaded)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import DenseNet121
from torch import nn

from monai_cxr_ssl.probabilities import probability_layer

__all__ = ["HEADS", "CXRDenseNet121", "encoder_state_dict", "load_encoder", "load_imagenet_weights"]

HEADS = ("linear", "mlp")  # the classification heads CXRDenseNet121 can end with

logger = logging.getLogger("monai_cxr_ssl")

# torchvision names dense-layer parts "norm1" (current) or "norm.1" (the original densenet121-a639ec97.pth);
# MONAI nests them in ".layers": features.denseblock1.denselayer1.norm1.weight -> ...denselayer1.layers.norm1.weight
_DENSE_LAYER_KEY = re.compile(
    r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"
)
_FIRST_CONV = "features.conv0.weight"
_OPTIONAL_SUFFIX = "num_batches_tracked"  # BatchNorm counters, absent from old checkpoints and unused in eval
_ENCODER, _HEAD = "features.", "class_layers."
# What wraps an encoder's keys in pre-training checkpoints: DistributedDataParallel's ``module.``, a SimCLR-style
# model's ``encoder.`` / ``backbone.`` / ``model.``. Stripped (repeatedly) before the keys are matched.
ENCODER_PREFIXES = ("module.", "encoder.", "backbone.", "model.")
PRETRAINING_CHECKPOINT = (
    "a pre-training checkpoint (a state dict whose DenseNet121 feature layers are named features.*, optionally under "
    "encoder., backbone., model. or module.)"
)


def _torchvision_to_monai(key: str) -> str:
    match = _DENSE_LAYER_KEY.match(key)
    return f"{match[1]}.layers.{match[2]}{match[3]}.{match[4]}" if match else key


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn an RGB first-conv kernel (out, 3, k, k) into one for ``in_channels`` inputs.

    One channel: the sum over RGB, which gives the same response to a grey image as the RGB kernel gives to that
    image replicated into three channels. Otherwise the RGB kernels are cycled and rescaled by 3 / in_channels.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3.0 / in_channels)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"ImageNet weights file {path} does not exist; pass the path of a local torchvision DenseNet121 "
            "state dict (e.g. densenet121-a639ec97.pth) or pretrained_weights=None."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load reports a corrupt or foreign file with many unrelated exception types
        raise ValueError(
            f"ImageNet weights file {path} is not a readable PyTorch tensor file ({type(e).__name__}); "
            "pass a torchvision DenseNet121 state dict saved with torch.save."
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"ImageNet weights file {path} does not hold a state dict (a mapping of parameter names to tensors, "
            "optionally under a 'state_dict' key); save one with torch.save(model.state_dict(), path)."
        )
    return state


def load_imagenet_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the feature layers of a torchvision-format DenseNet121 ImageNet checkpoint at ``path`` into ``model``.

    Dense-layer names are mapped onto MONAI's, the RGB first convolution is adapted to the model's input channels
    and the 1000-class ``classifier`` is skipped (the model keeps its own ``class_layers.out`` head).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, or its feature layers do not match ``model``'s names or shapes.
    """
    path = Path(path)
    loaded = {_torchvision_to_monai(k): v for k, v in _read_state_dict(path).items() if not k.startswith("classifier.")}
    target = model.state_dict()
    expected = {k for k in target if k.startswith("features.")}
    if _FIRST_CONV in loaded and loaded[_FIRST_CONV].shape != target[_FIRST_CONV].shape:
        weight = loaded[_FIRST_CONV]
        if weight.ndim != 4 or weight.shape[1] != 3:
            raise ValueError(
                f"ImageNet weights file {path}: {_FIRST_CONV} has shape {tuple(weight.shape)}, expected "
                f"{tuple(target[_FIRST_CONV].shape)} or an RGB kernel with 3 input channels."
            )
        loaded[_FIRST_CONV] = _adapt_first_conv(weight, target[_FIRST_CONV].shape[1])
    missing = sorted(k for k in expected - loaded.keys() if not k.endswith(_OPTIONAL_SUFFIX))
    unexpected = sorted(loaded.keys() - expected)
    mismatched = sorted(
        f"{k} {tuple(loaded[k].shape)} vs {tuple(target[k].shape)}"
        for k in expected & loaded.keys()
        if loaded[k].shape != target[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(
            f"ImageNet weights file {path} does not match {type(model).__name__}'s feature layers; "
            "expected a torchvision DenseNet121 state dict. " + "; ".join(problems)
        )
    target.update(loaded)
    model.load_state_dict(target)
    logger.info(
        "Loaded %d ImageNet tensors from %s; the classification head keeps its initialisation.", len(loaded), path
    )


def _encoder_key(key: str, target: dict[str, torch.Tensor]) -> str | None:
    """The key of ``target`` that a pre-training checkpoint's ``key`` names, None if none."""
    while key.startswith(ENCODER_PREFIXES):
        key = key.split(".", 1)[1]
    key = _torchvision_to_monai(key)
    for candidate in (key, _ENCODER + key):
        if candidate in target and candidate.startswith((_ENCODER, _HEAD)):
            return candidate
    return None


def encoder_state_dict(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a pre-training checkpoint ``state`` that initialise a network whose state dict is ``target``.

    Keys are mapped onto the network's: wrapper prefixes (``ENCODER_PREFIXES``) are stripped, torchvision's
    dense-layer names become MONAI's, and a key without ``features.`` gets it (``encoder.conv0.weight`` →
    ``features.conv0.weight``). Every feature layer must be found, with its shape; a first convolution made for 3
    channels is adapted to the network's (``_adapt_first_conv``). The head (``class_layers``) is taken when the
    checkpoint has it with the same shapes, else it keeps its initialisation. Keys that map nowhere (a projection
    head) are left out.

    Raises:
        ValueError: no key maps onto the feature layers, two keys map onto one, or feature layers are missing or
            of another shape; the message names them.
    """
    mapped: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, value in state.items():
        name = _encoder_key(key, target)
        if name is None:
            continue
        if name in mapped:
            raise ValueError(f"keys {sources[name]!r} and {key!r} both map onto {name}; keep one encoder.")
        mapped[name], sources[name] = value, key
    features = {k: v for k, v in mapped.items() if k.startswith(_ENCODER)}
    if not features:
        sample = ", ".join(list(state)[:5])
        raise ValueError(f"no key maps onto the network's feature layers (keys such as {sample}); expected "
                         f"{PRETRAINING_CHECKPOINT}.")
    first = features.get(_FIRST_CONV)
    if first is not None and first.shape != target[_FIRST_CONV].shape and first.ndim == 4 and first.shape[1] == 3:
        features[_FIRST_CONV] = _adapt_first_conv(first, target[_FIRST_CONV].shape[1])
    expected = [k for k in target if k.startswith(_ENCODER) and not k.endswith(_OPTIONAL_SUFFIX)]
    missing = [k for k in expected if k not in features]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in features.items()
                  if v.shape != target[k].shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("shape mismatch", mismatched)) if keys]
    if problems:
        raise ValueError("its encoder does not fit the network's feature layers: " + "; ".join(problems))
    head = {k: v for k, v in mapped.items() if k.startswith(_HEAD)}
    expected_head = [k for k in target if k.startswith(_HEAD)]
    if set(head) == set(expected_head) and all(v.shape == target[k].shape for k, v in head.items()):
        features.update(head)
    return features


def load_encoder(model: nn.Module, path: str | os.PathLike) -> None:
    """Initialise ``model``'s encoder from the pre-training checkpoint ``path`` (``encoder_state_dict``): a state
    dict (any stage's ``models/model.pt``), or one under a ``state_dict`` or ``network`` key (a stage's
    ``models/last.pt``: its network's weights at the end of its last epoch). A file that does not fit raises a
    one-line ``ValueError`` naming it."""
    from monai_cxr_ssl.checkpoints import read_state_dict

    state = read_state_dict(path, PRETRAINING_CHECKPOINT, wrapper_keys=("state_dict", "network"))
    target = model.state_dict()
    try:
        loaded = encoder_state_dict(state, target)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    model.load_state_dict({**target, **loaded})
    head = "from the checkpoint" if any(k.startswith(_HEAD) for k in loaded) else "at its initialisation"
    logger.info("Initialised the encoder from %s (%d tensors); the classification head is %s.", path, len(loaded),
                head)


class CXRDenseNet121(DenseNet121):
    """2D DenseNet121 returning ``num_classes`` logits (apply the sigmoid outside), optionally ImageNet-initialised.

    Args:
        num_classes: number of output logits.
        in_channels: number of image channels (1 for grey chest X-rays).
        pretrained_weights: path of a local torchvision DenseNet121 ImageNet state dict, or None for random init.
            MONAI's ``pretrained=True`` (a download) is refused.
        encoder_init: path of a pre-training checkpoint whose encoder initialises the network (``load_encoder``),
            after the ImageNet weights; None for none.
        probabilities: None for logits, or how logits become class probabilities (``"sigmoid"``, ``"softmax"`` ...:
            ``monai_cxr_ssl.probabilities.KINDS``): the network ends with that probability layer and returns
            per-class probabilities. The layer has no parameters: a checkpoint loads either way. Exported models use
            it, so that a deployed TorchScript file gives what its metadata promises.
        head: ``"linear"`` (one fully connected layer, the teacher-student paper's) or ``"mlp"`` (seed 003's
            downstream head: dropout, ``head_hidden`` units with ReLU, dropout, the output layer).
        head_hidden: the MLP head's hidden units (seed 003 does not give them).
        head_dropout: the MLP head's dropout probability, before each of its two layers.
        frozen_encoder: a linear probe: the encoder (``features``) takes no gradient and stays in eval mode (its
            BatchNorm statistics frozen) when the network trains; only the head learns.
        kwargs: further :class:`monai.networks.nets.DenseNet` arguments, e.g. ``dropout_prob``.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_channels: int = 1,
        pretrained_weights: str | os.PathLike | None = None,
        probabilities: str | None = None,
        encoder_init: str | os.PathLike | None = None,
        head: str = "linear",
        head_hidden: int = 512,
        head_dropout: float = 0.2,
        frozen_encoder: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("pretrained", False):
            raise ValueError(
                "CXRDenseNet121 never downloads weights: drop pretrained=True and pass "
                "pretrained_weights=<path of a local torchvision DenseNet121 state dict>."
            )
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}.")
        super().__init__(spatial_dims=2, in_channels=in_channels, out_channels=num_classes, **kwargs)
        if head == "mlp":
            features = self.class_layers.out.in_features
            self.class_layers.out = nn.Sequential(nn.Dropout(head_dropout), nn.Linear(features, head_hidden), nn.ReLU(),
                                                  nn.Dropout(head_dropout), nn.Linear(head_hidden, num_classes))
        self.frozen_encoder = frozen_encoder
        if pretrained_weights is not None:
            load_imagenet_weights(self, pretrained_weights)
        if encoder_init is not None:
            load_encoder(self, encoder_init)
        if probabilities is not None:
            self.class_layers.add_module(probabilities, probability_layer(probabilities))
        if frozen_encoder:
            self.features.requires_grad_(False)

    def train(self, mode: bool = True) -> CXRDenseNet121:
        """Set the training mode; a frozen encoder stays in eval mode (a linear probe's BatchNorm statistics are
        the pre-trained encoder's)."""
        super().train(mode)
        if self.frozen_encoder:
            self.features.eval()
        return self

    @torch.jit.export
    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, 1024)`` globally pooled features the classification layer sees; exported with TorchScript, so
        that a deployed model can tell how far an image lies from its training images."""
        layers = self.class_layers
        return layers.flatten(layers.pool(layers.relu(self.features(x))))
