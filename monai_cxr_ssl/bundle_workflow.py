"""MONAI's ``ConfigWorkflow`` with the bundle property checks (``check_properties``) fitted to this bundle's layout.

It also keeps MONAI's "Not all config files are in <folder>" warning quiet when the meta and logging files are
given (the warning is about guessing them from the first config's folder; MONAI 1.6.1 prints it for every overlay
outside that folder regardless, several times per stage).

Three things MONAI 1.6.1's checks do not handle, and this class does:

- ``train#handlers`` entries that are references (``"@train#checkpoint"``): MONAI reads every handler as a dict
  when it looks for the ``ValidationHandler`` and fails with ``TypeError``; here the references are followed.
- an evaluation workflow written as overlays on ``train.json`` (``predict.json`` with ``evaluate.json`` or
  ``pseudo_label.json``): its evaluator, dataset and inferer are the model-zoo ids ``validate#evaluator``,
  ``validate#dataset`` ... rather than the top-level ``evaluator``, ``dataset`` ... of ``inference.json``; the
  inference properties are looked up there when the config has no top-level ``evaluator``.
- a required property missing from an initialised workflow: MONAI's ``check_properties`` raises ``KeyError``
  instead of returning its name in the list it documents; here it is returned.
"""

from __future__ import annotations

import logging
from typing import Any

from monai.bundle import ConfigWorkflow
from monai.bundle.properties import InferProperties
from monai.bundle.utils import EXPR_KEY, ID_REF_KEY, ID_SEP_KEY
from monai.utils import BundlePropertyConfig

__all__ = ["CXRConfigWorkflow"]

# The inference properties that an overlay on train.json has under validate# (the rest are top-level in both).
_VALIDATE_SECTION = {name for name in InferProperties if name not in ("bundle_root", "device", "dataset_dir",
                                                                        "network_def")}


def _not_the_config_root_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Not all config files are in ")


class CXRConfigWorkflow(ConfigWorkflow):
    """A ``ConfigWorkflow`` whose ``check_properties()`` works on this bundle's train and evaluation configs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet = kwargs.get("meta_file") is not None and kwargs.get("logging_file") is not None
        monai_logger = logging.getLogger("monai.bundle.workflows")
        if quiet:
            monai_logger.addFilter(_not_the_config_root_warning)
        try:
            super().__init__(*args, **kwargs)
        finally:
            monai_logger.removeFilter(_not_the_config_root_warning)
        validate = f"validate{ID_SEP_KEY}"
        if self.workflow_type == "infer" and "evaluator" not in self.parser and f"{validate}evaluator" in self.parser:
            properties = {}
            for name, prop in self.properties.items():
                if name in _VALIDATE_SECTION:
                    prop = dict(prop)
                    for key in (BundlePropertyConfig.ID, BundlePropertyConfig.REF_ID):
                        if prop.get(key) is not None:
                            prop[key] = validate + prop[key]
                properties[name] = prop
            self.properties = properties

    def _get_prop_id(self, name: str, property: dict) -> Any:
        try:
            return super()._get_prop_id(name, property)
        except KeyError as e:  # hasattr() in check_properties counts only AttributeError as "missing"
            raise AttributeError(e.args[0]) from e

    def _check_optional_id(self, name: str, property: dict) -> bool:
        key = f"train{ID_SEP_KEY}handlers"
        if name not in ("evaluator", "val_interval") or key not in self.parser:
            return super()._check_optional_id(name, property)
        prop_id, ref_id = property.get(BundlePropertyConfig.ID), property.get(BundlePropertyConfig.REF_ID)
        for handler in self.parser[key]:
            if isinstance(handler, str) and handler.startswith(ID_REF_KEY):
                handler = self.parser.get(handler[len(ID_REF_KEY):], {})
            if isinstance(handler, dict) and handler.get("_target_") == "ValidationHandler":
                ref = handler.get(ref_id)
                if isinstance(ref, str) and not ref.startswith(EXPR_KEY) and ref != ID_REF_KEY + prop_id:
                    return False
        return True
