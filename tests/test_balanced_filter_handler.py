"""BalancedFilter handler: reads a finished pseudo-label file, writes the student's datalist, reports counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from monai_cxr_ssl.data import split_fingerprint
from monai_cxr_ssl.handlers import BalancedFilter
from monai_cxr_ssl.pseudo_labels import PseudoLabelFileWriter, load_filtered_datalist, pseudo_label_header


def _split(n_unlabeled: int, fingerprint: str = "f" * 64, validation: int = 0) -> dict:
    """A split of 10 labeled (20% positive) and ``n_unlabeled`` images; ``validation`` of them moved to validation
    makes another split of the same data."""
    labeled = [{"image": f"/d/l{i}.png", "id": f"l{i}", "label": [float(i < 2)]} for i in range(10)]
    unlabeled = [{"image": f"/d/u{i}.png", "id": f"u{i}", "label": [float(i % 2)]} for i in range(n_unlabeled)]
    split = {"fingerprint": fingerprint, "classes": ["Effusion"], "labeled": labeled,
             "unlabeled": unlabeled[validation:], "validation": unlabeled[:validation], "test": []}
    return {**split, "split_fingerprint": split_fingerprint(split)}


def _pseudo_labels(path, split, probs, tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    torch.save({}, checkpoint)
    header = pseudo_label_header(split["classes"], split["fingerprint"], checkpoint,
                                 split_fingerprint=split["split_fingerprint"])
    with PseudoLabelFileWriter(path, header) as writer:
        ids = [it["id"] for it in split["unlabeled"]]
        labels = np.array([it["label"] for it in split["unlabeled"]], dtype=np.float32)
        writer.write(ids, np.asarray(probs, dtype=np.float32).reshape(-1, 1), labels)


def test_filter_handler_writes_balanced_datalist(tmp_path):
    split = _split(20)
    probs = np.linspace(0.01, 0.99, 20)  # u0 lowest ... u19 highest
    _pseudo_labels(tmp_path / "pl.jsonl", split, probs, tmp_path)
    handler = BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "filtered.json", keep_fraction=0.5)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0])

    items = load_filtered_datalist(tmp_path / "filtered.json", split)
    # K = 10 kept in the labeled proportions (20% positive): the 2 most and the 8 least confident.
    positives = sorted(it["id"] for it in items if it["label"] == [1.0])
    negatives = sorted(it["id"] for it in items if it["label"] == [0.0])
    assert positives == ["u18", "u19"]
    assert negatives == sorted(f"u{i}" for i in range(8))
    assert all(it["image"] == f"/d/{it['id']}.png" for it in items)
    metrics = engine.state.metrics
    assert metrics["filter_kept"] == 10
    assert metrics["filter_kept_positive_Effusion"] == 2 and metrics["filter_kept_negative_Effusion"] == 8
    # True labels alternate: among u0..u7 four are positive (flipped), u19 positive, u18 negative → 5 of 10.
    assert metrics["filter_flip_rate_Effusion"] == pytest.approx(0.5)


def test_aals_sharpening_gives_sharpened_soft_labels(tmp_path):
    from monai_cxr_ssl.sharpening import aals

    split = _split(20)
    probs = np.linspace(0.01, 0.99, 20).astype(np.float32)
    _pseudo_labels(tmp_path / "pl.jsonl", split, probs, tmp_path)
    handler = BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "filtered.json", keep_fraction=1.0,
                             sharpening="aals", aals_t=0.4, aals_a0=4.0)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    engine.run([0])
    items = {it["id"]: it["label"][0] for it in load_filtered_datalist(tmp_path / "filtered.json", split)}
    expected = aals(torch.from_numpy(probs)).numpy()
    assert items == pytest.approx({f"u{i}": float(expected[i]) for i in range(20)})
    assert items["u0"] == pytest.approx(0.01, abs=1e-6) and items["u10"] > probs[10]  # low kept, above t raised
    assert engine.state.metrics["aals_raised_fraction"] == pytest.approx(float((probs > 0.4).mean()))
    with pytest.raises(ValueError, match="a0 must be >= 1"):
        BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "f.json", sharpening="aals", aals_a0=0.5)
    with pytest.raises(ValueError, match="sharpening must be one of"):
        BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "f.json", sharpening="mixup")


def test_filtered_datalist_refuses_another_split(tmp_path):
    """Same images and labels (same dataset fingerprint), another split: an image the filter kept is a validation
    image there. The student refuses the list, naming both split fingerprints."""
    split, other = _split(6), _split(6, validation=2)
    assert split["fingerprint"] == other["fingerprint"] and split["split_fingerprint"] != other["split_fingerprint"]
    _pseudo_labels(tmp_path / "pl.jsonl", split, np.linspace(0.1, 0.9, 6), tmp_path)
    engine = Engine(lambda e, b: None)
    BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "filtered.json").attach(engine)
    engine.run([0])
    assert len(load_filtered_datalist(tmp_path / "filtered.json", split)) > 0
    with pytest.raises(ValueError, match="made for another split") as err:
        load_filtered_datalist(tmp_path / "filtered.json", other)
    assert split["split_fingerprint"] in str(err.value) and other["split_fingerprint"] in str(err.value)


def test_pseudo_label_file_of_another_split_is_refused(tmp_path):
    split = _split(6)
    _pseudo_labels(tmp_path / "pl.jsonl", split, np.full(6, 0.5), tmp_path)
    engine = Engine(lambda e, b: None)
    BalancedFilter(tmp_path / "pl.jsonl", _split(6, "0" * 64), tmp_path / "filtered.json").attach(engine)
    with pytest.raises(ValueError, match="another split or teacher"):
        engine.run([0])
    assert not (tmp_path / "filtered.json").exists()


@pytest.mark.parametrize("kappa", [0.0, 1.5])
def test_keep_fraction_outside_range(tmp_path, kappa):
    with pytest.raises(ValueError, match="keep_fraction"):
        BalancedFilter(tmp_path / "pl.jsonl", _split(4), tmp_path / "f.json", keep_fraction=kappa)


def test_multilabel_filtered_datalist_marks_dropped_labels_nan(tmp_path):
    classes = ["Effusion", "Mass"]
    labeled = [{"image": f"/d/l{i}.png", "id": f"l{i}", "label": [float(i < 5), float(i < 2)]} for i in range(10)]
    unlabeled = [{"image": f"/d/u{i}.png", "id": f"u{i}", "label": [0.0, 0.0]} for i in range(10)]
    split = {"fingerprint": "f" * 64, "classes": classes, "labeled": labeled, "unlabeled": unlabeled,
             "validation": [], "test": []}
    split["split_fingerprint"] = split_fingerprint(split)
    checkpoint = tmp_path / "teacher.pt"
    torch.save({}, checkpoint)
    rng = np.random.default_rng(0)
    header = pseudo_label_header(classes, split["fingerprint"], checkpoint,
                                 split_fingerprint=split["split_fingerprint"])
    with PseudoLabelFileWriter(tmp_path / "pl.jsonl", header) as w:
        w.write([it["id"] for it in unlabeled], rng.random((10, 2)).astype(np.float32))
    engine = Engine(lambda e, b: None)
    BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "filtered.json", keep_fraction=0.4).attach(engine)
    engine.run([0])

    items = load_filtered_datalist(tmp_path / "filtered.json", split)
    labels = np.array([it["label"] for it in items], dtype=float)
    kept = ~np.isnan(labels)
    assert kept.sum(axis=0).tolist() == [4, 4]  # κ·|U| = 4 per pathology
    assert kept.any(axis=1).all()  # every listed image has at least one kept label
    assert set(np.unique(labels[kept])) <= {0.0, 1.0}


def test_quota_follows_the_teachers_predicted_positives_and_is_logged(tmp_path, caplog):
    import logging

    split = _split(20)  # labeled set 20% positive: a quota of round(10 · 0.2) = 2 positives for κ = 0.5
    probs = np.array([0.9] + [0.02] * 19)  # the teacher expects 0.9 + 19 · 0.02 = 1.28 → 1 positive in U
    _pseudo_labels(tmp_path / "pl.jsonl", split, probs, tmp_path)
    for mode, positives in (("min", ["u0"]), ("labeled", ["u0", "u1"])):
        handler = BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / f"{mode}.json", keep_fraction=0.5,
                                 quota_prevalence=mode)
        engine = Engine(lambda e, b: None)
        handler.attach(engine)
        with caplog.at_level(logging.INFO, logger="monai_cxr_ssl"):
            engine.run([0])
        items = load_filtered_datalist(tmp_path / f"{mode}.json", split)
        assert sorted(it["id"] for it in items if it["label"] == [1.0]) == positives, mode
        metrics = engine.state.metrics
        assert metrics["filter_quota_positive_Effusion"] == len(positives)
        assert metrics["filter_predicted_positive_Effusion"] == 1
        assert metrics["filter_predicted_prevalence_Effusion"] == pytest.approx(1.28 / 20, abs=1e-6)
        assert metrics["filter_labeled_prevalence_Effusion"] == pytest.approx(0.2)
    assert ("quota_prevalence=min): Effusion: +1 / -9 (positive quota 1: labeled prevalence 0.200, teacher "
            "predicts 1 positives, prevalence 0.064)") in caplog.text
    with pytest.raises(ValueError, match="quota_prevalence must be one of"):
        BalancedFilter(tmp_path / "pl.jsonl", split, tmp_path / "x.json", quota_prevalence="labelled")
