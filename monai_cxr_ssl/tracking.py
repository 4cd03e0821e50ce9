"""MLflow look-ups shared by the stages and the pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from monai.utils import path_to_uri

from monai_cxr_ssl.utils import read_json, write_json

SUPERSEDED_SUFFIX = "-superseded"


def tracking_client(tracking_uri: str) -> mlflow.MlflowClient:
    """A client for ``tracking_uri``; ``MLFLOW_TRACKING_URI`` wins, as in MONAI's ``MLFlowHandler``."""
    return mlflow.MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri)


def find_run_id(tracking_uri: str, experiment_name: str, run_name: str) -> str | None:
    """The id of the newest run called ``run_name`` in ``experiment_name``, or None if there is none."""
    client = tracking_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def experiment_id(client: mlflow.MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing with artifacts where ``MLFlowHandler`` puts them (next to
    a SQLite store, in ``mlruns/``), so runs made here and by the bundles' handlers share one layout."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    uri = client.tracking_uri
    location = path_to_uri(Path(uri[len("sqlite:///"):]).parent / "mlruns") if uri.startswith("sqlite:///") else None
    return client.create_experiment(name, artifact_location=location)


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
        except mlflow.exceptions.MlflowException:
            pass  # the store no longer has it (another tracking URI, deleted): start a new one
    run_id = client.create_run(experiment, run_name=run_name).info.run_id
    write_json(state_file, {"run_id": run_id})
    return run_id, True


def claim_run(
    client: mlflow.MlflowClient, experiment: str, run_name: str, parent_run_id: str | None, resume: bool
) -> str:
    """Make sure the unfinished run called ``run_name`` that ``MLFlowHandler`` will log into is the right one.

    ``MLFlowHandler`` continues the oldest unfinished run with its run name. With ``resume`` (an interrupted
    stage restarted with the same settings) that run is kept; otherwise unfinished runs of that name are
    renamed ``<name>-superseded`` and marked killed, and a new run is created. Either way the run is tagged as a
    child of ``parent_run_id``. Returns the run id.
    """
    runs = client.search_runs(
        [experiment], filter_string=f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time ASC"]
    )
    unfinished = [r for r in runs if r.info.status != "FINISHED"]
    if resume and unfinished:
        run_id = unfinished[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        unfinished = unfinished[1:]
    else:
        run_id = client.create_run(experiment, run_name=run_name).info.run_id
    for run in unfinished:
        client.update_run(run.info.run_id, status="KILLED", name=run_name + SUPERSEDED_SUFFIX)
    if parent_run_id:
        client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, parent_run_id)
    return run_id
