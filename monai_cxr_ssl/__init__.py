"""Semi-supervised chest X-ray classification for MONAI."""

__version__ = "0.1.0"

# Bundle configs refer to these as ``monai_cxr_ssl.<module>.<name>`` in expressions.
from monai_cxr_ssl import (  # noqa: E402
    checkpoints,
    data,
    engines,
    evaluation,
    filtering,
    handlers,
    inferers,
    losses,
    networks,
    pseudo_labels,
    settings,
    sharpening,
    tracking,
    transforms,
    utils,
)

__all__ = [
    "checkpoints",
    "data",
    "engines",
    "evaluation",
    "filtering",
    "handlers",
    "inferers",
    "losses",
    "networks",
    "pseudo_labels",
    "settings",
    "sharpening",
    "tracking",
    "transforms",
    "utils",
]
