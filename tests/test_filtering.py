"""Balanced pseudo-label filter: quotas, most-confident selection, shortfalls, multi-label masks, datalists."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from monai_cxr_ssl.filtering import balanced_filter, class_proportions, filtered_datalist, flip_rate


def reference_kept(p: np.ndarray, quota_pos: int, quota_neg: int, threshold: float = 0.5) -> tuple[set, set]:
    """Kept positives / negatives by a full sort: highest (lowest) probability first, ties to the lower index."""
    pos = sorted((i for i in range(len(p)) if p[i] >= threshold), key=lambda i: (-p[i], i))
    neg = sorted((i for i in range(len(p)) if p[i] < threshold), key=lambda i: (p[i], i))
    return set(pos[:quota_pos]), set(neg[:quota_neg])


def kept_sets(result, c: int = 0) -> tuple[set, set]:
    mask = result.mask[:, c]
    positive = result.positive[:, c]
    return set(np.flatnonzero(mask & positive).tolist()), set(np.flatnonzero(mask & ~positive).tolist())


def test_quotas_follow_labeled_proportions_and_keep_most_confident():
    # two decimals give many ties, which must go to the lower index
    p = np.round(np.random.default_rng(0).random(100), 2)
    result = balanced_filter(p, positive_fraction=0.2, keep_fraction=0.5, threshold=0.5)
    counts = result.counts["class_0"]
    assert (counts["quota_positive"], counts["quota_negative"]) == (10, 40)
    assert (counts["kept_positive"], counts["kept_negative"]) == (10, 40)
    assert counts["candidates_positive"] == int((p >= 0.5).sum())
    assert counts["candidates_negative"] == int((p < 0.5).sum())
    assert kept_sets(result) == reference_kept(p, 10, 40)
    assert result.shortfalls == []
    assert set(np.unique(result.labels[result.mask])) == {0.0, 1.0}
    np.testing.assert_array_equal(result.kept_images, np.flatnonzero(result.mask[:, 0]))


def test_shortfall_recorded_and_not_refilled(caplog):
    p = np.concatenate([[0.9, 0.8, 0.7], np.linspace(0.0, 0.4, 97)])  # only 3 positive candidates
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        result = balanced_filter(p, positive_fraction=0.2, keep_fraction=0.5, threshold=0.5, class_names=["Effusion"])
    counts = result.counts["Effusion"]
    assert (counts["quota_positive"], counts["kept_positive"], counts["candidates_positive"]) == (10, 3, 3)
    assert counts["kept_negative"] == 40  # the 7 missing positives are not replaced by negatives
    assert result.mask.sum() == 43
    assert len(result.shortfalls) == 1 and "Effusion" in result.shortfalls[0] and "positive" in result.shortfalls[0]
    assert result.shortfalls[0] in caplog.text


def test_ranking_only_fills_both_quotas_whatever_the_calibration():
    # a teacher that puts every image above 0.5: the paper's rule still keeps the lowest as negatives
    p = np.round(np.random.default_rng(1).uniform(0.6, 1.0, 50), 2)
    result = balanced_filter(p, positive_fraction=0.3, keep_fraction=0.8)
    assert result.threshold is None and result.shortfalls == []
    counts = result.counts["class_0"]
    assert (counts["kept_positive"], counts["kept_negative"]) == (12, 28)
    ranked = sorted(range(len(p)), key=lambda i: (-p[i], i))
    positives, negatives = kept_sets(result)
    assert positives == set(ranked[:12])
    assert negatives == set(sorted(set(ranked[12:]), key=lambda i: (p[i], i))[:28])
    assert min(p[sorted(positives)]) >= max(p[sorted(negatives)])
    soft = balanced_filter(p, positive_fraction=0.3, keep_fraction=0.8, soft=True)
    np.testing.assert_array_equal(soft.mask, result.mask)
    np.testing.assert_allclose(soft.labels[soft.mask], p[soft.mask[:, 0]].astype(np.float32))


def test_threshold_moves_candidates():
    p = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05])
    result = balanced_filter(p, positive_fraction=0.5, keep_fraction=0.6, threshold=0.7)
    assert result.counts["class_0"]["candidates_positive"] == 3
    assert kept_sets(result) == ({0, 1, 2}, {9, 8, 7})
    result = balanced_filter(p, positive_fraction=0.5, keep_fraction=1.0, threshold=0.7)
    assert kept_sets(result) == ({0, 1, 2}, {9, 8, 7, 6, 5})  # 3 positive candidates for a quota of 5
    assert len(result.shortfalls) == 1


def test_ties_broken_by_index():
    p = np.array([0.1, 0.9, 0.9, 0.1, 0.9, 0.9, 0.1, 0.1])
    first = balanced_filter(p, positive_fraction=0.5, keep_fraction=0.5)
    assert kept_sets(first) == ({1, 2}, {0, 3})
    again = balanced_filter(p, positive_fraction=0.5, keep_fraction=0.5)
    np.testing.assert_array_equal(first.mask, again.mask)


def test_soft_labels_are_the_probabilities():
    p = np.random.default_rng(1).random(50)
    hard = balanced_filter(p, positive_fraction=0.4, keep_fraction=0.6)
    soft = balanced_filter(p, positive_fraction=0.4, keep_fraction=0.6, soft=True)
    np.testing.assert_array_equal(hard.mask, soft.mask)
    assert soft.labels.dtype == np.float32
    np.testing.assert_array_equal(soft.labels[soft.mask], p[:, None][soft.mask].astype(np.float32))
    np.testing.assert_array_equal(soft.labels[:, 0] >= 0.5, hard.labels[:, 0] == 1.0)


def test_keep_fraction_one_with_enough_candidates_keeps_everything():
    p = np.array([0.9, 0.6, 0.8, 0.1, 0.2, 0.3, 0.05, 0.4, 0.45, 0.0])
    result = balanced_filter(p, positive_fraction=0.3, keep_fraction=1.0)
    assert result.mask.all() and result.shortfalls == []
    np.testing.assert_array_equal(result.labels[:, 0], (p >= 0.5).astype(np.float32))


def test_multilabel_per_class_quotas_and_masks():
    rng = np.random.default_rng(2)
    p = np.round(rng.random((40, 3)), 2)
    fractions = [0.1, 0.5, 0.0]
    result = balanced_filter(p, fractions, keep_fraction=0.5, class_names=["a", "b", "c"])
    assert result.mask.shape == result.labels.shape == (40, 3)
    for c, name in enumerate("abc"):
        quota_pos = int(np.floor(20 * fractions[c] + 0.5))
        counts = result.counts[name]
        assert (counts["quota_positive"], counts["quota_negative"]) == (quota_pos, 20 - quota_pos)
        assert kept_sets(result, c) == reference_kept(p[:, c], quota_pos, 20 - quota_pos)
        single = balanced_filter(p[:, c], fractions[c], keep_fraction=0.5)
        np.testing.assert_array_equal(result.mask[:, c], single.mask[:, 0])
    np.testing.assert_array_equal(result.kept_images, np.flatnonzero(result.mask.any(axis=1)))
    assert result.counts["c"]["kept_positive"] == 0


def test_flip_rate_known_case():
    p = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6], [0.3, 0.1]])
    truth = np.array([[1, 0], [0, 1], [0, 0], [1, 1]])
    result = balanced_filter(p, [0.5, 0.5], keep_fraction=1.0)
    # class 0: kept 0(+),1(+),2(-),3(-): flips at 1 and 3; class 1: kept 1(+),2(+),0(-),3(-): flips at 2 and 3
    np.testing.assert_allclose(flip_rate(result, truth), [0.5, 0.5])
    result = balanced_filter(p, [0.5, 0.5], keep_fraction=0.5, soft=True)
    # class 0 keeps 0(+) and 2(-): no flip; class 1 keeps 1(+) and 3(-): 3 flipped
    np.testing.assert_allclose(flip_rate(result, torch.tensor(truth)), [0.0, 0.5])
    empty = balanced_filter(np.zeros((0, 2)), [0.5, 0.5])
    assert np.isnan(flip_rate(empty, np.zeros((0, 2)))).all()
    with pytest.raises(ValueError, match="true_labels"):
        flip_rate(result, truth[:, :1])


def test_filtered_datalist_binary_and_multilabel():
    items = [{"image": f"/u/{i}.png", "label": [0.0], "id": f"{i}.png"} for i in range(4)]
    result = balanced_filter(np.array([0.9, 0.6, 0.4, 0.1]), 0.5, keep_fraction=0.5)
    out = filtered_datalist(items, result)
    assert out == [
        {"image": "/u/0.png", "id": "0.png", "label": [1.0]},
        {"image": "/u/3.png", "id": "3.png", "label": [0.0]},
    ]
    multi_items = [{"image": f"/u/{i}.png", "label": [0.0, 0.0], "id": f"{i}.png"} for i in range(4)]
    p = np.array([[0.9, 0.5], [0.6, 0.5], [0.4, 0.5], [0.1, 0.5]])
    result = balanced_filter(p, [0.5, 0.0], keep_fraction=0.5, threshold=0.5)  # class 1: no negative candidates
    out = filtered_datalist(multi_items, result)
    assert [it["id"] for it in out] == ["0.png", "3.png"]
    assert out[0]["label"] == [1.0, 0.0] and out[0]["label_mask"] == [1.0, 0.0]
    assert out[1]["label_mask"] == [1.0, 0.0]
    with pytest.raises(ValueError, match="4 predictions"):
        filtered_datalist(items[:3], result)


def test_class_proportions():
    items = [{"image": "x", "id": "x", "label": lab} for lab in ([1, 0], [0, 0], [1, 1], [0, 0])]
    np.testing.assert_allclose(class_proportions(items), [0.5, 0.25])
    with pytest.raises(ValueError, match="non-empty"):
        class_proportions([])


@pytest.mark.parametrize("keep_fraction", [0.0, -0.1, 1.5])
def test_invalid_keep_fraction(keep_fraction):
    with pytest.raises(ValueError, match="keep_fraction"):
        balanced_filter(np.array([0.2, 0.8]), 0.5, keep_fraction=keep_fraction)


@pytest.mark.parametrize(
    "probs, fraction, names",
    [
        ([0.2, 1.2], 0.5, None),
        ([0.2, -0.1], 0.5, None),
        ([0.2, np.nan], 0.5, None),
        ([0.2, 0.8], 1.5, None),
        ([[0.2, 0.8, 0.1]], [0.5, 0.5], None),
        ([[0.2, 0.8]], [0.5, 0.5], ["only_one"]),
        (np.zeros((2, 2, 2)), 0.5, None),
    ],
)
def test_invalid_inputs(probs, fraction, names):
    with pytest.raises(ValueError):
        balanced_filter(np.asarray(probs), fraction, class_names=names)


def test_empty_predictions():
    result = balanced_filter(np.zeros(0), 0.3)
    assert result.mask.shape == (0, 1) and result.kept_images.size == 0 and result.shortfalls == []
    assert result.counts["class_0"]["quota_positive"] == 0


def test_accepts_torch_and_numpy():
    p = np.random.default_rng(3).random((30, 2))
    from_numpy = balanced_filter(p, np.array([0.3, 0.6]), soft=True)
    from_torch = balanced_filter(torch.from_numpy(p).float(), torch.tensor([0.3, 0.6]), soft=True)
    assert isinstance(from_torch.mask, np.ndarray) and isinstance(from_torch.labels, np.ndarray)
    np.testing.assert_array_equal(from_numpy.mask, from_torch.mask)
    np.testing.assert_allclose(from_numpy.labels, from_torch.labels, atol=1e-6)


def test_random_inputs_respect_quotas_and_sides():
    rng = np.random.default_rng(4)
    for _ in range(300):
        n, num_classes = int(rng.integers(0, 60)), int(rng.integers(1, 4))
        p = np.round(rng.random((n, num_classes)), int(rng.integers(1, 4)))
        fractions = rng.random(num_classes)
        keep, threshold = float(rng.uniform(0.01, 1.0)), float(rng.uniform(0.05, 0.95))
        result = balanced_filter(p, fractions, keep_fraction=keep, threshold=threshold, soft=bool(rng.integers(2)))
        for c, counts in enumerate(result.counts.values()):
            positives, negatives = kept_sets(result, c)
            assert positives.isdisjoint(negatives)
            assert all(p[i, c] >= threshold for i in positives) and all(p[i, c] < threshold for i in negatives)
            assert counts["quota_positive"] + counts["quota_negative"] == int(np.floor(keep * n + 0.5))
            assert counts["kept_positive"] == len(positives) <= counts["quota_positive"]
            assert counts["kept_negative"] == len(negatives) <= counts["quota_negative"]
            assert counts["kept_positive"] == min(counts["quota_positive"], counts["candidates_positive"])
            assert counts["kept_negative"] == min(counts["quota_negative"], counts["candidates_negative"])
            assert result.mask[:, c].sum() == len(positives) + len(negatives)


def test_positive_quota_is_capped_by_the_teachers_predicted_positives():
    """Hand-computed: N = 10, κ = 1 → K = 10. Class 0: labeled prevalence 0.5 (quota 5) but the probabilities sum
    to 2.0 (cap 2); class 1: labeled prevalence 0.1 (quota 1), probabilities summing to 4.4 (cap 4)."""
    probs = np.zeros((10, 2))
    probs[:, 0] = [0.9, 0.3] + [0.1] * 8
    probs[:, 1] = [0.8, 0.2, 0.9, 0.1, 0.7, 0.3, 0.6, 0.4, 0.2, 0.2]
    expected = {  # mode: (class 0 positives, class 1 positives)
        "labeled": ([0, 1, 2, 3, 4], [2]),  # the paper; ties at 0.1 go to the lower index
        "predicted": ([0, 1], [0, 2, 4, 6]),  # round(10 · 0.2) = 2, round(10 · 0.44) = 4
        "min": ([0, 1], [2]),  # min(5, 2), min(1, 4)
    }
    for mode, (pos0, pos1) in expected.items():
        result = balanced_filter(probs, [0.5, 0.1], keep_fraction=1.0, class_names=["Edema", "Mass"],
                                 quota_prevalence=mode)
        assert np.flatnonzero(result.positive[:, 0]).tolist() == pos0, mode
        assert np.flatnonzero(result.positive[:, 1]).tolist() == pos1, mode
        assert result.mask.all()  # K = N: every pseudo-label kept, the quota only moves the positive/negative line
        assert result.counts["Edema"]["quota_positive"] == len(pos0)
        assert result.counts["Edema"]["quota_negative"] == 10 - len(pos0)
    counts = result.counts
    assert counts["Edema"]["predicted_positive"] == 2 and counts["Mass"]["predicted_positive"] == 4
    assert counts["Edema"]["predicted_prevalence"] == pytest.approx(0.2)
    assert counts["Mass"]["predicted_prevalence"] == pytest.approx(0.44)
    assert counts["Edema"]["labeled_prevalence"] == 0.5
    with pytest.raises(ValueError, match=r"quota_prevalence must be one of \('labeled', 'predicted', 'min'\), "
                                         "got 'teacher'"):
        balanced_filter(probs, [0.5, 0.1], quota_prevalence="teacher")
