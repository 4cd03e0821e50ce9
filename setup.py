"""Package metadata is in setup.cfg; this file only adds the bundle and the overlays to the built package.

The repository keeps ``bundles/`` and ``configs/`` at its root as their one source. A built package (wheel,
``pip install .``) gets copies of them inside ``monai_cxr_ssl/`` with the same layout, which
``monai_cxr_ssl.workflow`` finds when there is no checkout around the package. An editable install keeps using the
repository's folders, so nothing is copied then.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# (source under the repository, the files to ship): the bundle's configs and docs, not its models/ or eval/ outputs.
PACKAGE_DATA = [
    ("bundles/cxr_classifier/configs", ["*.json", "logging.conf"]),
    ("bundles/cxr_classifier/docs", ["**/*.md"]),
    ("configs", ["*.json"]),
]


def data_files() -> list[Path]:
    """The repository files that ship inside the package, relative to the repository root."""
    files = {p.relative_to(ROOT) for folder, patterns in PACKAGE_DATA for pattern in patterns
             for p in (ROOT / folder).glob(pattern) if p.is_file()}
    return sorted(files)


class BuildPyWithBundle(build_py):
    """``build_py`` that also copies the bundle and the overlays into ``<build_lib>/monai_cxr_ssl/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads bundles/ and configs/ in the checkout
        for rel in data_files():
            target = Path(self.build_lib) / "monai_cxr_ssl" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        shipped = [] if getattr(self, "editable_mode", False) else [
            str(Path(self.build_lib) / "monai_cxr_ssl" / rel) for rel in data_files()]
        return super().get_outputs(include_bytecode) + shipped


setup(cmdclass={"build_py": BuildPyWithBundle})
