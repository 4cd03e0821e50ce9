"""Speed of ``balanced_filter`` against a full ``np.argsort`` of each class's probabilities, in the same run.

Two sizes: 1,000,000 binary predictions and 100,000 x 14 multi-label predictions (ChestX-ray14's classes), drawn
from a synthetic teacher whose probabilities lean towards the true labels.
The baseline sorts all probabilities of a class once and takes the quotas from both ends, the straightforward
implementation. Both filter rules are timed: ranking only (the paper's, the default) and a 0.5 threshold. Prints
the median of 5 timings and the ratio, and writes them to ``bench/results/filter_speed.json``; asserts nothing.

    python bench/filter_speed.py
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import numpy as np
from _results import write_results  # a sibling module: bench/ is on sys.path when run as bench/<script>.py

from monai_cxr_ssl.filtering import balanced_filter


def sort_baseline(
    probs: np.ndarray, fractions: np.ndarray, keep_fraction: float, threshold: float | None = None
) -> np.ndarray:
    """The kept mask by one full ``np.argsort`` per class: negatives from the low end, positives from the high end.

    Among equal probabilities the positives it takes differ from ``balanced_filter``'s (higher index first), which
    does not matter for the continuous random probabilities used here.
    """
    probs = probs.reshape(len(probs), -1)
    mask = np.zeros(probs.shape, dtype=bool)
    total = int(np.floor(keep_fraction * len(probs) + 0.5))
    for c in range(probs.shape[1]):
        quota_pos = int(np.floor(total * fractions[c] + 0.5))
        order = np.argsort(probs[:, c], kind="stable")
        if threshold is None:  # ranking only: the quotas straight from both ends
            mask[order[: total - quota_pos], c] = True
            mask[order[len(order) - quota_pos :], c] = True
            continue
        num_neg = int(np.searchsorted(probs[order, c], threshold, side="left"))
        mask[order[: min(total - quota_pos, num_neg)], c] = True
        mask[order[max(num_neg, len(order) - quota_pos) :], c] = True
    return mask


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    rng = np.random.default_rng(0)

    def teacher_probs(shape: tuple[int, ...], prevalence: np.ndarray) -> np.ndarray:
        """A fair teacher: Beta(8, 2) probabilities for the positives, Beta(2, 8) for the negatives."""
        positive = rng.random(shape) < prevalence
        return np.where(positive, rng.beta(8, 2, shape), rng.beta(2, 8, shape))

    binary_prevalence, multi_prevalence = np.array([0.3]), rng.uniform(0.01, 0.2, 14)
    cases = {
        "binary 1,000,000 x 1": (teacher_probs((1_000_000,), binary_prevalence), binary_prevalence),
        "multi-label 100,000 x 14": (teacher_probs((100_000, 14), multi_prevalence), multi_prevalence),
    }
    rows = []
    for (name, (probs, fractions)), threshold in itertools.product(cases.items(), (None, 0.5)):
        ours = balanced_filter(probs, fractions, keep_fraction=0.75, threshold=threshold)
        if not np.array_equal(ours.mask, sort_baseline(probs, fractions, 0.75, threshold)):
            print(f"{name}: WARNING, the baseline keeps a different set")
        t_filter = median_time(lambda p=probs, f=fractions, t=threshold: balanced_filter(p, f, 0.75, threshold=t))
        t_sort = median_time(lambda p=probs, f=fractions, t=threshold: sort_baseline(p, f, 0.75, t))
        print(
            f"{name}, threshold {threshold}: balanced_filter {t_filter * 1e3:8.1f} ms | full argsort baseline "
            f"{t_sort * 1e3:8.1f} ms | baseline / filter = {t_sort / t_filter:.2f}x"
        )
        rows.append({"predictions": name, "threshold": threshold, "balanced_filter_ms": round(t_filter * 1e3, 1),
                     "full_argsort_ms": round(t_sort * 1e3, 1), "ratio": round(t_sort / t_filter, 2)})
    write_results(__file__, {"rows": rows}, {"keep_fraction": 0.75, "repeats": 5, "seed": 0})


if __name__ == "__main__":
    main()
