"""MLflow look-ups and the outage-proof run shared by the stages and the pipeline.

``TrackedRun`` is one MLflow run recorded in a JSON file beside the outputs that feed it (``mlflow_run.json``):
tracking calls that cannot reach the store (server down, network gone) are appended to a JSON-lines file next to
it (``mlflow_pending.jsonl``) instead of stopping the work, and sent, in order, when the store answers again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from monai.utils import path_to_uri

from monai_cxr_ssl.locking import file_lock
from monai_cxr_ssl.settings import check_tracking_uri
from monai_cxr_ssl.utils import atomic_write, read_json, write_json

logger = logging.getLogger("monai_cxr_ssl")

SUPERSEDED_SUFFIX = "-superseded"
# Tracking calls fail fast instead of blocking training in minutes of retries (MLflow's defaults: 7 retries with
# exponential back-off, 120 s timeout); ``TrackedRun`` retries itself, later. Set these variables to change them.
HTTP_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
_OUTAGE_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_stores_ready: set[str] = set()


def effective_uri(tracking_uri: str) -> str:
    """The tracking URI MLflow will use: ``MLFLOW_TRACKING_URI`` wins, as in MONAI's ``MLFlowHandler``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri


def prepare_tracking(tracking_uri: str) -> None:
    """Short HTTP retries and timeouts for this process's tracking calls (unless set already), and a SQLite store
    created once, under a lock file beside the database, before any client touches it: concurrent first uses of
    a fresh store would otherwise race each other through MLflow's schema migration."""
    for name, value in HTTP_SETTINGS.items():
        os.environ.setdefault(name, value)
    uri = effective_uri(tracking_uri)
    if uri not in _stores_ready:
        check_tracking_uri(tracking_uri)
    if uri in _stores_ready or not uri.startswith("sqlite:///"):
        return
    db = Path(uri[len("sqlite:///"):])
    with file_lock(db.with_name(db.name + ".lock")):
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates and migrates the tables
    _stores_ready.add(uri)


def tracking_client(tracking_uri: str) -> mlflow.MlflowClient:
    """A client for ``tracking_uri`` (see ``effective_uri``), its store prepared (``prepare_tracking``)."""
    prepare_tracking(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=effective_uri(tracking_uri))


def find_run_id(tracking_uri: str, experiment_name: str, run_name: str) -> str | None:
    """The id of the newest run called ``run_name`` in ``experiment_name``, or None if there is none or the store
    is unreachable (a reference for provenance: the work does not wait for the store)."""
    client = tracking_client(tracking_uri)
    try:
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return None
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"attributes.run_name = '{run_name}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
    except Exception as e:
        if not is_outage(e):
            raise
        logger.warning("MLflow store %s unreachable; the id of run %s is not recorded.", client.tracking_uri, run_name)
        return None
    return runs[0].info.run_id if runs else None


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing with artifacts where ``MLFlowHandler`` puts them (next to
    a SQLite store, in ``mlruns/``), so runs made here and by the bundles' handlers share one layout."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    uri = client.tracking_uri
    location = path_to_uri(Path(uri[len("sqlite:///"):]).parent / "mlruns") if uri.startswith("sqlite:///") else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as e:  # another process created it in between
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def recorded_run(
    client: mlflow.MlflowClient, experiment: str, state_file: str | os.PathLike, run_name: str
) -> tuple[str, bool]:
    """The run whose id ``state_file`` records, set running again, if the store still has it; else a new run
    called ``run_name``, recorded there. Returns ``(run_id, created)``: a pipeline or sweep keeps one MLflow run
    across restarts."""
    state_file = Path(state_file)
    if state_file.is_file():
        run_id = read_json(state_file, "MLflow run record", "delete it to start a new MLflow run")["run_id"]
        try:
            if client.get_run(run_id).info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id, False
        except MlflowException:
            pass  # the store no longer has it (another tracking URI, deleted): start a new one
    run_id = client.create_run(experiment, run_name=run_name).info.run_id
    write_json(state_file, {"run_id": run_id})
    return run_id, True


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` from a tracking call means the store is unreachable or overloaded, not a bad request."""
    if isinstance(error, MlflowException):
        return error.error_code in _OUTAGE_CODES
    return isinstance(error, OSError)  # connection errors of requests and sqlite are OSErrors


def pending_file_of(record_file: str | os.PathLike) -> Path:
    """Where the unsent calls of the run recorded in ``record_file`` are kept: ``mlflow_run.json`` ->
    ``mlflow_pending.jsonl``, ``mlflow_run_evaluate.json`` -> ``mlflow_pending_evaluate.jsonl``."""
    record_file = Path(record_file)
    return record_file.with_name(record_file.stem.replace("mlflow_run", "mlflow_pending", 1) + ".jsonl")


class TrackedRun:
    """An MLflow run recorded in ``record_file`` (``{"run_id", "run_name", "experiment_name", "parent_run_id"}``)
    whose calls survive an outage of the store: ``call`` sends a call now or, when the store is unreachable,
    keeps it in ``pending_file`` (one warning line, no traceback) and tries again at most every
    ``retry_interval`` seconds and on ``flush``. A run created while the store is down is created on the first
    successful ``flush`` (the record then holds ``run_id: null`` until it is).
    """

    def __init__(self, client: mlflow.MlflowClient, record_file: str | os.PathLike, retry_interval: float = 30.0):
        self.client = client
        self.record_file = Path(record_file)
        self.pending_file = pending_file_of(self.record_file)
        self.retry_interval = retry_interval
        self.record: dict[str, Any] = (
            read_json(self.record_file, "MLflow run record", "delete it to start a new MLflow run")
            if self.record_file.is_file() else {}
        )
        self.offline = False
        self._last_attempt = 0.0

    @property
    def run_id(self) -> str | None:
        return self.record.get("run_id")

    def begin(self, run_id: str | None, **fields: Any) -> None:
        """Make this record describe a new run (``run_id`` None: to be created on the next ``flush``)."""
        self.record = {"run_id": run_id, **fields}
        write_json(self.record_file, self.record)

    def call(self, op: str, run_id: str | None = None, **args: Any) -> None:
        """``op`` (``log_batch``, ``log_artifact``, ``set_tag``, ``set_terminated``, ``update_run``) on ``run_id``
        (default: the recorded run), now or, while the store is unreachable, later."""
        entry = {"op": op, "run_id": run_id or self.run_id, **args}  # kept calls stay with their run
        if not self.offline and self.run_id is not None and not self.pending_file.exists():
            try:
                self._send(entry)
                return
            except Exception as e:
                if not is_outage(e):
                    raise
                self._go_offline(e)
        self._keep(entry)
        if time.monotonic() - self._last_attempt >= self.retry_interval:
            self.flush()

    def flush(self) -> bool:
        """Send the kept calls in order (creating the run first if it waits to be); True when none is left."""
        self._last_attempt = time.monotonic()
        if not self.record:  # no run yet
            return True
        entries = self._pending()
        if not entries and self.run_id is not None:
            self.offline = False
            return True
        sent = 0
        try:
            if self.run_id is None:
                self._create()
            for entry in entries:
                self._send(entry)
                sent += 1
        except Exception as e:
            if not is_outage(e):
                raise
            self._go_offline(e)
            if sent:
                self._rewrite(entries[sent:])
            return False
        self.pending_file.unlink(missing_ok=True)
        if self.offline or sent:
            logger.info("MLflow: the store answers again; sent %d kept tracking call(s) to run %s.", sent,
                        self.run_id)
        self.offline = False
        return True

    def _create(self) -> None:
        experiment = experiment_id(self.client, self.record["experiment_name"])
        run_id = self.client.create_run(experiment, run_name=self.record["run_name"]).info.run_id
        if self.record.get("parent_run_id"):
            self.client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, self.record["parent_run_id"])
        self.record["run_id"] = run_id
        write_json(self.record_file, self.record)

    def _send(self, entry: dict) -> None:
        args = {k: v for k, v in entry.items() if k not in ("op", "run_id")}
        run_id = entry["run_id"] or self.run_id
        if entry["op"] == "log_batch":
            params = self._new_params(run_id, args.get("params", []), args.get("quiet_params", False))
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, v, ts, step) for k, v, ts, step in args.get("metrics", [])],
                params=[Param(k, v) for k, v in params],
                tags=[RunTag(k, v) for k, v in args.get("tags", [])],
            )
        elif entry["op"] == "supersede":  # an unfinished run that a new one replaces
            try:
                info = self.client.get_run(run_id).info
            except MlflowException as e:
                if is_outage(e):
                    raise
                return  # the store no longer has it
            if info.status != "FINISHED" and info.lifecycle_stage == "active":
                self.client.update_run(run_id, status="KILLED", name=args["name"])
        elif entry["op"] == "log_artifact":
            if os.path.isfile(args["path"]):  # a stage re-made since: its file went with it
                self.client.log_artifact(run_id, args["path"], args.get("artifact_path"))
        elif entry["op"] == "set_tag":
            self.client.set_tag(run_id, args["key"], args["value"])
        elif entry["op"] == "set_terminated":
            self.client.set_terminated(run_id, args["status"], args.get("end_time"))
        elif entry["op"] == "update_run":
            self.client.update_run(run_id, status=args.get("status"), name=args.get("name"))
        else:
            raise ValueError(f"{self.pending_file}: unknown tracking call {entry['op']!r}; delete the file.")

    def _new_params(self, run_id: str, params: list, quiet: bool) -> list:
        """``params`` less those the run has already (MLflow refuses to change a parameter's value): a continued
        run logs its parameters again. A changed value is reported (unless ``quiet``) and left as it was."""
        if not params:
            return []
        logged = self.client.get_run(run_id).data.params
        changed = [k for k, v in params if k in logged and logged[k] != v]
        if changed and not quiet:
            logger.warning("MLflow run %s keeps its earlier values of %s (MLflow parameters cannot change).",
                           run_id, ", ".join(changed))
        return [[k, v] for k, v in params if k not in logged]

    def _go_offline(self, error: BaseException) -> None:
        if not self.offline:
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            logger.warning("MLflow store %s unreachable (%s); the work goes on and its tracking calls are kept in "
                           "%s until the store answers.", self.client.tracking_uri, reason, self.pending_file)
        self.offline = True

    def _keep(self, entry: dict) -> None:
        with open(self.pending_file, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _pending(self) -> list[dict]:
        if not self.pending_file.is_file():
            return []
        entries = []
        for number, line in enumerate(self.pending_file.read_text().splitlines(), 1):
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # the last line of a process killed while writing it
                logger.warning("%s:%d: skipping a half-written tracking call.", self.pending_file, number)
        return entries

    def _rewrite(self, entries: list[dict]) -> None:
        with atomic_write(self.pending_file) as f:
            f.writelines(json.dumps(e) + "\n" for e in entries)


def send_pending(record_file: str | os.PathLike, tracking_uri: str) -> bool:
    """Send the tracking calls a stage kept while the store was unreachable (``<stage_dir>/mlflow_run.json``);
    True when nothing is left. The pipeline does this for stages it skips; a resumed stage does it itself."""
    run = TrackedRun(tracking_client(tracking_uri), record_file)
    if not run.pending_file.exists() and run.run_id is not None:
        return True
    return run.flush()
