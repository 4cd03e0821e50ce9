"""Issue 13 "trustworthy runs": split fingerprints on every file a later stage reads, refusing a stale last.pt,
settings checked up front (unknown keys, numbers, sizes, per-stage epochs), a last batch of one, clear errors for
output folders, full disks and foreign checkpoints, and patient overlap in user-made split lists."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_cxr_ssl.checkpoints import PROVENANCE_FILE, load_weights, write_provenance
from monai_cxr_ssl.cli import _user_error, main
from monai_cxr_ssl.data import ChestXray14, ClassFolders, make_synthetic_dataset, prepare_split, samples_per_epoch
from monai_cxr_ssl.launch import run_bundle
from monai_cxr_ssl.pipeline import Pipeline
from monai_cxr_ssl.workflow import make_workflow

TINY = {"image_size": 40, "crop_size": 32, "batch_size": 8, "num_workers": 0, "cache_rate": 1.0,
        "labeled_fraction": 0.5, "num_epochs": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return Path(make_synthetic_dataset(tmp_path_factory.mktemp("data") / "d", n_train=60, n_test=20, image_size=40,
                                       prevalence=0.4, seed=3))


def _common(root: Path, data: Path, **extra) -> dict:
    return {**TINY, "dataset_dir": str(data), "output_dir": str(root / "out"), "experiment_name": "trust",
            "datasource": {"_target_": "monai_cxr_ssl.data.ClassFolders", "root": "@dataset_dir",
                           "positive_class": "OPACITY"},
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", **extra}


def _refusal(**overrides) -> str:
    """The message the CLI shows for a teacher run with ``overrides`` that must fail (MONAI wraps config errors)."""
    with pytest.raises(Exception) as err:
        run_bundle(["train"], **overrides)
    cause = _user_error(err.value)
    assert cause is not None, err.value
    return str(cause)


def _source(data: Path) -> ClassFolders:
    return ClassFolders(str(data), positive_class="OPACITY")


# --- item 2: the split's own fingerprint -------------------------------------------------------------------------


def test_split_fingerprint_tells_seeds_apart(tmp_path, data):
    first = prepare_split(_source(data), tmp_path / "a.json", 0.5, seed=0)
    second = prepare_split(_source(data), tmp_path / "b.json", 0.5, seed=1)
    assert first["fingerprint"] == second["fingerprint"]  # the same images and labels ...
    assert first["split_fingerprint"] != second["split_fingerprint"]  # ... split otherwise
    again = prepare_split(_source(data), tmp_path / "a.json", 0.5, seed=0)  # reloaded from the file
    assert again["split_fingerprint"] == first["split_fingerprint"]
    assert json.loads((tmp_path / "a.json").read_text())["split_fingerprint"] == first["split_fingerprint"]


def test_load_weights_checks_the_split_and_the_file(tmp_path, caplog, data):
    split = prepare_split(_source(data), tmp_path / "split.json", 0.5, seed=0)
    models = tmp_path / "models"
    models.mkdir()
    trained = torch.nn.Linear(3, 1)
    torch.save(trained.state_dict(), models / "model.pt")

    write_provenance(models, "0" * 64, {})
    with pytest.raises(ValueError, match="trained on another split") as err:
        load_weights(torch.nn.Linear(3, 1), models / "model.pt", split, "teacher checkpoint")
    assert "0" * 64 in str(err.value) and split["split_fingerprint"] in str(err.value)

    write_provenance(models, split["split_fingerprint"], {})
    net = torch.nn.Linear(3, 1)
    load_weights(net, models / "model.pt", split)
    assert torch.equal(net.weight, trained.weight)

    (models / PROVENANCE_FILE).unlink()  # a checkpoint made elsewhere: loaded, with a warning
    with caplog.at_level(logging.WARNING, logger="monai_cxr_ssl"):
        load_weights(torch.nn.Linear(3, 1), models / "model.pt", split)
    assert "cannot be checked" in caplog.text

    with pytest.raises(ValueError, match="does not fit this network"):
        load_weights(torch.nn.Linear(4, 1), models / "model.pt", split)
    (models / "model.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as err:
        load_weights(torch.nn.Linear(3, 1), models / "model.pt", split)
    assert "weights_only=False" not in str(err.value)
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, models / "model.pt")  # pickled Python objects
    with pytest.raises(ValueError, match="can run code") as err:
        load_weights(torch.nn.Linear(3, 1), models / "model.pt", split)
    assert "weights_only=False" not in str(err.value)


# --- items 3, 10, 11: one stage run alone in a folder -------------------------------------------------------------


@pytest.mark.slow
def test_stage_resumes_only_with_its_settings(tmp_path, data, capsys):
    """A last batch of one trains (10); a last.pt made with other settings is refused, resume=false starts over,
    a longer run resumes (3); a last.pt that is not a checkpoint is named (11)."""
    common = _common(tmp_path, data)
    split = prepare_split(_source(data), tmp_path / "out" / "split.json", 0.5, seed=0)
    labeled = len(split["labeled"])
    common["batch_size"] = labeled - 1  # the epoch's last batch would hold one image
    assert labeled % common["batch_size"] == 1 and samples_per_epoch(labeled, common["batch_size"]) == labeled - 1

    first = run_bundle(["train"], **common)
    assert first.parser.get_parsed_content("train#trainer").state.epoch == 1
    models = tmp_path / "out" / "teacher" / "models"
    record = json.loads((models / PROVENANCE_FILE).read_text())
    assert record["split_fingerprint"] == split["split_fingerprint"]
    assert record["settings"]["learning_rate"] == 1e-4

    message = _refusal(**{**common, "learning_rate": 3e-4})
    assert "made with other settings (changed: learning_rate)" in message and "resume=false" in message

    capsys.readouterr()
    over = run_bundle(["train"], **{**common, "learning_rate": 3e-4, "resume": False})
    assert "resume=false: starting over; removed last.pt, model.pt, provenance.json" in capsys.readouterr().out
    assert over.parser.get_parsed_content("train#trainer").state.epoch == 1
    assert json.loads((models / PROVENANCE_FILE).read_text())["settings"]["learning_rate"] == 3e-4
    last = torch.load(models / "last.pt", weights_only=True)
    assert last["optimizer"]["param_groups"][0]["initial_lr"] == 3e-4  # a new optimizer, not the resumed one

    longer = run_bundle(["train"], **{**common, "learning_rate": 3e-4, "num_epochs": 2})
    assert "Resuming from" in capsys.readouterr().out
    assert longer.parser.get_parsed_content("train#trainer").state.epoch == 2

    (models / "last.pt").write_bytes(b"\x00garbage")
    message = _refusal(**{**common, "learning_rate": 3e-4, "num_epochs": 3})
    assert "last.pt: not a readable PyTorch checkpoint" in message and "expected a training checkpoint" in message
    assert "weights_only=False" not in message


# --- item 4 and 11: settings checked before work starts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"labeled_fracton": 0.1}, "unknown setting 'labeled_fracton' (did you mean labeled_fraction"),
        ({"labeled_fraction": "abc"}, "labeled_fraction='abc'"),
        ({"labeled_fraction": 1.5}, "labeled_fraction=1.5"),
        ({"image_size": 40, "crop_size": 48}, "crop_size=48 is larger than image_size=40"),
        ({"image_size": 24, "crop_size": 24}, "a whole number >= 32"),
        ({"batch_size": 1}, "at least 2 images per batch"),
        ({"num_epochs": 0}, "num_epochs=0"),
        ({"learning_rate": -1}, "learning_rate=-1"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, data, overrides, message):
    common = _common(tmp_path, data, **overrides)
    with pytest.raises(ValueError) as err:
        run_bundle(["train"], **common)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing was made


def test_output_dir_that_is_a_file(tmp_path, data, capsys):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit) as exit_:
        main(["run", "train", "--set", f"dataset_dir={data}", f"output_dir={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_dir=" in err[0] and "is a file" in err[0]


def test_cli_names_an_unknown_setting(tmp_path, data, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "train", "--set", f"dataset_dir={data}", f"output_dir={tmp_path}", "labeled_fracton=0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean labeled_fraction" in err[0]


def test_component_arguments_are_known_settings():
    """Adding an argument to a component (ChestXray14's image_dir) is no typo; a misspelt component is."""
    from monai_cxr_ssl.settings import check_override_keys

    config = make_workflow(["train"]).parser.get()
    check_override_keys(["datasource#image_dir", "train#trainer#max_epochs"], [config])
    with pytest.raises(ValueError, match="did you mean datasource"):
        check_override_keys(["datasorce#image_dir"], [config])


def test_specific_epochs_win_over_num_epochs():
    def epochs(stage: str, **overrides) -> int:
        return make_workflow([stage], **overrides).parser.get_parsed_content("train#trainer#max_epochs")

    assert epochs("student", num_epochs=3, student_epochs=2) == 2
    assert epochs("student", num_epochs=3) == 3  # the general setting shortens every stage ...
    assert epochs("finetune", num_epochs=3) == 3
    assert epochs("student") == 10 and epochs("finetune") == 15  # ... the paper's per-stage defaults otherwise
    assert epochs("train", num_epochs=3, student_epochs=2) == 3
    assert make_workflow(["student"], num_epochs=3, student_epochs=2).parser.get_parsed_content(
        "run_params#facts#num_epochs") == 2  # MLflow records the stage's own count


# --- item 12: the pipeline checks every stage at its start --------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"keep_fraction": 1.5}, "keep_fraction=1.5"),
        ({"student:aals_t": 2}, "aals_t"),
        ({"student:aals_t": 0.3}, "no student stage uses aals_t; stages that do: ['pseudo_label']"),
        ({"finetune:max_unlabeled": 10}, "no finetune stage uses max_unlabeled"),
        ({"keep_fracton": 0.5}, "did you mean keep_fraction"),
        ({"mean_teacher:ema_decay": 0.9}, "has no mean_teacher stage"),
        ({"method": "mean_teacher", "ema_decay": 1.5}, "ema_decay=1.5"),
        ({"method": "mean_teacher", "mean_teacher_epochs": 0}, "mean_teacher_epochs=0 (stage mean_teacher)"),
    ],
)
def test_pipeline_checks_every_stage_first(tmp_path, data, overrides, message):
    from monai_cxr_ssl.pipeline import pipeline_options

    options, overrides = pipeline_options(overrides)
    with pytest.raises(ValueError) as err:
        Pipeline(["demo"], _common(tmp_path, data, **overrides), **options)
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


# --- item 11: a full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB file system (tmpfs), too small for a DenseNet121 checkpoint."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_is_one_line(tmp_path, data, small_disk):
    """The command in its own process, as a user runs it: one error line, no traceback anywhere."""
    args = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}"
            for k, v in _common(tmp_path, data, output_dir=small_disk / "out").items()]
    done = subprocess.run([sys.executable, "-m", "monai_cxr_ssl.cli", "run", "train", "--set", *args],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr  # MONAI's StatsHandler does not log the chained errors
    last = done.stderr.strip().splitlines()[-1]  # after the progress bars: one line
    assert "monai-cxr-ssl: error: no space left on device while writing" in last and "model.pt" in last
    assert "it needs about" in last and "MiB free" in last
    leftovers = [p.name for p in (small_disk / "out" / "teacher" / "models").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# --- item 14: patients in both user-made lists ------------------------------------------------------------------


def _cxr14(root: Path, overlap: bool) -> Path:
    """12 images of 6 patients (2 each); with ``overlap`` one patient's second image is in the test list."""
    (root / "images").mkdir(parents=True)
    rows = []
    for p in range(6):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            Image.fromarray(np.full((8, 8), 40 * p, np.uint8)).save(root / "images" / name)
            rows.append([name, "Effusion" if p % 2 else "No Finding", k, f"P{p}"])
    with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Image Index", "Finding Labels", "Follow-up #", "Patient ID"], *rows])
    names = [r[0] for r in rows]
    cut = 7 if overlap else 8  # with the overlap, patient 3's second image is the first of the test list
    train, test = names[:cut], names[cut:]
    (root / "train_val_list.txt").write_text("\n".join(train) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def test_patient_in_both_official_lists_is_refused(tmp_path):
    source = ChestXray14(str(_cxr14(tmp_path / "cxr", overlap=True)))
    with pytest.raises(ValueError, match="1 patient") as err:
        prepare_split(source, tmp_path / "split.json", 0.5)
    assert "positions [1]" in str(err.value) and "allow_patient_overlap" in str(err.value)
    assert "P3" not in str(err.value)  # counts and positions, never the patient ids
    assert not (tmp_path / "split.json").exists()
    split = prepare_split(source, tmp_path / "split.json", 0.5, allow_patient_overlap=True)
    assert split["patient_overlap"] == {"training pool/test": 1}
    clean = ChestXray14(str(_cxr14(tmp_path / "clean", overlap=False)))
    assert "patient_overlap" not in prepare_split(clean, tmp_path / "clean.json", 0.5)


def test_samples_per_epoch():
    assert [samples_per_epoch(n, 4) for n in (2, 4, 5, 6, 9)] == [2, 4, 4, 6, 8]
    # two ranks: a rank's share is rounded up (the sampler pads), its last batch never a single image
    assert [samples_per_epoch(n, 4, world_size=2) for n in (3, 8, 9, 10, 16)] == [4, 8, 8, 8, 16]
    with pytest.raises(ValueError, match="too few for 2 processes"):
        samples_per_epoch(2, 4, world_size=2)
    with pytest.raises(ValueError, match="single image"):
        samples_per_epoch(1, 4)


def test_epoch_sampler_splits_one_sequence_over_the_ranks():
    from monai_cxr_ssl.data import EpochSampler

    data = list(range(10))
    one = EpochSampler(data, num_samples=12, seed=3, num_replicas=1, rank=0)
    ranks = [EpochSampler(data, num_samples=12, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (1, 2):
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        sequence = list(one)
        assert len(sequence) == 12 and set(sequence[:10]) == set(data)  # a permutation, then the next one begins
        assert list(ranks[0]) == sequence[0::2] and list(ranks[1]) == sequence[1::2]
        assert len(ranks[0]) == 6
    one.set_epoch(1)
    first = list(one)
    assert first != sequence  # another epoch, another order
    assert list(EpochSampler(data, seed=3, num_replicas=1, rank=0)) != list(EpochSampler(data, seed=4, num_replicas=1,
                                                                                         rank=0))


def test_a_loader_like_another_draws_the_same_way_over_other_images():
    """The mean teacher's unlabeled loader is ``loader_like`` its labeled one: the same batch size, samples per epoch,
    seed and rank, over its own images."""
    from monai.data import DataLoader

    from monai_cxr_ssl.data import EpochSampler, loader_like

    labeled, unlabeled = list(range(10)), list(range(100, 107))
    loader = DataLoader(labeled, batch_size=4, sampler=EpochSampler(labeled, num_samples=12, seed=3, num_replicas=2,
                                                                    rank=1))
    like = loader_like(loader, unlabeled)
    expected = EpochSampler(unlabeled, num_samples=12, seed=3, num_replicas=2, rank=1)
    for epoch in (1, 2):
        like.sampler.set_epoch(epoch)
        expected.set_epoch(epoch)
        assert [b.tolist() for b in like] == [[unlabeled[i] for i in batch] for batch in
                                              (list(expected)[:4], list(expected)[4:])]
    assert like.batch_size == 4 and len(like.sampler) == 6 and like.dataset is unlabeled
    with pytest.raises(TypeError, match="EpochSampler, not a SequentialSampler"):
        loader_like(DataLoader(labeled, batch_size=4), unlabeled)
