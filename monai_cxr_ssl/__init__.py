"""Semi-supervised chest X-ray classification for MONAI."""

__version__ = "0.1.0"

# Bundle configs refer to these as ``monai_cxr_ssl.<module>.<name>`` in expressions.
from monai_cxr_ssl import data, evaluation, handlers, inferers, networks, transforms, utils  # noqa: E402

__all__ = ["data", "evaluation", "handlers", "inferers", "networks", "transforms", "utils"]
