"""The semi-supervised GAN (method ``ssl_gan``): the K + 1 logits, the networks' sizes, one training step against
the same step written out by hand, the data and settings it refuses before any training, the stage killed with
SIGKILL and resumed equal to a straight run, the GAN step on 2 gloo processes, and the method end to end (Table I,
scikit-learn's AUROC on the saved predictions, export and the deploy app). The losses' known answers are in
test_losses.py."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PAUSE_AFTER_EPOCH_1, bundle_error, kill_after_epoch_1, run_processes

from monai_cxr_ssl.networks.gan import DCGANDiscriminator, DCGANGenerator, gan_discriminator, real_class_logits

TESTS = Path(__file__).resolve().parent
TINY = {"image_size": 36, "crop_size": 32, "batch_size": 4, "labeled_fraction": 0.5, "num_workers": 0,
        "num_epochs": 2, "gan_base_channels": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from monai_cxr_ssl.data import make_synthetic_dataset

    return Path(make_synthetic_dataset(tmp_path_factory.mktemp("ssl_gan") / "data", n_train=40, n_test=16,
                                       image_size=36, prevalence=0.4, seed=11))


def _settings(data: Path, out: Path, **more) -> dict:
    return {**TINY, "dataset_dir": str(data), "output_dir": str(out), "experiment_name": "ssl_gan",
            "tracking_uri": f"sqlite:///{out.parent / (out.name + '.db')}", **more}


def _cli(*args: str, settings: dict) -> list[str]:
    return [sys.executable, "-m", "monai_cxr_ssl.cli", *args, "--set", *(f"{k}={v}" for k, v in settings.items())]


def test_class_logits_relative_to_the_generated_one_keep_the_k_plus_1_softmax():
    logits = torch.randn(5, 4, dtype=torch.float64) * 3
    real = real_class_logits(logits)
    softmax = torch.softmax(logits, dim=1)
    # p(generated) = 1 / (1 + Z), Z over the K relative logits: the formulation with that logit fixed at 0
    torch.testing.assert_close(1 / (1 + real.exp().sum(dim=1)), softmax[:, -1])
    torch.testing.assert_close(torch.softmax(real, dim=1), softmax[:, :-1] / softmax[:, :-1].sum(1, keepdim=True))


def test_the_generator_makes_the_crop_size_and_the_discriminator_scripts():
    generator = DCGANGenerator(image_size=32, base_channels=4).eval()
    with torch.no_grad():
        images = generator(torch.randn(3, 100))
    assert images.shape == (3, 1, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert len([m for m in generator.up if isinstance(m, torch.nn.ConvTranspose2d)]) == 3  # 4 -> 8 -> 16 -> 32
    with pytest.raises(ValueError, match=r"crop_size=56: the GAN's generator makes square images of 16, 32, 64, "):
        DCGANGenerator(image_size=56)
    net = DCGANDiscriminator(num_classes=3, base_channels=4, probabilities="softmax_drop_last").eval()
    scripted = torch.jit.script(net)
    x = torch.rand(2, 1, 40, 40)  # any size: global pooling
    torch.testing.assert_close(scripted(x), torch.softmax(net.class_layers.out(net.pooled_features(x))[:, :2], 1))
    assert scripted.pooled_features(x).shape == (2, 32)
    with pytest.raises(ValueError, match="discriminator=dcgan: encoder_init='enc.pt' apply to DenseNet121 only"):
        gan_discriminator("dcgan", 3, encoder_init="enc.pt")
    assert type(gan_discriminator("densenet121", 3)).__name__ == "CXRDenseNet121"


def _loader(images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
    items = [{"image": im} if labels is None else {"image": im, "label": lab}
             for im, lab in zip(images, labels if labels is not None else images, strict=True)]
    return torch.utils.data.DataLoader(items, batch_size=len(items))


def test_one_step_is_the_semi_supervised_gan_step_written_out():
    """One iteration of the trainer equals the step done by hand: the discriminator's loss on its K class logits
    relative to the generated one, with the fakes detached, then feature matching for the generator on new noise
    with the discriminator frozen."""
    from monai_cxr_ssl.losses import FeatureMatchingLoss, SemiSupervisedGANLoss
    from monai_cxr_ssl.methods.ssl_gan.engine import SemiSupervisedGanTrainer

    torch.manual_seed(0)
    labeled, unlabeled = torch.rand(4, 1, 16, 16), torch.rand(6, 1, 16, 16)
    labels = torch.eye(2)[[0, 1, 1, 0]]
    d_net = DCGANDiscriminator(num_classes=3, base_channels=4, num_layers=3, dropout=0.0)
    g_net = DCGANGenerator(image_size=16, latent_dim=8, base_channels=4)
    d_ref, g_ref = copy.deepcopy(d_net), copy.deepcopy(g_net)
    d_opt, g_opt = (torch.optim.Adam(n.parameters(), lr=1e-2, betas=(0.5, 0.999)) for n in (d_net, g_net))
    trainer = SemiSupervisedGanTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(labeled, labels),
        unlabeled_data_loader=_loader(unlabeled), d_network=d_net, d_optimizer=d_opt, g_network=g_net,
        g_optimizer=g_opt, latent_dim=8)
    noise = [torch.randn(6, 8), torch.randn(6, 8)]  # the discriminator's step's, then the generator's
    drawn = iter(noise)
    trainer.noise = lambda n: next(drawn)
    trainer.run()

    d_opt, g_opt = (torch.optim.Adam(n.parameters(), lr=1e-2, betas=(0.5, 0.999)) for n in (d_ref, g_ref))
    with torch.no_grad():
        fakes = g_ref(noise[0])
    logits = d_ref(torch.cat([labeled, unlabeled, fakes]))
    real = logits[:, :2] - logits[:, 2:]
    loss = SemiSupervisedGANLoss()(real[:4], torch.tensor([0, 1, 1, 0]), real[4:10], real[10:])["total"]
    loss.backward()
    d_opt.step()
    d_grads = [p.grad.clone() for p in d_ref.parameters()]
    g_opt.zero_grad()
    fakes = g_ref(noise[1])
    with torch.no_grad():
        target = d_ref.pooled_features(unlabeled)
    FeatureMatchingLoss()(target, d_ref.pooled_features(fakes)).backward()
    g_opt.step()
    # the generator's step left the discriminator's gradients as its own step made them: it was frozen
    for a, p in zip(d_grads, d_net.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    for mine, ref in ((d_net, d_ref), (g_net, g_ref)):
        for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=name)
    output = trainer.state.output
    assert float(output["loss"]) == pytest.approx(loss.item(), rel=1e-6)
    p_generated = torch.softmax(logits.detach(), dim=1)[:, 2]
    assert float(output["p_generated_real"]) == pytest.approx(float(p_generated[4:10].mean()), rel=1e-5)
    assert float(output["labeled_accuracy"]) == float((real[:4].argmax(1) == torch.tensor([0, 1, 1, 0])).float().mean())


def test_the_dcgan_discriminator_sees_its_images_in_minus_one_to_one():
    """Images in [0, 1] (the pipeline's and the generator's) are centred first: mid-grey is 0 to its convolutions."""
    net = DCGANDiscriminator(num_classes=3, base_channels=4, dropout=0.0).eval()
    grey, black = torch.full((1, 1, 16, 16), 0.5), torch.zeros(1, 1, 16, 16)
    torch.testing.assert_close(net.pooled_features(grey), net.pool(net.features(black)))
    torch.testing.assert_close(net.pooled_features(black), net.pool(net.features(-torch.ones(1, 1, 16, 16))))


def test_a_densenet_discriminator_keeps_the_running_statistics_of_its_own_step():
    """With DenseNet121 as the discriminator, the generator's step leaves its BatchNorm statistics as the
    discriminator's step made them (under torchrun they are then the same on every rank)."""
    from monai_cxr_ssl.methods.ssl_gan.engine import SemiSupervisedGanTrainer

    torch.manual_seed(1)
    labeled, unlabeled = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    d_net = gan_discriminator("densenet121", 3)
    g_net = DCGANGenerator(image_size=32, latent_dim=8, base_channels=4)
    d_ref = copy.deepcopy(d_net)
    trainer = SemiSupervisedGanTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=_loader(labeled, torch.eye(2)),
        unlabeled_data_loader=_loader(unlabeled), d_network=d_net, d_optimizer=torch.optim.SGD(d_net.parameters(), 0.0),
        g_network=g_net, g_optimizer=torch.optim.SGD(g_net.parameters(), 0.0), latent_dim=8)
    noise = [torch.randn(2, 8), torch.randn(2, 8)]
    drawn = iter(noise)
    trainer.noise = lambda n: next(drawn)
    g_ref = copy.deepcopy(g_net)
    trainer.run()
    with torch.no_grad():  # the discriminator's step alone (learning rate 0: only the statistics move)
        d_ref(torch.cat([labeled, unlabeled, g_ref(noise[0])]))
    for (name, a), b in zip(d_net.named_buffers(), d_ref.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(d_net.buffers(), gan_discriminator("densenet121", 3).buffers(),
                                                     strict=True))  # the statistics did move


def test_data_it_cannot_learn_is_refused_with_the_reason():
    from monai_cxr_ssl.methods.ssl_gan.engine import check_exclusive_classes

    def split(classes, labels, unlabeled=1):
        items = [{"id": f"i{k}", "label": lab} for k, lab in enumerate(labels)]
        return {"classes": classes, "labeled": items, "validation": items, "unlabeled": [{}] * unlabeled}

    check_exclusive_classes(split(["A", "B"], [[1, 0], [0, 1]]))
    with pytest.raises(ValueError, match=r"1 class \(OPACITY\): a binary task .*overlay multiclass, "
                                         r"datasource#positive_class=null"):
        check_exclusive_classes(split(["OPACITY"], [[1], [0]]))
    with pytest.raises(ValueError, match=r"1 of the 3 labeled images have no class or several \(e.g. i2: 2\): "
                                         r"multi-label data"):
        check_exclusive_classes(split(["A", "B"], [[1, 0], [0, 1], [1, 1]]))
    with pytest.raises(ValueError, match="1 of the 2 labeled images have no class or several"):
        check_exclusive_classes(split(["A", "B", "C"], [[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="the split has no unlabeled images"):
        check_exclusive_classes(split(["A", "B"], [[1, 0], [0, 1]], unlabeled=0))


def test_binary_data_stops_the_pipeline_before_the_teacher(data, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(_cli("pipeline", "demo", settings=_settings(data, out, method="ssl_gan")),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "method ssl_gan: the data has 1 class (OPACITY): a binary task" in done.stderr
    assert not (out / "teacher").exists()


def test_the_discriminator_ema_starts_as_the_discriminator_and_ramps_to_its_decay(data, tmp_path):
    """Its momentum is 1 at the first iteration (the EMA is the discriminator), 1 − decay from iteration 1 / (1 −
    decay) on, linear between: a short run does not evaluate an average of mostly random initial weights."""
    from monai_cxr_ssl.workflow import make_workflow

    parser = make_workflow(["ssl_gan", "demo", "multiclass"], **_settings(data, tmp_path / "out",
                                                                         discriminator_ema_decay=0.99)).parser
    momentum = parser.get_parsed_content("train#d_ema").momentum_at  # of the trainer's iteration: resumable
    assert momentum(1) == 1.0 and momentum(100) == momentum(5000) == pytest.approx(0.01)
    assert momentum(50) == pytest.approx(1 - 0.99 * 49 / 99)


@pytest.mark.parametrize(("setting", "message"), [
    ({"crop_size": 40, "image_size": 40}, "crop_size=40: the GAN's generator makes square images of"),
    ({"discriminator": "resnet"}, "discriminator='resnet' must be one of"),
    ({"generator_loss": "wasserstein"}, "generator_loss='wasserstein' must be one of"),
    ({"discriminator_ema_decay": 1}, "discriminator_ema_decay=1 must be"),
    ({"labeled_fraction": 1.0}, "the split has no unlabeled images"),
])
def test_bad_settings_stop_before_any_training(data, tmp_path, setting, message):
    out = tmp_path / "out"
    error = bundle_error(["ssl_gan", "demo", "multiclass"], _settings(data, out, **setting))
    assert isinstance(error, ValueError) and re.search(message, str(error)), error
    assert not (out / "ssl_gan" / "models").exists()


@pytest.mark.slow
def test_the_gan_step_on_two_processes_keeps_both_networks_equal(data, tmp_path):
    settings = _settings(data, tmp_path / "two", num_epochs=1, probe_file=str(tmp_path / "gan"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = _cli("run", "ssl_gan", "demo", "multiclass", str(TESTS / "data" / "gan_probe.json"), "--nproc-per-node",
               "2", settings=settings)
    done = run_processes(cmd, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"gan.rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) >= 2
    for step, (a, b) in enumerate(zip(*ranks, strict=True)):
        assert a["wrapped"] == b["wrapped"] == [True, True], step  # DistributedDataParallel, both networks
        assert a["d"] == b["d"] and a["g"] == b["g"], step  # the same weights on both ranks after every step
    assert ranks[0][0]["d"] != ranks[0][-1]["d"] and ranks[0][0]["g"] != ranks[0][-1]["g"]  # and they learn


@pytest.mark.slow
def test_the_method_killed_and_resumed_equals_a_straight_run_exports_and_deploys(data, tmp_path):
    """``method=ssl_gan`` on two mutually exclusive classes, killed (SIGKILL) after the GAN stage's first epoch and
    run again: both networks, the discriminator's EMA and both optimizers end as a straight run of the stage's, bit
    for bit; MLflow has every epoch's GAN metrics and image grids. Table I's columns; the test AUROC per class is
    scikit-learn's on the saved predictions (softmax over the classes, the generated one dropped), as is the
    accuracy; the exported TorchScript gives the discriminator EMA's probabilities, and the deploy app classifies a
    DICOM with it."""
    pytest.importorskip("monai.deploy.core", reason="the MONAI Deploy App SDK (the deploy extra) is not installed")
    import mlflow
    from conftest import deploy_on_a_radiograph
    from monai.data import load_net_with_metadata
    from sklearn.metrics import accuracy_score, roc_auc_score

    from monai_cxr_ssl.launch import run_bundle

    straight = _settings(data, tmp_path / "straight")
    run_bundle(["ssl_gan", "demo", "multiclass"], **straight)
    out = tmp_path / "out"
    settings = _settings(data, out, method="ssl_gan", pause_file=str(tmp_path / "pause"), pause_stage="ssl_gan")
    cmd = _cli("pipeline", "demo", "multiclass", str(PAUSE_AFTER_EPOCH_1), settings=settings)
    kill_after_epoch_1(cmd, tmp_path, tmp_path / "pause", timeout=300)
    assert (out / "teacher" / ".evaluate.done.json").is_file() and not (out / "ssl_gan" / ".ssl_gan.done.json").exists()
    done = run_processes(cmd, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ssl_gan: resuming an interrupted run" in done.stdout and "Resuming from" in done.stdout + done.stderr
    a, b = (torch.load(d / "ssl_gan" / "models" / "last.pt", weights_only=False) for d in (tmp_path / "straight", out))
    for part in ("network", "generator", "discriminator_ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    for part in ("optimizer", "g_optimizer"):
        x, y = a[part]["state"], b[part]["state"]
        assert x.keys() == y.keys() and all(torch.equal(x[k][s], y[k][s]) for k in x for s in ("exp_avg", "exp_avg_sq"))
    assert not all(torch.equal(a["network"][k], a["discriminator_ema"][k]) for k in a["network"])

    client = mlflow.MlflowClient(tracking_uri=straight["tracking_uri"])
    (run,) = client.search_runs([client.get_experiment_by_name("ssl_gan").experiment_id])
    for metric in ("train_loss", "labeled_loss", "unlabeled_loss", "generated_loss", "generator_loss",
                   "p_generated_real", "p_generated_fake", "labeled_accuracy", "val_auroc"):
        assert len(client.get_metric_history(run.info.run_id, metric)) == 2, metric
    grids = sorted(f.path for f in client.list_artifacts(run.info.run_id, "samples"))
    assert grids == ["samples/epoch_001.png", "samples/epoch_002.png"]
    assert run.data.params["generator_loss"] == "feature_matching" and run.data.params["discriminator"] == "dcgan"

    results = json.loads((out / "results-ssl_gan.json").read_text())
    assert list(results["auroc"]) == ["teacher", "supervised discriminator", "ssl-gan"]
    for stage, column in (("supervised_discriminator", "supervised discriminator"), ("ssl_gan", "ssl-gan")):
        saved = np.load(out / stage / "test_predictions.npz")
        assert saved["probs"].shape[1] == 2 and np.allclose(saved["probs"].sum(axis=1), 1, atol=1e-5)
        report = json.loads((out / stage / "test_metrics.json").read_text())
        for k, name in enumerate(["NORMAL", "OPACITY"]):
            assert report["auroc"][name] == pytest.approx(roc_auc_score(saved["labels"][:, k], saved["probs"][:, k]))
        assert results["auroc"][column] == pytest.approx(report["mean_auroc"])
        assert report["accuracy"] == pytest.approx(accuracy_score(saved["labels"].argmax(1), saved["probs"].argmax(1)))
    # the baseline is the GAN's discriminator (K + 1 outputs), trained on the labeled images alone: no GAN terms
    supervised = DCGANDiscriminator(num_classes=3, base_channels=8)
    supervised.load_state_dict(torch.load(out / "supervised_discriminator" / "models" / "model.pt", weights_only=True))
    last = torch.load(out / "supervised_discriminator" / "models" / "last.pt", weights_only=False)
    assert "generator" not in last and "network" in last

    subprocess.run([sys.executable, "-m", "monai_cxr_ssl.cli", "export", str(out), "-o", str(tmp_path / "model.ts"),
                    "--ood-images", "0"], check=True, capture_output=True, timeout=600)
    scripted, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    assert meta["cxr_ssl"]["network"] == {"kind": "dcgan", "base_channels": 8}
    assert meta["cxr_ssl"]["probabilities"] == "softmax_drop_last" and meta["cxr_ssl"]["classes"] == ["NORMAL",
                                                                                                        "OPACITY"]
    net = DCGANDiscriminator(num_classes=3, base_channels=8).eval()
    net.load_state_dict(torch.load(out / "ssl_gan" / "models" / "model.pt", weights_only=True))
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), torch.softmax(net(x)[:, :2], dim=1))

    result = deploy_on_a_radiograph(tmp_path / "model.ts", tmp_path)
    assert set(result["probabilities"]) == {"NORMAL", "OPACITY"} and result["findings_withheld"] is None
    assert sum(result["probabilities"].values()) == pytest.approx(1, abs=1e-4)


def test_the_monitor_saves_a_grid_and_warns_on_divergence_and_collapse(tmp_path, caplog):
    from types import SimpleNamespace

    from PIL import Image

    from monai_cxr_ssl.methods.ssl_gan.engine import GanMonitor

    monitor = GanMonitor(tmp_path, num_images=4)
    varied = torch.rand(6, 1, 8, 8)
    engine = SimpleNamespace(state=SimpleNamespace(epoch=3, output={"fakes": varied},
                                                   metrics={"p_generated_real": 0.3}))
    with caplog.at_level("WARNING", logger="monai_cxr_ssl"):
        monitor(engine)
    grid = np.asarray(Image.open(tmp_path / "samples" / "epoch_003.png"))
    assert grid.shape == (20, 20)  # 2 x 2 images of 8 px, 1 px apart
    assert np.array_equal(grid[1:9, 1:9], (varied[0, 0].numpy() * 255).astype(np.uint8))
    assert not caplog.records
    engine.state.output["fakes"] = varied[:1].expand(6, 1, 8, 8)  # six copies of one image
    engine.state.metrics["p_generated_real"] = 0.95
    with caplog.at_level("WARNING", logger="monai_cxr_ssl"):
        monitor(engine)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "ssl_gan epoch 3: the discriminator calls real images generated (mean p(generated) 0.950" in said
    assert "the generated images barely differ (mean per-pixel std 0.0000" in said
