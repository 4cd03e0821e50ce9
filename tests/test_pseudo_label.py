"""Pseudo-label files (atomic streaming writer, checked reader) and the evaluator handler that writes them."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import Activationsd
from sklearn.metrics import roc_auc_score

from monai_cxr_ssl.handlers.pseudo_label import PseudoLabelWriter
from monai_cxr_ssl.pseudo_labels import (
    PseudoLabelFileWriter,
    file_sha256,
    pseudo_label_header,
    read_pseudo_labels,
)

CLASSES = ["Effusion", "Nodule"]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "teacher.pt"
    path.parent.mkdir()
    path.write_bytes(b"teacher weights " * 1000)
    return path


@pytest.fixture
def header(checkpoint):
    return pseudo_label_header(CLASSES, "fp-abc", checkpoint, teacher_run_id="run-1")


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"images/{i:05d}.png" for i in range(n)]
    return ids, rng.random((n, len(CLASSES)), dtype=np.float32), rng.integers(0, 2, (n, len(CLASSES)))


def _write(path, header, ids, probs, labels=None):
    with PseudoLabelFileWriter(path, header) as writer:
        for s in range(0, len(ids), 4):
            writer.write(ids[s : s + 4], probs[s : s + 4], None if labels is None else labels[s : s + 4])


def test_file_sha256_reads_in_chunks(checkpoint):
    expected = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert file_sha256(checkpoint, chunk_size=100) == file_sha256(checkpoint) == expected


def test_writer_publishes_only_on_commit(tmp_path, header):
    path = tmp_path / "out" / "pseudo.jsonl"
    writer = PseudoLabelFileWriter(path, header)
    ids, probs, _ = _rows(3)
    writer.write(ids, probs)
    assert not path.exists()
    (temp,) = path.parent.iterdir()
    assert temp.name.startswith(".pseudo.jsonl.") and temp.name.endswith(".tmp")
    writer.commit()
    assert [p.name for p in path.parent.iterdir()] == ["pseudo.jsonl"]
    with pytest.raises(RuntimeError, match="already committed"):
        writer.write(ids, probs)


def test_abort_and_exception_leave_nothing(tmp_path, header):
    path = tmp_path / "pseudo.jsonl"
    writer = PseudoLabelFileWriter(path, header)
    writer.write(*_rows(3)[:2])
    writer.abort()
    writer.abort()  # a second abort is harmless
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]
    with pytest.raises(KeyError):
        with PseudoLabelFileWriter(path, header) as writer:
            writer.write(*_rows(3)[:2])
            raise KeyError("stop")
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


def test_round_trip_and_header(tmp_path, header, checkpoint):
    path = tmp_path / "pseudo.jsonl"
    ids, probs, labels = _rows(10)
    ids[3] = 'odd "name" é.png'
    _write(path, header, ids, probs, labels)
    read_header, read_ids, read_probs, read_labels = read_pseudo_labels(
        path, expected_fingerprint="fp-abc", expected_checkpoint_sha256=file_sha256(checkpoint)
    )
    assert read_header == {
        "format": "monai_cxr_ssl.pseudo_labels",
        "version": 1,
        "classes": CLASSES,
        "dataset_fingerprint": "fp-abc",
        "teacher_checkpoint": str(checkpoint),
        "teacher_checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        "teacher_run_id": "run-1",
        "split_fingerprint": None,
    }
    assert read_ids == ids
    assert read_probs.dtype == np.float32 and np.array_equal(read_probs, probs)
    assert np.array_equal(read_labels, labels)
    lines = path.read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[-1]) == {"count": 10}
    first = json.loads(lines[1])
    assert set(first) == {"id", "probs", "label"} and first["id"] == ids[0]
    assert np.array_equal(np.float32(first["probs"]), probs[0]) and first["label"] == labels[0].tolist()


def test_round_trip_without_labels(tmp_path, header):
    path = tmp_path / "pseudo.jsonl"
    ids, probs, _ = _rows(5)
    _write(path, header, ids, probs)
    _, read_ids, read_probs, read_labels = read_pseudo_labels(path)
    assert read_ids == ids and np.array_equal(read_probs, probs) and read_labels is None
    assert all("label" not in json.loads(line) for line in path.read_text().splitlines())


def test_empty_file_round_trip(tmp_path, header):
    path = tmp_path / "pseudo.jsonl"
    PseudoLabelFileWriter(path, header).commit()
    _, ids, probs, labels = read_pseudo_labels(path)
    assert ids == [] and probs.shape == (0, 2) and labels is None


@pytest.mark.parametrize(
    "expected, what",
    [({"expected_fingerprint": "fp-other"}, "fingerprint"), ({"expected_checkpoint_sha256": "0" * 64}, "hash")],
)
def test_mismatch_asks_to_rerun(tmp_path, header, expected, what):
    path = tmp_path / "pseudo.jsonl"
    _write(path, header, *_rows(3)[:2])
    with pytest.raises(ValueError, match=f"pseudo.jsonl was made for another split or teacher.*{what}.*re-run"):
        read_pseudo_labels(path, **expected)


def _drop_last_line(text):
    return text[: text.rstrip("\n").rfind("\n") + 1]


def _cut_half_way_through_the_rows(text):
    """Cut after the header, half way through the rest: the header holds a tmp path, so half the whole text could
    fall inside it."""
    rows = text.index("\n") + 1
    return text[: rows + (len(text) - rows) // 2]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: "id,prob\na,0.5\n", "not a pseudo-label file"),
        (lambda text: "", "not a pseudo-label file"),
        (lambda text: text.replace('"version": 1', '"version": 9'), "version 9"),
        (lambda text: text.replace('"classes": ["Effusion", "Nodule"], ', ""), "header is incomplete"),
        (_drop_last_line, "truncated"),
        (_cut_half_way_through_the_rows, "truncated"),
        (lambda text: text.replace("images/00001.png", "images/00000.png"), "repeats an earlier image id"),
        (lambda text: text.replace('"count": 6', '"count": 7'), "end marker counts 7"),
        (lambda text: text.replace('"probs": [', '"probs": [0.5, ', 1), "corrupt at line 2"),
        (lambda text: text.replace('"probs": [', '"probs": [7', 1), "outside \\[0, 1\\]"),
        (lambda text: text + '{"id": "late", "probs": [0.1, 0.2]}\n', "follows the end marker"),
    ],
)
def test_damaged_file_is_refused(tmp_path, header, damage, message):
    path = tmp_path / "pseudo.jsonl"
    _write(path, header, *_rows(6)[:2])
    path.write_text(damage(path.read_text()))
    with pytest.raises(ValueError, match=message) as err:
        read_pseudo_labels(path)
    assert str(path) in str(err.value)


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a pseudo-label file"):
        read_pseudo_labels(path)


def test_writer_rejects_bad_rows(tmp_path, header):
    with PseudoLabelFileWriter(tmp_path / "pseudo.jsonl", header) as writer:
        with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
            writer.write(["a"], [[0.5, 1.5]])
        with pytest.raises(ValueError, match="do not match 2 ids and 2 classes"):
            writer.write(["a", "b"], [[0.5, 0.5]])
        with pytest.raises(ValueError, match="ids must be strings"):
            writer.write([7], [[0.5, 0.5]])
        writer.write(["a"], [[0.5, 0.5]], labels=[[1, 0]])
        with pytest.raises(ValueError, match="every batch comes with labels or none"):
            writer.write(["b"], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="header is incomplete"):
        PseudoLabelFileWriter(tmp_path / "other.jsonl", {**header, "classes": []})


def test_writer_memory_does_not_grow_with_rows(tmp_path, checkpoint):
    path = tmp_path / "pseudo.jsonl"
    ids = [f"images/{i:08d}_000.png" for i in range(1000)]
    probs = np.random.default_rng(0).random((1000, 1), dtype=np.float32)
    tracemalloc.start()
    try:
        with PseudoLabelFileWriter(path, pseudo_label_header(["Effusion"], "fp", checkpoint)) as writer:
            writer.write(ids, probs)
            tracemalloc.reset_peak()
            baseline = tracemalloc.get_traced_memory()[0]
            for _ in range(199):
                writer.write(ids, probs)
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert writer.count == 200_000
    assert path.stat().st_size > 8_000_000  # the rows went to disk...
    assert peak - baseline < 5_000_000  # ...not into memory


def _evaluator(handler, num_images=7, bad_from=None):
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, len(CLASSES)))
    labels = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    data = [
        {"image": torch.rand(1, 4, 4), "label": torch.tensor(labels[i % 4]), "id": f"img_{num_images - i:03d}"}
        for i in range(num_images)
    ]
    for item in data[bad_from:] if bad_from is not None else []:
        item["image"] = torch.rand(1, 5, 5)  # wrong size: the network fails on the batches holding these
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=3),
        network=network,
        postprocessing=Activationsd(keys="pred", sigmoid=True),
        val_handlers=[handler],
    )
    return evaluator, network, data


def test_handler_writes_one_row_per_image_in_datalist_order(tmp_path, checkpoint):
    out = tmp_path / "pseudo" / "unlabeled.jsonl"
    handler = PseudoLabelWriter(out, CLASSES, "fp-abc", checkpoint)
    evaluator, network, data = _evaluator(handler)
    seen = {}
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(e.state.metrics))  # like MLFlowHandler
    evaluator.run()

    header, ids, probs, labels = read_pseudo_labels(out, expected_fingerprint="fp-abc")
    assert header["teacher_checkpoint_sha256"] == file_sha256(checkpoint) and header["teacher_run_id"] is None
    assert ids == [item["id"] for item in data] and labels is None
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.stack([item["image"] for item in data]))).numpy()
    np.testing.assert_allclose(probs, expected, rtol=1e-6)
    assert probs.min() >= 0 and probs.max() <= 1

    assert handler.output_file == out and handler.histogram_file == out.with_name("unlabeled_hist.png")
    assert handler.histogram_file.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.parent.iterdir()) == ["unlabeled.jsonl", "unlabeled_hist.png"]
    summary = handler.summary
    assert summary["num_images"] == 7 and len(summary["bin_edges"]) == 21
    for k, name in enumerate(CLASSES):
        assert summary["histogram"][name] == np.histogram(probs[:, k], bins=20, range=(0, 1))[0].tolist()
        assert summary["mean_probability"][name] == pytest.approx(probs[:, k].mean(), rel=1e-5)
        assert summary["predicted_positive"][name] == int((probs[:, k] >= 0.5).sum())
    assert "accuracy" not in summary and "auroc" not in summary
    assert seen == evaluator.state.metrics == {"pseudo_label_count": 7}


def test_handler_with_labels_reports_accuracy_and_auroc(tmp_path, checkpoint):
    out = tmp_path / "unlabeled.jsonl"
    handler = PseudoLabelWriter(out, CLASSES, "fp-abc", checkpoint, teacher_run_id="run-9", include_labels=True)
    evaluator, _, data = _evaluator(handler, num_images=8)
    seen = {}
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(e.state.metrics))
    evaluator.run()

    header, _, probs, labels = read_pseudo_labels(out)
    assert header["teacher_run_id"] == "run-9"
    np.testing.assert_array_equal(labels, np.stack([item["label"].numpy() for item in data]))
    aurocs = [roc_auc_score(labels[:, k], probs[:, k]) for k in range(len(CLASSES))]
    accuracy = ((probs >= 0.5) == labels).mean()
    assert handler.summary["auroc"] == pytest.approx(dict(zip(CLASSES, aurocs, strict=True)))
    assert seen["pseudo_label_count"] == 8
    assert seen["pseudo_label_auroc"] == pytest.approx(np.mean(aurocs))
    assert seen["pseudo_label_accuracy"] == pytest.approx(accuracy)


def test_handler_leaves_no_file_when_the_run_fails(tmp_path, checkpoint):
    handler = PseudoLabelWriter(tmp_path / "out" / "unlabeled.jsonl", CLASSES, "fp-abc", checkpoint)
    evaluator, _, _ = _evaluator(handler, bad_from=3)
    with pytest.raises(RuntimeError):
        evaluator.run()
    assert evaluator.state.iteration == 2  # the first batch was written before the failure
    assert list((tmp_path / "out").iterdir()) == [] and handler.summary is None


def test_handler_leaves_no_file_when_the_run_is_terminated(tmp_path, checkpoint):
    handler = PseudoLabelWriter(tmp_path / "out" / "unlabeled.jsonl", CLASSES, "fp-abc", checkpoint)
    evaluator, _, _ = _evaluator(handler)
    evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: e.terminate())
    evaluator.run()
    assert list((tmp_path / "out").iterdir()) == [] and "pseudo_label_count" not in evaluator.state.metrics


def test_handler_removes_the_temporary_file_of_a_killed_run(tmp_path, checkpoint):
    """A run killed mid-pass (SIGKILL: no clean-up) leaves its temporary file; the re-run takes it away."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "pseudo" / "unlabeled.jsonl"
    killed = subprocess.run([sys.executable, "-c", f"""
import os, signal
from monai_cxr_ssl.pseudo_labels import PseudoLabelFileWriter, pseudo_label_header
writer = PseudoLabelFileWriter({str(out)!r}, pseudo_label_header({CLASSES!r}, "fp-abc", {str(checkpoint)!r}))
writer.write(["img_001"], [[0.5, 0.5]])
os.kill(os.getpid(), signal.SIGKILL)
"""], env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in out.parent.glob(".unlabeled.jsonl.*.tmp")]  # what the kill left behind

    handler = PseudoLabelWriter(out, CLASSES, "fp-abc", checkpoint)
    evaluator, _, data = _evaluator(handler)
    evaluator.run()
    assert sorted(p.name for p in out.parent.iterdir()) == ["unlabeled.jsonl", "unlabeled_hist.png"]
    assert read_pseudo_labels(out)[1] == [item["id"] for item in data]
