"""Random perspective warp (torchvision's ``RandomPerspective``) on torch tensors, as MONAI transforms.

MONAI has no perspective augmentation and torchvision is not a dependency, so the homography is solved here and
applied with :func:`torch.nn.functional.grid_sample`. Coordinates are pixel indices: the centre of pixel ``(row, col)``
is the point ``(x=col, y=row)``, so the corners of a ``H x W`` image are ``(0, 0)``, ``(W-1, 0)``, ``(W-1, H-1)`` and
``(0, H-1)``, and ``align_corners=False`` in ``grid_sample`` puts those centres where they belong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import get_track_meta
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import (
    GridSampleMode,
    GridSamplePadMode,
    TransformBackends,
    convert_to_dst_type,
    convert_to_tensor,
    ensure_tuple_rep,
    look_up_option,
)

__all__ = ["perspective_grid", "warp_perspective", "RandPerspective", "RandPerspectived"]

Points = Sequence[Sequence[float]] | np.ndarray | torch.Tensor


def _as_corners(points: Points, name: str) -> torch.Tensor:
    """Return ``points`` as a float64 (4, 2) tensor of (x, y) corners."""
    corners = torch.as_tensor(np.asarray(points, dtype=np.float64))
    if corners.shape != (4, 2):
        raise ValueError(
            f"{name} must be 4 (x, y) corners [top-left, top-right, bottom-right, bottom-left], "
            f"got shape {tuple(corners.shape)}."
        )
    return corners


def _homography(startpoints: Points, endpoints: Points) -> torch.Tensor:
    """Solve the 8 coefficients of the homography taking ``endpoints`` (output) to ``startpoints`` (input)."""
    src = _as_corners(startpoints, "startpoints")
    dst = _as_corners(endpoints, "endpoints")
    zeros, ones = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    x, y, u, v = dst[:, 0], dst[:, 1], src[:, 0], src[:, 1]
    # u = (a x + b y + c) / (g x + h y + 1), v = (d x + e y + f) / (g x + h y + 1), linearised per corner
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=1)
    try:
        return torch.linalg.solve(torch.cat([rows_u, rows_v]), torch.cat([u, v]))
    except torch.linalg.LinAlgError as e:
        raise ValueError(
            f"startpoints {src.tolist()} and endpoints {dst.tolist()} do not define a perspective transform "
            "(three or more corners are collinear); pass 4 corners of a non-degenerate quadrilateral."
        ) from e


def perspective_grid(
    startpoints: Points,
    endpoints: Points,
    spatial_size: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Sampling grid (1, H, W, 2) for ``grid_sample(..., align_corners=False)`` that moves ``startpoints`` to
    ``endpoints`` (same semantics as ``torchvision.transforms.functional.perspective``)."""
    height, width = (int(s) for s in spatial_size)
    a, b, c, d, e, f, g, h = _homography(startpoints, endpoints).tolist()
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    denominator = g * xs + h * ys + 1.0
    src_x = (a * xs + b * ys + c) / denominator
    src_y = (d * xs + e * ys + f) / denominator
    grid = torch.stack([(2.0 * src_x + 1.0) / width - 1.0, (2.0 * src_y + 1.0) / height - 1.0], dim=-1)
    return grid.unsqueeze(0).to(dtype)


def warp_perspective(
    img: torch.Tensor,
    startpoints: Points,
    endpoints: Points,
    mode: str = GridSampleMode.BILINEAR,
    padding_mode: str = GridSamplePadMode.ZEROS,
) -> torch.Tensor:
    """Warp ``img`` (C, H, W) or (B, C, H, W) so that the corners ``startpoints`` land on ``endpoints``.

    Corners are (x, y) pixel indices ordered [top-left, top-right, bottom-right, bottom-left]. The output has the
    shape, dtype and device of ``img``; integer images are sampled in float32 and rounded back.
    """
    if img.ndim not in (3, 4):
        raise ValueError(f"warp_perspective expects a (C, H, W) or (B, C, H, W) tensor, got shape {tuple(img.shape)}.")
    work_dtype = img.dtype if img.is_floating_point() else torch.float32
    batch = img.unsqueeze(0) if img.ndim == 3 else img
    grid = perspective_grid(startpoints, endpoints, img.shape[-2:], dtype=work_dtype, device=img.device)
    out = F.grid_sample(
        batch.to(work_dtype),
        grid.expand(batch.shape[0], -1, -1, -1),
        mode=str(look_up_option(mode, GridSampleMode).value),
        padding_mode=str(look_up_option(padding_mode, GridSamplePadMode).value),
        align_corners=False,
    )
    if not img.is_floating_point():
        out = out.round()
    return out.reshape(img.shape).to(img.dtype)


class RandPerspective(RandomizableTransform):
    """Randomly warp a channel-first 2D image with a perspective transform, like torchvision's
    ``RandomPerspective``: each corner moves inward by a random whole number of pixels, up to
    ``distortion_scale`` times half the image width (x) and height (y).

    Args:
        distortion_scale: strength of the distortion, in [0, 1]; 0 leaves the image untouched.
        prob: probability of applying the warp.
        mode: ``grid_sample`` interpolation, "bilinear", "nearest" or "bicubic".
        padding_mode: ``grid_sample`` padding for points outside the image, "zeros", "border" or "reflection".
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        distortion_scale: float = 0.2,
        prob: float = 0.5,
        mode: str = GridSampleMode.BILINEAR,
        padding_mode: str = GridSamplePadMode.ZEROS,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= distortion_scale <= 1.0:
            raise ValueError(f"distortion_scale must be in [0, 1], got {distortion_scale}.")
        self.distortion_scale = float(distortion_scale)
        self.mode = look_up_option(mode, GridSampleMode)
        self.padding_mode = look_up_option(padding_mode, GridSamplePadMode)
        self.startpoints: list[list[int]] = []
        self.endpoints: list[list[int]] = []

    def randomize(self, spatial_size: Sequence[int]) -> None:
        """Decide whether to warp and, if so, draw the corner destinations for an image of ``spatial_size`` (H, W)."""
        super().randomize(None)
        if not self._do_transform:
            return
        height, width = (int(s) for s in spatial_size)
        dx = int(self.distortion_scale * (width // 2))
        dy = int(self.distortion_scale * (height // 2))
        self.startpoints = [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]
        left = [int(self.R.randint(0, dx + 1)) for _ in range(2)]  # top-left, bottom-left
        right = [int(self.R.randint(width - 1 - dx, width)) for _ in range(2)]  # top-right, bottom-right
        top = [int(self.R.randint(0, dy + 1)) for _ in range(2)]  # top-left, top-right
        bottom = [int(self.R.randint(height - 1 - dy, height)) for _ in range(2)]  # bottom-right, bottom-left
        self.endpoints = [[left[0], top[0]], [right[0], top[1]], [right[1], bottom[0]], [left[1], bottom[1]]]

    def __call__(
        self,
        img: NdarrayOrTensor,
        mode: str | None = None,
        padding_mode: str | None = None,
        randomize: bool = True,
    ) -> torch.Tensor:
        """Warp ``img`` (C, H, W); ``mode``/``padding_mode`` override the constructor's for this call only."""
        img_t = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize(img_t.shape[-2:])
        if not self._do_transform or self.endpoints == self.startpoints:
            return img_t
        out = warp_perspective(
            convert_to_tensor(img_t, track_meta=False),
            self.startpoints,
            self.endpoints,
            mode=self.mode if mode is None else mode,
            padding_mode=self.padding_mode if padding_mode is None else padding_mode,
        )
        return convert_to_dst_type(out, img_t)[0]


class RandPerspectived(RandomizableTransform, MapTransform):
    """Dictionary version of :class:`RandPerspective`; all ``keys`` get the same warp (e.g. image and mask).

    Args:
        keys: keys of the items to warp.
        distortion_scale: strength of the distortion, in [0, 1].
        prob: probability of applying the warp.
        mode: ``grid_sample`` interpolation, one value or one per key.
        padding_mode: ``grid_sample`` padding, one value or one per key.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = RandPerspective.backend

    def __init__(
        self,
        keys: KeysCollection,
        distortion_scale: float = 0.2,
        prob: float = 0.5,
        mode: str | Sequence[str] = GridSampleMode.BILINEAR,
        padding_mode: str | Sequence[str] = GridSamplePadMode.ZEROS,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.perspective = RandPerspective(distortion_scale=distortion_scale, prob=1.0)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandPerspectived:
        super().set_random_state(seed, state)
        self.perspective.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        first_key = self.first_key(d)
        if self._do_transform and first_key != ():
            self.perspective.randomize(d[first_key].shape[-2:])
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            if self._do_transform:
                d[key] = self.perspective(d[key], mode=mode, padding_mode=padding_mode, randomize=False)
            else:
                d[key] = convert_to_tensor(d[key], track_meta=get_track_meta())
        return d
