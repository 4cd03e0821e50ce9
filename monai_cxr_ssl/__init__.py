"""Semi-supervised chest X-ray classification for MONAI."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

__version__ = "0.1.0"

# With the deploy extra installed, ``import monai`` imports every package under monai/, the SDK's monai.deploy among
# them, and so Holoscan, which warns about the stack size at import on every command. Only the deploy app runs
# Holoscan; it checks the stack size itself (``deploy/__main__.py``).
warnings.filterwarnings("ignore", message="Current stack size", category=RuntimeWarning, module="holoscan")

# Bundle configs refer to ``monai_cxr_ssl.<module>.<name>`` in expressions after ``$import monai_cxr_ssl``. The
# submodules are imported on first use (module ``__getattr__``, PEP 562), not here: importing torch and MONAI takes
# seconds that ``monai-cxr-ssl --help`` and ``compare`` do not need.
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


def __getattr__(name: str) -> ModuleType:
    """Import the submodule ``monai_cxr_ssl.<name>`` when it is first looked up as an attribute."""
    if name.startswith("__"):  # dunder probes (pickle, inspect, doctest) are not submodules
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise  # the submodule exists but imports something missing
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
