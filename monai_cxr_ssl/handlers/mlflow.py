"""MONAI's ``MLFlowHandler`` with the run chosen from a record in the stage folder, and tracking that survives an
outage of the MLflow store."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from monai.handlers import MLFlowHandler
from monai.utils import flatten_dict

from monai_cxr_ssl import distributed
from monai_cxr_ssl.tracking import SUPERSEDED_SUFFIX, TrackedRun, is_outage, prepare_tracking

logger = logging.getLogger("monai_cxr_ssl")


class MLFlowRunHandler(MLFlowHandler):
    """``MLFlowHandler`` that logs into the run recorded in ``run_record`` (``<stage_dir>/mlflow_run.json``).

    MONAI's handler continues the oldest unfinished run with its run name, in any folder, so a killed run made
    every later run of that name log into it. This one decides from the record instead: with ``resume`` (the
    trainer continues from ``last.pt``) it continues the recorded run if the store has it unfinished (judged
    before sending calls kept during an outage: a run that ended while the store was away is continued);
    otherwise it creates a new run, a child of ``parent_run_id`` if given, and marks the recorded run, if
    unfinished, killed and renamed ``<name>-superseded``. Tracking calls that cannot reach the store are kept
    beside the record (``mlflow_pending.jsonl``, see ``TrackedRun``) and sent when it answers, at the latest when
    the run ends or is resumed, so training never waits for or fails on the tracking server. Under torchrun it
    attaches on rank 0 only.

    Args:
        tracking_uri: as for ``MLFlowHandler`` (``MLFLOW_TRACKING_URI`` wins); with ``run_of``, run_of's (as are the
            experiment and run names unless given).
        run_record: the JSON file recording the run; required unless ``run_of`` is given.
        resume: continue the recorded run (pass ``"$@train#checkpoint.resuming"``).
        parent_run_id: the run to nest a new run under (the pipeline's).
        run_of: another ``MLFlowRunHandler`` whose run this one logs into (the validator's, of the trainer's run).
        retry_interval: seconds between attempts to reach an unreachable store.
        kwargs: the other ``MLFlowHandler`` arguments (``dataset_dict`` is refused: it would log image ids).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        run_record: str | os.PathLike | None = None,
        resume: bool = False,
        parent_run_id: str | None = None,
        run_of: MLFlowRunHandler | None = None,
        retry_interval: float = 30.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("dataset_dict") is not None:
            raise ValueError("MLFlowRunHandler: dataset_dict is not supported (it would log image ids to MLflow).")
        if (run_record is None) == (run_of is None):
            raise ValueError("MLFlowRunHandler: give either run_record (its own run) or run_of (another's run).")
        if run_of is not None:
            tracking_uri = tracking_uri or run_of.tracking_uri
            kwargs.setdefault("experiment_name", run_of.experiment_name)
            kwargs.setdefault("run_name", run_of.run_name)
        if tracking_uri is None:
            raise ValueError("MLFlowRunHandler: give tracking_uri (the MLflow store).")
        prepare_tracking(tracking_uri)  # before MLFlowHandler makes its client: that creates a SQLite store
        super().__init__(tracking_uri=tracking_uri, **kwargs)
        self.tracking_uri = tracking_uri
        self.run_record = run_record
        self.resume = resume
        self.parent_run_id = parent_run_id
        self.run_of = run_of
        self.retry_interval = retry_interval
        self.run: TrackedRun | None = None

    def attach(self, engine: Engine) -> None:
        """Attach on rank 0 only: under torchrun one process logs the stage's run."""
        if distributed.is_main_process():
            super().attach(engine)

    def start(self, engine: Engine) -> None:
        """Pick or create the run (once), then log the parameters."""
        if self.run is None:
            if self.run_of is not None:
                if self.run_of.run is None:
                    raise RuntimeError("MLFlowRunHandler: run_of's engine has not started; attach it to the trainer.")
                self.run = self.run_of.run
            else:
                self.run = self._open_run()
        self.cur_run = self.run  # MONAI's methods test it for "a run is active"
        if self.experiment_param:
            self._log_params(self.experiment_param)
        if self.run_of is None:  # the trainer's max_epochs, not the validator's, describe the run
            self._log_params({a: getattr(engine.state, a, None) for a in self.default_tracking_params}, quiet=True)

    def _open_run(self) -> TrackedRun:
        run = TrackedRun(self.client, self.run_record, self.retry_interval)
        name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        # the store's view before the calls an earlier process kept (it may have ended while the store was away)
        status = self._status(run.run_id) if run.run_id else None
        run.flush()  # those go to that run first (its creation too, if the store was away when it started)
        old = run.run_id
        if self.resume and run.record and status not in ("FINISHED", "gone"):
            logger.info("MLflow: continuing run %s (%s), as training continues from its checkpoint.", old, name)
            run.call("update_run", status="RUNNING")
            return run
        if not old and run.pending_file.exists():
            logger.warning("%s: dropping tracking calls of an earlier run that never reached the store.",
                           run.pending_file)
            run.pending_file.unlink()
        if old and status != "gone":
            run.call("supersede", run_id=old, name=name + SUPERSEDED_SUFFIX)
        fields = {"run_name": name, "experiment_name": self.experiment_name, "parent_run_id": self.parent_run_id}
        try:
            self._set_experiment()
            run_id = self.client.create_run(self.experiment.experiment_id, run_name=name).info.run_id
        except Exception as e:
            if not is_outage(e):
                raise
            run._go_offline(e)
            run.begin(None, **fields)  # created when the store answers
            return run
        run.begin(run_id, **fields)
        if self.parent_run_id:
            run.call("set_tag", key="mlflow.parentRunId", value=self.parent_run_id)
        return run

    def _status(self, run_id: str) -> str | None:
        """The run's status in the store, ``"gone"`` if the store no longer has it, None if unreachable."""
        try:
            info = self.client.get_run(run_id).info
        except Exception as e:
            if is_outage(e):
                return None
            return "gone"  # deleted, or another store
        return "gone" if info.lifecycle_stage != "active" else info.status

    def _log_params(self, params: dict[str, Any], quiet: bool = False) -> None:
        entries = [[str(k), str(v)] for k, v in params.items()]
        self.run.call("log_batch", params=entries, quiet_params=quiet)

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        timestamp = int(time.time() * 1000)
        entries = [[k, float(v), timestamp, step or 0] for k, v in flatten_dict(metrics).items()]
        self.run.call("log_batch", metrics=entries)

    def _delete_exist_param_in_dict(self, param_dict: dict) -> None:
        """Not needed: ``TrackedRun`` leaves out parameters the run already has."""

    def complete(self) -> None:
        """Log the artifacts that exist (at the end of the run)."""
        if self.artifacts and self.run is not None:
            for path in self._parse_artifacts():
                self.run.call("log_artifact", path=str(Path(path).resolve()))

    def close(self) -> None:
        """End the run (``FINISHED``) and send what is still kept; say where it stays if the store is away."""
        try:
            if self.run is not None and self.run_of is None:
                self.run.call("set_terminated", status=self.run_finish_status, end_time=int(time.time() * 1000))
                if not self.run.flush():
                    logger.warning("MLflow store still unreachable: the run's tracking calls stay in %s and are sent "
                                   "when this stage resumes or the pipeline passes it again, or by "
                                   "monai_cxr_ssl.tracking.send_pending(%r, <tracking uri>).",
                                   self.run.pending_file, str(self.run.record_file))
            self.cur_run = None
        finally:
            self._dispose_sqlite_store()

    def _default_dataset_log(self, dataset_dict: Sequence | None) -> None:
        """Datasets are not logged (see ``dataset_dict`` above)."""
