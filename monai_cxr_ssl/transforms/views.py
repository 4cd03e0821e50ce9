"""Two augmented views of one image, for the student and the teacher of mean-teacher training."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from monai.transforms import MapTransform, Randomizable

__all__ = ["TwoViewsd"]


class TwoViewsd(Randomizable, MapTransform):
    """Apply the random ``transform`` twice, independently: once for ``key`` (the student's view) and once more for
    ``view_key`` (the teacher's view), so that the two networks see differently augmented copies of the image. A
    list of view keys gets one independent view each (S²MTS²'s M key views).

    With ``separate=False`` the transform runs once and no second view is added: the teacher sees the student's
    view (``MeanTeacherTrainer`` falls back to ``key``).
    """

    def __init__(
        self,
        transform: Callable[[dict], dict],
        key: Hashable = "image",
        view_key: Hashable | Sequence[Hashable] = "image_teacher",
        separate: bool = True,
    ) -> None:
        MapTransform.__init__(self, keys=key)
        self.transform = transform
        self.key, self.separate = key, separate
        self.view_keys = [view_key] if isinstance(view_key, str) else list(view_key)

    def set_random_state(self, seed: int | None = None, state: Any = None) -> TwoViewsd:
        """Seed the wrapped transform (MONAI's data loaders seed each worker this way)."""
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """The randomness lives in the wrapped transform."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        student = self.transform(dict(data))
        if self.separate:
            for view_key in self.view_keys:
                student[view_key] = self.transform(dict(data))[self.key]
        return student
