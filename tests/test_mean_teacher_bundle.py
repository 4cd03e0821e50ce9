"""The mean-teacher stage through ``python -m monai.bundle run`` (weak-positive set, MLflow per epoch, resume), its
bad-input errors, the pipeline's ``method=mean_teacher`` and the AALS ablation command, on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
import torch

from monai_cxr_ssl import cli

pytestmark = pytest.mark.slow

CONFIGS = cli.DEFAULT_BUNDLE / "configs"
DEMO = cli.DEFAULT_BUNDLE.parents[1] / "configs" / "demo.json"


def _bundle_run(files: list[str], settings: dict, **extra) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run`` of the stage's configs (base config first), then the demo overlay."""
    paths = [*(str(CONFIGS / f) for f in files), str(DEMO)]
    args = [f"--{k}={v}" for k, v in {**settings, **extra}.items()]
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(paths), *args],
                          cwd=settings["output_dir"].parent, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mean_teacher")
    data = make_synthetic_dataset(root / "data", n_train=80, n_test=30, image_size=48, prevalence=0.4, seed=2)
    settings = {
        "bundle_root": cli.DEFAULT_BUNDLE, "dataset_dir": data, "output_dir": root / "out",
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment_name": "mean_teacher", "image_size": 40,
        "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.4, "num_workers": 0, "num_epochs": 1,
    }
    done = _bundle_run(["train.json"], settings)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, settings


def _metric_history(settings: dict, run_name: str) -> dict:
    """Params and metric histories (epoch steps) of the newest MLflow run called ``run_name``."""
    client = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"])
    experiment = client.get_experiment_by_name(settings["experiment_name"]).experiment_id
    run = client.search_runs([experiment], filter_string=f"attributes.run_name = '{run_name}'",
                             order_by=["attributes.start_time DESC"])[0]
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in run.data.metrics}
    return {"params": run.data.params, **history}


def test_mean_teacher_stage_on_weak_positives_logs_per_epoch_and_resumes(teacher):
    root, settings = teacher
    split = json.loads((settings["output_dir"] / "split.json").read_text())
    positives = [it["id"] for it in split["unlabeled"] if it["label"][0] > 0]
    weak = root / "weak_positives.txt"
    weak.write_text("\n".join(positives) + "\n")
    common = {**settings, "weak_labels": weak, "ema_decay": 0.9}
    del common["num_epochs"]
    done = _bundle_run(["train.json", "mean_teacher.json"], common, mean_teacher_epochs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    models = settings["output_dir"] / "mean_teacher" / "models"
    last = torch.load(models / "last.pt", weights_only=False)
    assert {"network", "teacher_network", "optimizer", "best_checkpoint", "trainer"} <= set(last)
    assert last["trainer"]["iteration"] == 2 * last["trainer"]["epoch_length"]
    best = torch.load(models / "model.pt", weights_only=True)
    assert best.keys() == last["network"].keys()

    logged = _metric_history(settings, "mean_teacher-lambda0.4-seed0")
    for name in ("aals_mean_a", "aals_raised_fraction", "val_auroc", "val_auroc_teacher", "consistency_loss"):
        assert [step for step, _ in logged[name]] == [1, 2], name
    assert all(1.0 <= a <= 4.0 for _, a in logged["aals_mean_a"])  # a = a0 − (a0 − 1)·y with a0 = 4
    assert all(0.0 <= f <= 1.0 for _, f in logged["aals_raised_fraction"])
    params = logged["params"]
    assert params["num_unlabeled_used"] == str(len(positives)) and params["ema_decay"] == "0.9"
    assert params["aals_t"] == "0.4" and params["aals_a0"] == "4.0" and params["weak_labels"] == str(weak)

    resumed = _bundle_run(["train.json", "mean_teacher.json"], common, mean_teacher_epochs=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after epoch 2 of 3" in resumed.stdout + resumed.stderr
    state = torch.load(models / "last.pt", weights_only=False)["trainer"]
    assert state["iteration"] == 3 * state["epoch_length"]
    # Every epoch is seeded from (seed, epoch): 2 epochs then a third end where 3 epochs in one go do.
    teacher_ckpt = settings["output_dir"] / "teacher" / "models" / "model.pt"
    straight = {**common, "output_dir": root / "straight", "experiment_name": "mean_teacher_straight",
                "init_ckpt": teacher_ckpt}
    done = _bundle_run(["train.json", "mean_teacher.json"], straight, mean_teacher_epochs=3)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = torch.load(root / "straight" / "mean_teacher" / "models" / "last.pt", weights_only=False)
    got = torch.load(models / "last.pt", weights_only=False)
    for net in ("network", "teacher_network"):
        for name, value in expected[net].items():
            torch.testing.assert_close(got[net][name], value, rtol=0, atol=0, msg=f"{net}.{name}")
    # a plain bundle run that continues finished training logs the new epoch to a new MLflow run
    assert [step for step, _ in _metric_history(settings, "mean_teacher-lambda0.4-seed0")["val_auroc_teacher"]] == [3]


def test_the_teacher_is_the_ema_model_made_from_the_loaded_teacher_checkpoint(teacher):
    from monai_cxr_ssl.checkpoints import read_state_dict
    from monai_cxr_ssl.locking import output_lock
    from monai_cxr_ssl.workflow import make_workflow

    root, settings = teacher
    init = settings["output_dir"] / "teacher" / "models" / "model.pt"
    out = root / "initialised"
    overrides = {**settings, "output_dir": str(out), "init_ckpt": str(init), "bundle_root": str(cli.DEFAULT_BUNDLE),
                 "cache_rate": 0.0}  # nothing is trained: no need to cache the images
    workflow = make_workflow([str(CONFIGS / "train.json"), str(DEMO), str(CONFIGS / "mean_teacher.json")],
                             **{k: str(v) if not isinstance(v, int | float) else v for k, v in overrides.items()})
    with output_lock(out):
        workflow.initialize()
        parsed = workflow.parser.get_parsed_content
        trainer, network, ema = parsed("train#trainer"), parsed("network"), parsed("train#ema")
        evaluator, save_dict = parsed("validate#evaluator"), parsed("train#checkpoint#save_dict")
    teacher_network = ema.ema_model
    assert trainer.teacher_network is teacher_network and evaluator.teacher_network is teacher_network
    assert save_dict["teacher_network"] is teacher_network and teacher_network is not network
    expected = read_state_dict(init)
    for name, value in teacher_network.state_dict().items():  # both start from the teacher stage's weights
        torch.testing.assert_close(value.cpu(), expected[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(network.state_dict()[name].cpu(), expected[name], rtol=0, atol=0, msg=name)
    assert ema.momentum == pytest.approx(1 - 0.999)
    assert (trainer.consistency, trainer.rampup) == ("kl", "sigmoid")  # Wang et al.'s mean teacher by default


def test_the_mse_consistency_and_linear_ramp_reach_the_trainer(teacher):
    from monai_cxr_ssl.losses import ProbabilityMSELoss
    from monai_cxr_ssl.workflow import make_workflow

    root, settings = teacher
    overrides = {**settings, "output_dir": str(root / "mse"), "bundle_root": str(cli.DEFAULT_BUNDLE),
                 "consistency": "mse", "consistency_rampup": "linear", "cache_rate": 0.0,
                 "init_ckpt": str(settings["output_dir"] / "teacher" / "models" / "model.pt")}
    workflow = make_workflow(["mean_teacher", "demo"], **{k: str(v) if not isinstance(v, int | float) else v
                                                         for k, v in overrides.items()})
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert (trainer.consistency, trainer.rampup) == ("mse", "linear")
    assert isinstance(trainer.consistency_loss, ProbabilityMSELoss)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("aals_t=1.5", "setting aals_t=1.5 must be a number in (0, 1)"),
        ("aals_a0=0.5", "setting aals_a0=0.5 must be a number >= 1"),
        ("ema_decay=1.0", "setting ema_decay=1.0 must be a number in (0, 1)"),
        ("ema_decay=0", "setting ema_decay=0 must be a number in (0, 1)"),
        ("weak_label_column=report", "missing column(s) ['report']"),
        ("consistency=l2", "setting consistency='l2' must be one of 'kl', 'mse'"),
        ("consistency_rampup=cosine", "setting consistency_rampup='cosine' must be one of 'sigmoid', 'linear'"),
    ],
)
def test_bad_settings_fail_with_a_clear_message(teacher, setting, message, capsys):
    root, settings = teacher
    unlabeled = json.loads((settings["output_dir"] / "split.json").read_text())["unlabeled"]
    manifest = root / "weak.csv"
    manifest.write_text(f"image,weak_label\n{unlabeled[0]['id']},1\n")
    overrides = [f"{k}={v}" for k, v in {**settings, "weak_labels": manifest, "num_epochs": 1}.items()]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "mean_teacher", "demo", "--set", *overrides, setting])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _cli(command: str, settings: dict, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "monai_cxr_ssl.cli", command, "demo", *extra, "--set",
         *(f"{k}={v}" for k, v in settings.items())],
        cwd=settings["output_dir"].parent, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_aals_ablation_then_the_mean_teacher_pipeline_share_the_teacher(teacher):
    root, settings = teacher
    settings = {**settings, "output_dir": root / "ablation"}
    del settings["bundle_root"]
    done = _cli("aals-ablation", settings, "--t", "0.4", "--a0", "1", "4")
    table = (root / "ablation" / "ablation.md").read_text()
    assert table in done.stdout and table.startswith("| t \\ a0 | 1 | 4 |")
    row = next(line for line in table.splitlines() if line.startswith("| 0.4 |"))
    assert "-" not in row.replace("| 0.4 |", "")  # both (0.4, 1) and (0.4, 4) ran

    client = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"])
    experiment = client.get_experiment_by_name(settings["experiment_name"]).experiment_id
    (parent,) = client.search_runs([experiment], filter_string="attributes.run_name = 'aals-ablation-lambda0.4-seed0'")
    assert {"ablation.md", "ablation.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trained = {r.info.run_name: r.data.params.get("aals_a0") for r in children if "evaluate" not in r.info.run_name}
    assert trained == {"teacher-lambda0.4-seed0": None, "mean_teacher_t0.4_a1-lambda0.4-seed0": "1.0",
                       "mean_teacher_t0.4_a4-lambda0.4-seed0": "4.0"}

    done = _cli("pipeline", {**settings, "method": "mean_teacher"})
    assert "[1/4] teacher: done earlier with the same settings and inputs; skipped" in done.stdout
    assert "| labeled | seeds | teacher | mean teacher |" in done.stdout
    results = json.loads((root / "ablation" / "results.json").read_text())
    assert results["method"] == "mean_teacher" and set(results["auroc"]) == {"teacher", "mean teacher"}
