"""The semi-supervised GAN's training step (seed 002; Salimans et al. 2016): a subclass of MONAI's ``GanTrainer``
with its own iteration, and the handler that watches the game.

MONAI's ``GanTrainer`` keeps the two networks and optimizers, the latent sampling and MONAI's handlers, checkpoints
and MLflow, but takes one data loader, a ``d_loss(g_output, d_input)`` without labels and does not detach the fakes;
the semi-supervised step needs labeled and unlabeled batches (the second loader: ``UnlabeledBatches``, shared with the
project's ``SemiSupervisedTrainer``), so :class:`SemiSupervisedGanTrainer` overrides ``_iteration``:

1. the discriminator step: one forward of the labeled, unlabeled and generated (detached) images together (one
   forward per backward, as ``DistributedDataParallel`` wants; the DCGAN discriminator has no batch norm, so this
   equals three forwards; DenseNet121's normalises them together), ``losses.SemiSupervisedGANLoss`` on their K class
   logits relative to the generated class's (``networks.gan.real_class_logits``), then the optimizer step;
2. the generator step on new noise: feature matching against the unlabeled images' pooled discriminator features
   (``losses.FeatureMatchingLoss``) or the non-saturating loss, the discriminator frozen (its parameters, and its
   buffers: a DenseNet121 discriminator's BatchNorm statistics are the discriminator step's, the same on every
   rank), then the optimizer step.

The iteration output has the loss terms, the generator's loss, the mean p(generated) on real (unlabeled) and on
generated images and the labeled accuracy, for ``ignite.metrics.Average``. An EMA of the discriminator (ignite's
``EMAHandler``) is the evaluated model when the stage asks for it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from monai.engines import GanTrainer
from monai.engines.utils import default_make_latent
from monai.utils.enums import CommonKeys as Keys

from monai_cxr_ssl import distributed
from monai_cxr_ssl.engines.semi_supervised import UnlabeledBatches
from monai_cxr_ssl.losses import FeatureMatchingLoss, SemiSupervisedGANLoss, non_saturating_generator_loss
from monai_cxr_ssl.networks.gan import real_class_logits

__all__ = ["GENERATOR_LOSSES", "GanMonitor", "SemiSupervisedGanTrainer", "WarmupEMAHandler", "check_exclusive_classes"]

logger = logging.getLogger("monai_cxr_ssl")

GENERATOR_LOSSES = ("feature_matching", "non_saturating")


def check_exclusive_classes(split: dict) -> None:
    """Refuse data the semi-supervised GAN cannot learn: its classes are mutually exclusive (a softmax over K >= 2
    classes), so every labeled and validation image needs exactly one class; and it needs unlabeled images."""
    classes = split["classes"]
    if len(classes) < 2:
        raise ValueError(
            f"method ssl_gan: the data has {len(classes)} class ({', '.join(classes)}): a binary task with one "
            "sigmoid output. The semi-supervised GAN classifies mutually exclusive classes (seed 002 is "
            "multi-class): give each class its own label, e.g. ClassFolders without positive_class (the overlay "
            "multiclass, datasource#positive_class=null: every class folder is a class).")
    for part in ("labeled", "validation"):
        counts = {item["id"]: sum(v > 0.5 for v in item["label"]) for item in split[part]}
        bad = [(image, n) for image, n in counts.items() if n != 1]
        if bad:
            raise ValueError(
                f"method ssl_gan: {len(bad)} of the {len(counts)} {part} images have no class or several (e.g. "
                f"{bad[0][0]}: {bad[0][1]}): multi-label data. The semi-supervised GAN's classes are mutually "
                "exclusive (a softmax, seed 002); use another method for multi-label data (teacher_student, "
                "mean_teacher, s2mts2).")
    if not split["unlabeled"]:
        raise ValueError("method ssl_gan: the split has no unlabeled images; the semi-supervised GAN learns from "
                         "them. Lower labeled_fraction or add unlabeled_source.")


class SemiSupervisedGanTrainer(GanTrainer):
    """``GanTrainer`` whose iteration is the semi-supervised GAN's (see the module docstring).

    Args:
        train_data_loader: labeled batches (``"image"``, one-hot ``"label"``: the class is its argmax).
        unlabeled_data_loader: unlabeled batches (``"image"``).
        d_network, d_optimizer: the discriminator (K + 1 outputs, the last the generated class; a
            ``pooled_features`` method, also under ``DistributedDataParallel``'s ``module``) and its optimizer.
        g_network, g_optimizer: the generator (noise of ``latent_dim`` → images of the training crops' size).
        loss: the discriminator's loss (default ``SemiSupervisedGANLoss()``, seed 002's sum).
        generator_loss: ``"feature_matching"`` (the paper's) or ``"non_saturating"``.
        feature_matching: the feature-matching loss (default ``FeatureMatchingLoss()``, the squared norm).
        latent_dim: the noise's size (seed 002: 100).
        kwargs: the other ``GanTrainer`` arguments (``device``, ``max_epochs``, ``epoch_length``, handlers,
            metrics ...).
    """

    def __init__(
        self,
        train_data_loader: torch.utils.data.DataLoader,
        unlabeled_data_loader: torch.utils.data.DataLoader,
        d_network: torch.nn.Module,
        d_optimizer: torch.optim.Optimizer,
        g_network: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        loss: SemiSupervisedGANLoss | None = None,
        generator_loss: str = "feature_matching",
        feature_matching: FeatureMatchingLoss | None = None,
        latent_dim: int = 100,
        **kwargs: Any,
    ) -> None:
        if generator_loss not in GENERATOR_LOSSES:
            raise ValueError(f"generator_loss must be one of {', '.join(GENERATOR_LOSSES)}, got {generator_loss!r}.")
        self.generator_loss = generator_loss
        # GanTrainer keeps them: the discriminator's loss and, for feature matching, the generator's
        super().__init__(train_data_loader=train_data_loader, d_network=d_network, d_optimizer=d_optimizer,
                         g_network=g_network, g_optimizer=g_optimizer, d_loss_function=loss or SemiSupervisedGANLoss(),
                         g_loss_function=feature_matching or FeatureMatchingLoss(), latent_shape=latent_dim,
                         decollate=False, **kwargs)
        self._unlabeled = UnlabeledBatches(unlabeled_data_loader)
        self._unlabeled.attach(self)

    def noise(self, n: int) -> torch.Tensor:
        """``n`` noise vectors on the device (from torch's generator: seeded per epoch by the stage)."""
        return default_make_latent(n, self.latent_shape, self.state.device, self.non_blocking)

    def _iteration(self, engine: SemiSupervisedGanTrainer, batchdata: dict) -> dict[str, Any]:
        images, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        unlabeled = engine._unlabeled.next(engine)[Keys.IMAGE]
        d_net, g_net = engine.d_network, engine.g_network
        d_module = distributed.unwrap(d_net)
        n_lab, n_unl = len(images), len(unlabeled)

        # the discriminator: labeled, unlabeled and generated images in one forward, the fakes detached
        with torch.no_grad():
            fakes = engine.g_inferer(engine.noise(n_unl), g_net)
        engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        logits = real_class_logits(engine.d_inferer(torch.cat([images, unlabeled, fakes]), d_net).float())
        classes = labels.argmax(dim=1)
        d_losses = engine.d_loss_function(logits[:n_lab], classes, logits[n_lab:n_lab + n_unl], logits[n_lab + n_unl:])
        d_losses["total"].backward()
        engine.d_optimizer.step()

        # the generator: new noise, the discriminator frozen (no gradients, its running statistics kept)
        d_module.requires_grad_(False)
        buffers = [b.clone() for b in d_module.buffers()]
        try:
            engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            fakes = engine.g_inferer(engine.noise(n_unl), g_net)
            if engine.generator_loss == "feature_matching":
                with torch.no_grad():
                    real_features = d_module.pooled_features(unlabeled)
                g_loss = engine.g_loss_function(real_features, d_module.pooled_features(fakes))
            else:
                g_loss = non_saturating_generator_loss(real_class_logits(d_module(fakes).float()))
            g_loss.backward()
            engine.g_optimizer.step()
        finally:
            d_module.requires_grad_(True)
            with torch.no_grad():
                for b, kept in zip(d_module.buffers(), buffers, strict=True):
                    b.copy_(kept)

        with torch.no_grad():  # p(generated | x) = 1 / (1 + Z) = sigmoid(−LSE(l)); tensors: no device sync per step
            p_generated = torch.sigmoid(-torch.logsumexp(logits, dim=1))
            return {
                Keys.IMAGE: images, Keys.LABEL: labels, Keys.PRED: logits[:n_lab].detach(), "fakes": fakes.detach(),
                Keys.LOSS: d_losses["total"].detach(), "labeled_loss": d_losses["labeled"].detach(),
                "unlabeled_loss": d_losses["unlabeled"].detach(), "generated_loss": d_losses["generated"].detach(),
                "generator_loss": g_loss.detach(), "p_generated_real": p_generated[n_lab:n_lab + n_unl].mean(),
                "p_generated_fake": p_generated[n_lab + n_unl:].mean(),
                "labeled_accuracy": (logits[:n_lab].argmax(dim=1) == classes).float().mean(),
            }


class WarmupEMAHandler(EMAHandler):
    """Ignite's ``EMAHandler`` whose momentum warms up linearly from 1 (the average is the network itself) to
    ``momentum`` over the first ``warmup_iters`` iterations, so that a short run does not evaluate an average still
    mostly made of the random initial weights. The momentum is a function of the trainer's iteration: ignite's own
    warm-up counts its calls from the handler's creation, so a resumed run would start it again."""

    def __init__(self, model: torch.nn.Module, momentum: float, warmup_iters: int, handle_buffers: str = "update"):
        super().__init__(model, momentum=momentum, handle_buffers=handle_buffers)
        self.warmup_iters = int(warmup_iters)

    def momentum_at(self, iteration: int) -> float:
        """The momentum of iteration ``iteration`` (counted from 1)."""
        if iteration >= self.warmup_iters:
            return self.momentum
        return 1.0 + (self.momentum - 1.0) * (iteration - 1) / max(1, self.warmup_iters - 1)

    def attach(self, engine: Engine, name: str = "ema_momentum", warn_if_exists: bool = True,
               event: Any = Events.ITERATION_COMPLETED) -> None:
        # registered first: ignite calls an event's handlers in order, so the update uses this iteration's momentum
        engine.add_event_handler(event, lambda e: setattr(e.state, name, self.momentum_at(e.state.iteration)))
        super().attach(engine, name, warn_if_exists, event)


class GanMonitor:
    """After every epoch: a grid of the last iteration's generated images (``<save_dir>/samples/epoch_NNN.png``,
    logged to the stage's MLflow run under ``samples/``) and a warning when the game goes wrong: the discriminator
    calls real images generated (epoch mean p(generated) on real > ``diverged_above``: divergence) or the generated
    images barely differ from each other (mean per-pixel standard deviation over the batch < ``collapsed_below``:
    mode collapse). Rank 0 only."""

    def __init__(self, save_dir: str | os.PathLike, mlflow_handler: Any | None = None, num_images: int = 16,
                 diverged_above: float = 0.9, collapsed_below: float = 0.01) -> None:
        self.save_dir = os.path.join(save_dir, "samples")
        self.mlflow_handler = mlflow_handler
        self.num_images = num_images
        self.diverged_above = diverged_above
        self.collapsed_below = collapsed_below

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if distributed.is_main_process():
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def grid(self, fakes: torch.Tensor) -> Any:
        """The first ``num_images`` images of ``fakes`` (B, 1, H, W) in [0, 1] as a square grid, 8-bit."""
        import numpy as np

        images = fakes[: self.num_images, 0].float().clamp(0, 1).cpu().numpy()
        side = math.ceil(math.sqrt(len(images)))
        h, w = images.shape[1:]
        canvas = np.zeros((side * (h + 2), side * (w + 2)), dtype=np.uint8)
        for k, image in enumerate(images):
            r, c = divmod(k, side)
            canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = image * 255
        return canvas

    def __call__(self, engine: Any) -> None:
        from PIL import Image

        from monai_cxr_ssl.utils import atomic_write

        fakes = engine.state.output["fakes"]
        epoch = engine.state.epoch
        os.makedirs(self.save_dir, exist_ok=True)
        path = os.path.join(self.save_dir, f"epoch_{epoch:03d}.png")
        with atomic_write(path, "wb") as f:
            Image.fromarray(self.grid(fakes)).save(f, format="PNG")
        run = getattr(self.mlflow_handler, "run", None)
        if run is not None:
            run.call("log_artifact", path=path, artifact_path="samples")
        p_real = engine.state.metrics.get("p_generated_real")
        if p_real is not None and p_real > self.diverged_above:
            logger.warning("ssl_gan epoch %d: the discriminator calls real images generated (mean p(generated) %.3f "
                           "> %.2f): the GAN is diverging; lower learning_rate or try generator_loss=feature_matching.",
                           epoch, p_real, self.diverged_above)
        spread = float(fakes.float().std(dim=0).mean()) if len(fakes) > 1 else float("nan")
        if spread < self.collapsed_below:
            logger.warning("ssl_gan epoch %d: the generated images barely differ (mean per-pixel std %.4f < %.3f): "
                           "mode collapse; see %s.", epoch, spread, self.collapsed_below, path)
