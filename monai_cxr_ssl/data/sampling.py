"""How many images a training epoch draws."""

from __future__ import annotations

__all__ = ["samples_per_epoch"]


def samples_per_epoch(num_images: int, batch_size: int) -> int:
    """``num_images``, less one when the epoch's last batch would hold a single image.

    Batch norm cannot normalise a batch of one image in training ("Expected more than 1 value per channel"), so the
    training loaders' random samplers draw one image fewer then; every other incomplete last batch is kept, and a
    different image sits out in each epoch since the sampler shuffles.
    """
    if num_images < 1:
        raise ValueError("the training set is empty; check the split (labeled_fraction, the data source).")
    if num_images == 1:
        raise ValueError("the training set holds a single image, and batch norm cannot train on a batch of one; "
                         "use a larger labeled_fraction or more images.")
    return num_images - 1 if num_images % batch_size == 1 else num_images
