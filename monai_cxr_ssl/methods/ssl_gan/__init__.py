"""The semi-supervised GAN (seed 002, Madani et al.; Salimans et al. 2016): a discriminator with K + 1 outputs (the
K classes and "generated") learns the classes from the labeled images, real from generated on the unlabeled and the
generator's images, while a DCGAN generator learns to match the real images' features: the method ``ssl_gan``
(Table I's ``ssl-gan``), after the supervised teacher (the CNN it is compared with) and the same discriminator
trained on the labeled images alone (``supervised discriminator``: the paper's supervised baseline, so that the
table shows what the unlabeled and generated images add to one network).

Its classes are mutually exclusive: the classifier's probabilities are the softmax over the K class logits, the
generated class dropped (``probabilities: softmax_drop_last``); multi-label or binary one-output data is refused
before the teacher trains. The evaluated model is an EMA of the discriminator (``discriminator_ema``).

Here: the stage kind and its settings' checks (defaults in the bundle's ``configs/ssl_gan_network.json``: the
discriminator, which the evaluation and export use too, and ``configs/ssl_gan.json``: the rest), the plan; the
trainer in ``engine``; the networks in ``monai_cxr_ssl.networks.gan``; the losses in ``monai_cxr_ssl.losses``."""

from __future__ import annotations

from monai_cxr_ssl.methods import Method, StageKind, evaluation, register
from monai_cxr_ssl.rules import BOOL, choice, interval, whole

SSL_GAN = StageKind("ssl_gan", ("train.json", "ssl_gan_network.json", "ssl_gan.json"), epochs="ssl_gan_epochs",
                    unlabeled=True, network=("ssl_gan_network.json",), rules={
    "discriminator": choice("dcgan", "densenet121"),
    "gan_base_channels": whole(1),
    "gan_dropout": interval(0, 1, True, False),
    "latent_dim": whole(1),
    "adam_beta1": interval(0, 1, True, False),
    # losses.GAN_WEIGHTINGS, FEATURE_MATCHING and engine.GENERATOR_LOSSES, not imported: torch stays off the CLI's path
    "gan_loss_weighting": choice("sum", "openai"),
    "generator_loss": choice("feature_matching", "non_saturating"),
    "feature_matching_norm": choice("squared_norm", "mean_square", "mean_abs"),
    "discriminator_ema": BOOL,
    "discriminator_ema_decay": interval(0, 1, False, False),
})
COLUMN = "ssl-gan"
# the discriminator trained as the teacher is (train.json, its epochs and optimizer), on the labeled images only
DISCRIMINATOR = StageKind("supervised_discriminator", ("train.json", "ssl_gan_network.json"),
                          network=("ssl_gan_network.json",))
DISCRIMINATOR_COLUMN = "supervised discriminator"


def check_split(split: dict) -> None:
    """The engine's data check (mutually exclusive classes, unlabeled images), imported when used: torch stays off
    the CLI's start path."""
    from monai_cxr_ssl.methods.ssl_gan.engine import check_exclusive_classes

    check_exclusive_classes(split)


METHOD = register(Method(
    name="ssl_gan",
    help="teacher (the CNN baseline), the discriminator on labels alone, and the semi-supervised GAN: K + 1-class "
         "discriminator, DCGAN generator",
    kinds=(DISCRIMINATOR, SSL_GAN),
    steps=lambda rounds: [DISCRIMINATOR.step(), evaluation(DISCRIMINATOR.name, DISCRIMINATOR, DISCRIMINATOR_COLUMN),
                          SSL_GAN.step(), evaluation(SSL_GAN.name, SSL_GAN, COLUMN)],
    check_split=check_split,
))
