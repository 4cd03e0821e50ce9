"""The method registry: a toy method registered here (the teacher, then one "toy" stage: the fine-tune config plus an
overlay written here) runs through the pipeline, the comparison of its MLflow runs and export without any change to
the package; a toy label-free pre-training stage (``toy_rotation``: predicting each image's rotation) initialises its
teacher's encoder, and resumes after SIGKILL on 2 gloo processes; ``load_encoder`` maps a real teacher checkpoint
onto ``CXRDenseNet121``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import toy_rotation
from conftest import PAUSE_AFTER_EPOCH_1, kill_tree, run_processes, wait_for_pause

from monai_cxr_ssl import methods
from monai_cxr_ssl.methods import TEACHER_STAGE, Command, Method, StageKind, evaluation

TOY_COLUMN = "toy model"
TOY_LR_DECAY = 0.5  # the overlay's one setting, to see that the toy stage, and only it, merged it
COMMAND_CALLS: list[tuple] = []  # what the toy method's own CLI command was called with


def _toy_command(args, overrides, echo) -> None:
    COMMAND_CALLS.append((args.configs, overrides, args.word))
    echo(f"toy command: {args.word}")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy method and a toy pre-training stage in the registry for this module's tests, taken out after them."""
    overlay = tmp_path_factory.mktemp("toy_method") / "toy.json"
    overlay.write_text(json.dumps({"stage": "toy", "init_stage": TEACHER_STAGE, "lr_decay": TOY_LR_DECAY}))
    kind = StageKind("toy", ("train.json", "finetune.json", str(overlay)), reads="init_stage",
                     epochs="finetune_epochs")
    command = Command("toy-command", "the toy method's own command", "Example: monai-cxr-ssl toy-command demo",
                      arguments=lambda parser: parser.add_argument("--word", default="hello"),
                      run=f"{__name__}:_toy_command")
    method = Method("toy", "teacher → toy fine-tune", (kind,),
                    steps=lambda rounds: [kind.step("toy", TEACHER_STAGE), evaluation("toy", kind, TOY_COLUMN)],
                    commands=(command,))
    methods.register(method)
    toy_rotation.register()
    try:
        yield method
    finally:
        methods.unregister("toy")
        methods.unregister(toy_rotation.NAME)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    from monai_cxr_ssl.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("methods")
    data = make_synthetic_dataset(root / "data", n_train=40, n_test=16, image_size=40, prevalence=0.4, seed=3)
    return {
        "dataset_dir": str(data), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment_name": "methods",
        "image_size": 40, "crop_size": 32, "batch_size": 8, "labeled_fraction": 0.5, "num_workers": 0,
        "num_epochs": 1, "output_dir": str(root / "toy"),
    }


@pytest.fixture(scope="module")
def toy_run(toy, settings):
    """The toy method after the toy label-free pre-training, run once (5 tiny stages). The teacher barely moves
    (learning rate 1e-12): its weights show where it started, at the pre-training's weights (which moved from the
    common initialisation by about their learning rate per step)."""
    from monai_cxr_ssl.pipeline import Pipeline

    overrides = {**settings, "teacher:learning_rate": 1e-12}
    lines = []
    results = Pipeline(["demo"], overrides, echo=lines.append, method="toy", pretrain=toy_rotation.NAME).run()
    return results, lines, overrides


def test_pretrain_and_method_names_are_checked(monkeypatch):
    monkeypatch.setattr(methods, "_PRETRAINING", {})  # a registry without pre-training stages, whatever ran before
    with pytest.raises(ValueError, match="no pre-training stage is registered yet"):
        methods.plan(pretrain="simclr")
    with pytest.raises(ValueError) as err:
        methods.plan(method="gan")
    assert str(err.value) == f"method must be one of {methods.names()}, got 'gan'."
    assert {"teacher_student", "mean_teacher"} <= set(methods.names())


def test_the_registry_lists_the_toy_method_while_it_is_registered(toy, capsys):
    from monai_cxr_ssl.cli import build_parser, main
    from monai_cxr_ssl.pipeline import split_overrides

    assert methods.names()[-1] == "toy" and toy_rotation.NAME in methods.pretraining_names()
    assert methods.named_configs()["toy"][-1].endswith("toy.json")
    # a stage kind without labels runs the shared label-free overlay after its base config
    assert methods.named_configs()[toy_rotation.NAME] == ["train.json", "label_free.json", str(toy_rotation.OVERLAY)]
    _, per_kind = split_overrides({"toy:num_epochs": 2, "toy_rotation:seed": 1})
    assert per_kind["toy"] == {"num_epochs": 2} and per_kind["toy_rotation"] == {"seed": 1}
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    pipeline_help = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    assert "toy: teacher → toy fine-tune" in pipeline_help
    assert "toy_rotation: predicts each image's rotation (a test's toy)" in pipeline_help
    kinds = pipeline_help.split("kinds: ", 1)[1].split(")", 1)[0].split(", ")
    # the order of a run: the pre-training stages, the teacher, the methods' stages, the evaluation
    assert kinds.index("toy_rotation") < kinds.index("teacher") < kinds.index("toy") and kinds[-1] == "evaluate"
    assert {"toy", "student", "mean_teacher"} <= set(kinds)
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "x", "--method", "nope"])
    assert parser.parse_args(["compare", "x", "--method", "toy"]).method == "toy"
    with pytest.raises(ValueError, match="'toy' is registered already"):
        methods.register(toy)

    # the method's own command: in the CLI's help, run with its arguments and the --set overrides
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "toy-command" in capsys.readouterr().out
    main(["toy-command", "demo", "--word", "hi", "--set", "seed=3"])
    assert COMMAND_CALLS == [(["demo"], {"seed": 3}, "hi")] and "toy command: hi" in capsys.readouterr().out


@pytest.mark.slow
def test_pipeline_compare_and_export_run_the_toy_method_after_a_pre_training(toy_run, settings, tmp_path):
    import mlflow

    from monai_cxr_ssl.compare import evaluation_runs, run_compare
    from monai_cxr_ssl.export import export_model
    from monai_cxr_ssl.pipeline import Pipeline

    results, lines, overrides = toy_run
    out = Path(settings["output_dir"])
    assert [line.split("] ", 1)[1] for line in lines if line.startswith("[")] == [
        "toy_rotation: running", "teacher: running", "teacher/evaluate: running", "toy: running",
        "toy/evaluate: running"]
    assert (results["method"], results["pretrain"]) == ("toy", "toy_rotation")
    teacher_column, toy_column = "toy_rotation + teacher", f"toy_rotation + {TOY_COLUMN}"  # after the pre-training
    assert list(results["auroc"]) == [teacher_column, toy_column]
    for column, stage in ((teacher_column, "teacher"), (toy_column, "toy")):  # the evaluation reports behind them
        report = json.loads((out / stage / "test_metrics.json").read_text())
        assert results["auroc"][column] == report["mean_auroc"]
    toy_config = json.loads((out / "toy" / "config_executed.json").read_text())
    teacher_config = json.loads((out / "teacher" / "config_executed.json").read_text())
    assert toy_config["lr_decay"] == TOY_LR_DECAY and teacher_config["lr_decay"] != TOY_LR_DECAY
    assert json.loads((out / "toy" / ".toy.done.json").read_text())["inputs"].keys() == {"teacher"}
    assert (out / "table1.md").read_text().splitlines()[0] == f"| labeled | seeds | {teacher_column} | {toy_column} |"

    # the label-free stage learnt the rotations from the labeled and unlabeled images, validated nothing and saved
    # its last epoch's model as models/model.pt; that checkpoint initialised the teacher's encoder
    split = json.loads((out / "split.json").read_text())
    rotation = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"]).get_run(results["runs"]["toy_rotation"])
    assert int(rotation.data.params["num_train"]) == len(split["labeled"]) + len(split["unlabeled"])
    assert "val_auroc" not in rotation.data.metrics and "train_loss" in rotation.data.metrics
    assert sorted(p.name for p in (out / "toy_rotation" / "models").iterdir()) == [
        "last.pt", "model.pt", "provenance.json"]
    pretrained = torch.load(out / "toy_rotation" / "models" / "model.pt", weights_only=True)
    last = torch.load(out / "toy_rotation" / "models" / "last.pt", weights_only=True)["network"]
    assert pretrained.keys() == last.keys() and all(torch.equal(pretrained[k], last[k]) for k in last)
    assert pretrained["class_layers.out.weight"].shape[0] == 4  # the rotation head
    teacher = torch.load(out / "teacher" / "models" / "model.pt", weights_only=True)
    assert teacher.keys() == pretrained.keys()
    # every weight and bias of the encoder (the running statistics of its norms move with any training)
    parameters = [k for k in pretrained if k.startswith("features.") and k.endswith((".weight", ".bias"))]
    assert len(parameters) > 300
    for key in parameters:
        torch.testing.assert_close(teacher[key], pretrained[key], atol=1e-8, rtol=0)
    assert teacher_config["encoder_init"] == "$os.path.join(@output_dir, 'toy_rotation', 'models/model.pt')"
    assert json.loads((out / "teacher" / ".train.done.json").read_text())["inputs"].keys() == {"toy_rotation"}

    # compare reads the real MLflow runs: the toy stage's evaluation is the toy method's column
    runs = evaluation_runs(["methods"], tracking_uri=settings["tracking_uri"])
    assert dict(zip(runs["stage"], runs["column"], strict=True)) == {"teacher": teacher_column, "toy": toy_column}
    compared = run_compare(["methods"], tmp_path / "compare", method="toy", tracking_uri=settings["tracking_uri"],
                           log_summary=False)
    (row,) = compared["rows"]
    assert list(row) == ["labeled_fraction", teacher_column, toy_column]
    assert row[toy_column]["mean"] == pytest.approx(results["auroc"][toy_column]) and row[toy_column]["n"] == 1
    other = run_compare(["methods"], tmp_path / "other", method=methods.DEFAULT_METHOD,
                        tracking_uri=settings["tracking_uri"], log_summary=False)
    assert list(other["rows"][0]) == ["labeled_fraction", teacher_column]  # the toy stage is no other method's
    tags = mlflow.MlflowClient(tracking_uri=settings["tracking_uri"]).get_run(results["run_id"]).data.tags
    assert (tags["method"], tags["pretrain"]) == ("toy", "toy_rotation")

    # export takes the toy stage, the method's last model
    meta = export_model(out, tmp_path / "model.ts", ood_images=0)
    assert (meta["cxr_ssl"]["stage"], meta["cxr_ssl"]["method"]) == ("toy", "toy")
    assert meta["cxr_ssl"]["source_run_id"] == results["runs"]["toy"]

    # the same pipeline again: every stage is done (the stage keys do not depend on the run)
    again = []
    Pipeline(["demo"], overrides, echo=again.append, method="toy", pretrain=toy_rotation.NAME).run()
    assert [line for line in again if line.startswith("[")] and all(
        "done earlier" in line for line in again if line.startswith("["))


def test_unknown_pretraining_names_the_registered_ones(toy):
    with pytest.raises(ValueError, match=r"pretrain must be one of \['simclr', 's2mts2_pretrain', 'toy_rotation'\], "
                                         "got 'byol'"):
        methods.plan(method="toy", pretrain="byol")


@pytest.mark.slow
def test_encoder_of_a_real_teacher_checkpoint_is_mapped(toy_run, settings, tmp_path):
    from monai_cxr_ssl.networks import CXRDenseNet121, load_encoder

    path = f"{settings['output_dir']}/teacher/models/model.pt"  # a real (1-epoch) run of the teacher config
    teacher = torch.load(path, weights_only=True)
    features = {k: v for k, v in teacher.items() if k.startswith("features.")}

    torch.manual_seed(1)
    net = CXRDenseNet121(num_classes=3)  # another head: it keeps its initialisation
    head = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("class_layers.")}
    load_encoder(net, path)
    state = net.state_dict()
    for key, value in features.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    for key, value in head.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)

    # wrapped keys (a DDP-wrapped SimCLR encoder without "features."), a projection head, and a 3-channel first conv
    conv0 = teacher["features.conv0.weight"]
    wrapped = {"module.encoder." + k.removeprefix("features."): v for k, v in features.items()}
    wrapped["module.encoder.conv0.weight"] = conv0.repeat(1, 3, 1, 1) / 3  # an RGB kernel seeing grey as before
    wrapped["module.projection.0.weight"] = torch.zeros(128, 1024)
    torch.save(wrapped, tmp_path / "simclr.pt")
    net = CXRDenseNet121(num_classes=1)
    load_encoder(net, tmp_path / "simclr.pt")
    state = net.state_dict()
    torch.testing.assert_close(state["features.conv0.weight"], conv0)  # _adapt_first_conv sums the RGB kernels
    for key, value in features.items():
        if key != "features.conv0.weight":
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)

    # a stage's last.pt (the training state, the weights under "network") is read as well
    last = f"{settings['output_dir']}/toy_rotation/models/last.pt"
    last_network = torch.load(last, weights_only=True)["network"]
    net = CXRDenseNet121(num_classes=3)
    load_encoder(net, last)
    for key, value in last_network.items():
        if key.startswith("features."):
            torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)

    # a checkpoint with the same head (the teacher's own) gives the teacher back
    net = CXRDenseNet121(num_classes=1)
    load_encoder(net, path)
    for key, value in teacher.items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.slow
def test_encoder_checkpoints_that_do_not_fit_are_one_line_errors(toy_run, settings, tmp_path):
    from monai_cxr_ssl.networks import CXRDenseNet121, load_encoder

    teacher = torch.load(f"{settings['output_dir']}/teacher/models/model.pt", weights_only=True)
    net = CXRDenseNet121(num_classes=1)
    cases = {
        "nothing.pt": ({"projection.weight": torch.zeros(2, 2)}, "no key maps onto the network's feature layers"),
        "partial.pt": ({k: v for k, v in teacher.items() if "denseblock4" not in k},
                       r"does not fit the network's feature layers: missing \(\d+\): features.denseblock4"),
        "shape.pt": ({**teacher, "features.norm5.weight": torch.zeros(7)}, r"shape mismatch \(1\): features.norm5"),
        "twice.pt": ({**teacher, "module.features.norm5.bias": teacher["features.norm5.bias"]},
                     "both map onto features.norm5.bias"),
        "list.pt": ([1, 2], "not a state dict of tensors"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(ValueError, match=message) as info:
            load_encoder(net, tmp_path / name)
        assert str(info.value).startswith(str(tmp_path / name)) and "\n" not in str(info.value)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint.*pre-training checkpoint"):
        load_encoder(net, tmp_path / "garbage.pt")


@pytest.mark.slow
def test_label_free_stage_on_two_processes_resumes_after_sigkill(settings, tmp_path):
    """The toy label-free stage on 2 gloo processes (``--nproc-per-node 2``), killed with SIGKILL after epoch 1 and
    run again: it resumes from ``last.pt``, and ``models/model.pt`` exists only once the run has completed, holding
    the weights of its last epoch."""
    import os
    import subprocess
    import sys

    from monai_cxr_ssl.methods import LABEL_FREE_CONFIG
    from monai_cxr_ssl.workflow import DEFAULT_BUNDLE

    models = tmp_path / "out" / toy_rotation.NAME / "models"
    run = {**settings, "output_dir": tmp_path / "out", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "num_epochs": 2, "pause_file": tmp_path / "pause"}
    # the kind's configs as files: the subprocesses' registry does not hold the toy stage
    cmd = [sys.executable, "-m", "monai_cxr_ssl.cli", "run", "train", "demo", str(Path(DEFAULT_BUNDLE) / "configs" /
           LABEL_FREE_CONFIG), str(toy_rotation.OVERLAY), str(PAUSE_AFTER_EPOCH_1), "--nproc-per-node", "2",
           "--set", *(f"{k}={v}" for k, v in run.items())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(toy_rotation.__file__).parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, env=env)
    wait_for_pause(proc, tmp_path / "pause", log, timeout=300)
    kill_tree(proc.pid)  # the launcher and both workers
    proc.wait()
    assert sorted(p.name for p in models.iterdir()) == ["last.pt", "provenance.json"]  # no model before the end

    done = run_processes(cmd, timeout=300, cwd=tmp_path, env=env)  # no pause: epoch 1 is behind the resumed run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Resuming from" in done.stdout + done.stderr
    last = torch.load(models / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] // last["trainer"]["epoch_length"] == 2
    model = torch.load(models / "model.pt", weights_only=True)
    assert model.keys() == last["network"].keys()  # unwrapped: no DDP "module." prefix
    assert all(torch.equal(model[k], last["network"][k]) for k in model)
