"""A toy label-free pre-training stage for the tests: the network learns by how many quarter turns each image was
rotated (the pretext task of Gidaris et al., 2018), a target the stage makes itself. ``register()`` adds it to the
method registry as ``pretrain=toy_rotation``."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.transforms import MapTransform, Randomizable

from monai_cxr_ssl import methods

NAME = "toy_rotation"
OVERLAY = Path(__file__).resolve().parent / "data" / "toy_rotation.json"
KIND = methods.StageKind(NAME, ("train.json", str(OVERLAY)), labels=False)


class RandRotate90Labeld(Randomizable, MapTransform):
    """Rotates ``keys`` by k quarter turns, k drawn from 0–3, and sets ``label_key`` to k one-hot (4 classes)."""

    def __init__(self, keys: str = "image", label_key: str = "label") -> None:
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self.turns = 0

    def randomize(self, data: object = None) -> None:
        self.turns = int(self.R.randint(4))

    def __call__(self, data: dict) -> dict:
        self.randomize()
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.rot90(torch.as_tensor(d[key]), self.turns, dims=(-2, -1))
        d[self.label_key] = torch.nn.functional.one_hot(torch.tensor(self.turns), 4).float()
        return d


def register() -> methods.Pretraining:
    """Add the toy stage to the registry (``methods.unregister(NAME)`` takes it out)."""
    return methods.register(methods.Pretraining(KIND, "predicts each image's rotation (a test's toy)"))
